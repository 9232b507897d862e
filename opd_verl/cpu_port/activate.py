"""Turn on the CPU shims for veRL in this process (and, through the environment, in every Ray worker process).

Importing this module activates the shims when `VERL_PLATFORM=cpu` is set, and does nothing otherwise, so it is safe
to list in `VERL_USE_EXTERNAL_MODULES` (veRL imports those modules inside `import verl`, in the driver and in every
Ray worker). `cpu_environment()` gives the variables that make a process tree use the shims; the driver sets them in
its own environment and in Ray's `runtime_env` before Ray starts.

What `activate()` registers (each step idempotent):

1. the CPU platform in veRL's platform registry (`opd_verl.cpu_port.platform`);
2. veRL's FSDP engines for device `cpu`, with a non-pinning FSDP2 offload policy (`opd_verl.cpu_port.fsdp_engines`);
3. the `hf` rollout: replica in `RolloutReplicaRegistry`, worker-side adapter in `_ROLLOUT_REGISTRY`
   (`opd_verl.cpu_port.rollout_registration`);
4. the gloo backend default of veRL's process-group initialiser (`opd_verl.cpu_port.gloo_patch`).
"""

from __future__ import annotations

import os

from opd_verl.cpu_port.platform import PLATFORM_NAME, requested

MODULE = "opd_verl.cpu_port.activate"

_active = False


def cpu_environment(existing: str | None = None) -> dict[str, str]:
    """Environment variables that activate the shims in a process tree.

    Args:
        existing: current value of `VERL_USE_EXTERNAL_MODULES` (kept, this module appended once).
    """
    modules = [m for m in (existing or "").split(",") if m.strip()]
    if MODULE not in modules:
        modules.append(MODULE)
    return {
        "VERL_PLATFORM": PLATFORM_NAME,
        "VERL_USE_EXTERNAL_MODULES": ",".join(modules),
        "TOKENIZERS_PARALLELISM": "false",
    }


def activate() -> None:
    """Register the CPU platform, engines, `hf` rollout and the gloo backend default in this process."""
    global _active
    if _active:
        return
    from opd_verl.cpu_port.fsdp_engines import patch_offload_policy, register_engines
    from opd_verl.cpu_port.gloo_patch import patch_process_group_backend
    from opd_verl.cpu_port.platform import register_platform
    from opd_verl.cpu_port.rollout_registration import register_hf_rollout

    register_platform()
    register_engines()
    patch_offload_policy()
    register_hf_rollout()
    patch_process_group_backend()
    _active = True


def is_active() -> bool:
    return _active


def activate_in_environment() -> None:
    """Set this process's environment so that it and its children use the shims, then activate them here."""
    os.environ.update(cpu_environment(os.environ.get("VERL_USE_EXTERNAL_MODULES")))
    activate()


if requested():
    activate()
