"""The one patch of veRL code the CPU platform needs: the default backend of its process-group initialiser.

`verl.utils.distributed.initialize_global_process_group_ray(timeout_second=None, backend=None)` builds the default
backend `f"cpu:gloo,{device}:{collective}"`; on the CPU platform that is `"cpu:gloo,cpu:gloo"`, which torch rejects
("Duplicate device type cpu"). veRL's trainer worker (`verl.workers.engine_workers.TrainingWorker`) calls it without
a backend. The wrapper below passes `backend="cpu:gloo"` when none is given and the CPU platform is active, and
changes nothing otherwise. `verl.workers.engine_workers` imports the function by name, so its reference is
rebound too when that module is already loaded. `tests/cpu_port/test_verl_internals.py` fails if the function moves or
its signature changes.
"""

from __future__ import annotations

import functools
import inspect
import sys

TARGET_MODULE = "verl.utils.distributed"
TARGET_NAME = "initialize_global_process_group_ray"
IMPORTERS = ("verl.workers.engine_workers", "verl.checkpoint_engine.base")
EXPECTED_PARAMETERS = ("timeout_second", "backend")
CPU_BACKEND = "cpu:gloo"


def _check_signature(fn) -> None:
    params = tuple(inspect.signature(fn).parameters)
    if params != EXPECTED_PARAMETERS:
        raise RuntimeError(
            f"opd_verl.cpu_port: {TARGET_MODULE}.{TARGET_NAME} has parameters {params}, "
            f"expected {EXPECTED_PARAMETERS}; veRL changed, update opd_verl/cpu_port/gloo_patch.py."
        )


def patch_process_group_backend() -> None:
    """Wrap veRL's `initialize_global_process_group_ray` so it defaults to `cpu:gloo` on the CPU platform."""
    from opd_verl.cpu_port import verl_target

    module, original = verl_target(TARGET_MODULE, TARGET_NAME, "gloo_patch.py")
    if getattr(original, "_opd_verl_cpu_patch", False):
        patched = original
    else:
        _check_signature(original)

        @functools.wraps(original)
        def patched(timeout_second=None, backend=None):
            if backend is None:
                from verl.utils.device import get_device_name

                if get_device_name() == "cpu":
                    backend = CPU_BACKEND
            return original(timeout_second=timeout_second, backend=backend)

        patched._opd_verl_cpu_patch = True
        patched._opd_verl_original = original
        setattr(module, TARGET_NAME, patched)
    for name in IMPORTERS:
        importer = sys.modules.get(name)
        if importer is not None and hasattr(importer, TARGET_NAME):
            setattr(importer, TARGET_NAME, patched)
