"""veRL 0.9.1 on the CPU platform: platform, FSDP engines, gloo patch, HF rollout replica, Ray set-up."""

from __future__ import annotations

import importlib


def verl_target(module_name: str, name: str, patch_file: str):
    """``(module, attribute)``: the veRL name a CPU patch rebinds; RuntimeError naming ``patch_file`` when veRL no
    longer has it."""
    module = importlib.import_module(module_name)
    original = getattr(module, name, None)
    if original is None:
        raise RuntimeError(
            f"opd_verl.cpu_port: {module_name}.{name} not found; veRL changed, update opd_verl/cpu_port/{patch_file}."
        )
    return module, original
