"""Compatibility of veRL 0.9.1 with TRL releases that no longer ship PPO's value-head model.

`verl.models.transformers.monkey_patch.apply_monkey_patch` (run by every FSDP engine when it builds a model) imports
`AutoModelForCausalLMWithValueHead` from `trl.experimental.ppo` or `trl` whenever TRL is installed; TRL 1.x has
neither, so building any model fails with ImportError. The patch is only for value-head models TRL can no longer
create, so when TRL lacks the class, veRL's module-level `is_trl_available` reference is made to answer False.
Nothing changes when TRL is absent or still has the class.
"""

from __future__ import annotations

import importlib
import importlib.util

TARGET_MODULE = "verl.models.transformers.monkey_patch"
TARGET_NAME = "is_trl_available"


def trl_has_value_head() -> bool:
    """True when TRL is installed and still provides `AutoModelForCausalLMWithValueHead`."""
    if importlib.util.find_spec("trl") is None:
        return False
    for module_name in ("trl.experimental.ppo", "trl"):
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
            if hasattr(importlib.import_module(module_name), "AutoModelForCausalLMWithValueHead"):
                return True
        except Exception:  # noqa: BLE001 - a broken optional import means "not available"
            continue
    return False


def patch_trl_detection() -> bool:
    """Make veRL skip its TRL value-head patch when TRL no longer has the class. Returns True if patched."""
    if importlib.util.find_spec("trl") is None or trl_has_value_head():
        return False
    module = importlib.import_module(TARGET_MODULE)
    if not hasattr(module, TARGET_NAME):
        raise RuntimeError(
            f"opd_verl: {TARGET_MODULE}.{TARGET_NAME} not found; veRL changed: "
            "update opd_verl/integration/trl_compat.py."
        )
    setattr(module, TARGET_NAME, lambda: False)
    return True
