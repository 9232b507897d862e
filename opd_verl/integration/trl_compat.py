"""Compatibility of veRL 0.9.1 with TRL releases that no longer ship PPO's value-head model.

`verl.models.transformers.monkey_patch.apply_monkey_patch` (run by every FSDP engine when it builds a model) imports
`AutoModelForCausalLMWithValueHead` from `trl.experimental.ppo` or `trl` whenever TRL is installed; TRL 1.x has
neither, so building any model fails with ImportError. The patch is only for value-head models TRL can no longer
create, so when TRL lacks the class, veRL's module-level `is_trl_available` reference is made to answer False.
Nothing changes when TRL is absent or still has the class.

TRL is a test oracle here, not a run-time dependency: the check reads TRL's installed source files and never imports
TRL (importing `trl.experimental` warns on every run, and importing `trl` costs seconds in every Ray worker).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

TARGET_MODULE = "verl.models.transformers.monkey_patch"
TARGET_NAME = "is_trl_available"
VALUE_HEAD_CLASS = "AutoModelForCausalLMWithValueHead"
# The modules veRL imports the class from, as paths under TRL's package directory.
VALUE_HEAD_MODULES = (("experimental", "ppo"), ())


def _trl_dir() -> str | None:
    spec = importlib.util.find_spec("trl")  # a top-level find_spec imports nothing
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def trl_has_value_head() -> bool:
    """True when the installed TRL exports `AutoModelForCausalLMWithValueHead` from `trl.experimental.ppo` or `trl`.

    Decided from the package's `__init__.py` sources (TRL declares its exports there, lazily or not), without
    importing TRL.
    """
    root = _trl_dir()
    if root is None:
        return False
    for parts in VALUE_HEAD_MODULES:
        init = os.path.join(root, *parts, "__init__.py")
        try:
            with open(init, encoding="utf-8") as f:
                if VALUE_HEAD_CLASS in f.read():
                    return True
        except OSError:
            continue
    return False


def patch_trl_detection() -> bool:
    """Make veRL skip its TRL value-head patch when TRL no longer has the class. Returns True if patched."""
    if _trl_dir() is None or trl_has_value_head():
        return False
    module = importlib.import_module(TARGET_MODULE)
    if not hasattr(module, TARGET_NAME):
        raise RuntimeError(
            f"opd_verl: {TARGET_MODULE}.{TARGET_NAME} not found; veRL changed: "
            "update opd_verl/integration/trl_compat.py."
        )
    setattr(module, TARGET_NAME, lambda: False)
    return True
