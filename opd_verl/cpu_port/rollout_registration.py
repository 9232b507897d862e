"""Registration of the `hf` rollout in veRL, including the one write to a veRL-internal dict.

veRL 0.9.1 resolves a rollout in two places: the replica through the public `RolloutReplicaRegistry.register`, and
the trainer-side adapter through `verl.workers.rollout.base._ROLLOUT_REGISTRY[(name, mode)]`, a private dict of
dotted class paths with no registration function. `ROLLOUT_REGISTRY_ATTR` below is the only place opd_verl touches
it; `tests/cpu_port/test_verl_internals.py` fails with a clear message if the dict moves or changes shape.
"""

from __future__ import annotations

ROLLOUT_NAME = "hf"
ROLLOUT_MODE = "async"
ROLLOUT_REGISTRY_MODULE = "verl.workers.rollout.base"
ROLLOUT_REGISTRY_ATTR = "_ROLLOUT_REGISTRY"
ADAPTER_PATH = "opd_verl.cpu_port.hf_rollout.HFServerAdapter"


def _load_replica():
    from opd_verl.cpu_port.hf_rollout import HFRolloutReplica

    return HFRolloutReplica


def rollout_registry() -> dict:
    """veRL's private `(name, mode) -> "module.Class"` dict of worker-side rollout adapters."""
    import importlib

    module = importlib.import_module(ROLLOUT_REGISTRY_MODULE)
    registry = getattr(module, ROLLOUT_REGISTRY_ATTR, None)
    if not isinstance(registry, dict) or ("vllm", ROLLOUT_MODE) not in registry:
        raise RuntimeError(
            f"opd_verl.cpu_port: {ROLLOUT_REGISTRY_MODULE}.{ROLLOUT_REGISTRY_ATTR} is missing or no longer a "
            "(name, mode) -> class-path dict; veRL changed, update opd_verl/cpu_port/rollout_registration.py."
        )
    return registry


def register_hf_rollout() -> None:
    """Register the `hf` replica (public registry) and its worker-side adapter (private dict)."""
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
    rollout_registry()[(ROLLOUT_NAME, ROLLOUT_MODE)] = ADAPTER_PATH
