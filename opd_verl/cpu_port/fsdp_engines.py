"""veRL's FSDP engines on the CPU platform: registration for device `cpu` and the FSDP2 offload policy.

1. `EngineRegistry` selects an engine by the platform's device name; veRL registers its FSDP engines for `cuda` and
   `npu` only, so `register_engines` adds `FSDPEngineWithLMHead` / `FSDPEngineWithValueHead` for `cpu` (both the
   `fsdp` and `fsdp2` backend names; only `fsdp2` works on CPU).
2. For forward-only engines (the reference policy) veRL's FSDP2 path builds `CPUOffloadPolicy(pin_memory=True)`;
   pinning host memory needs an accelerator and fails on a CPU-only machine. `patch_offload_policy` rebinds the
   `CPUOffloadPolicy` name inside `verl.workers.engine.fsdp.transformer_impl` to a subclass that never pins (on CPU,
   offloading to CPU is already where the parameters live). `tests/cpu_port/test_verl_internals.py` fails if the name
   or the call moves.
"""

from __future__ import annotations

ENGINE_MODULE = "verl.workers.engine.fsdp.transformer_impl"
OFFLOAD_POLICY_NAME = "CPUOffloadPolicy"
BACKENDS = ("fsdp", "fsdp2")
DEVICE = "cpu"


def register_engines() -> None:
    """Register veRL's FSDP language/value-model engines for device `cpu` (idempotent)."""
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    for model_type, engine in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        registered = EngineRegistry._engines.get(model_type, {})
        backends = [b for b in BACKENDS if DEVICE not in registered.get(b, {})]
        if backends:
            EngineRegistry.register(model_type=model_type, backend=backends, device=DEVICE)(engine)


def patch_offload_policy() -> None:
    """Make veRL's FSDP2 engine build a non-pinning `CPUOffloadPolicy` (idempotent)."""
    from opd_verl.cpu_port import verl_target

    module, original = verl_target(ENGINE_MODULE, OFFLOAD_POLICY_NAME, "fsdp_engines.py")
    if getattr(original, "_opd_verl_no_pin", False):
        return

    class NoPinCPUOffloadPolicy(original):
        """`CPUOffloadPolicy` that ignores `pin_memory` (pinned host memory needs an accelerator)."""

        _opd_verl_no_pin = True

        def __init__(self, pin_memory: bool = True):
            super().__init__(pin_memory=False)

    setattr(module, OFFLOAD_POLICY_NAME, NoPinCPUOffloadPolicy)
