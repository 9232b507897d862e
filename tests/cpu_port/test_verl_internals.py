"""The veRL 0.9.1 internals the CPU shims rely on. A failure here means veRL moved something: update
opd_verl/cpu_port."""

import inspect

import pytest

from opd_verl.cpu_port import fsdp_engines, gloo_patch, rollout_registration
from opd_verl.integration import trl_compat


def test_rollout_adapter_registry_dict():
    import verl.workers.rollout.base as base

    registry = getattr(base, rollout_registration.ROLLOUT_REGISTRY_ATTR, None)
    assert isinstance(registry, dict), (
        f"verl.workers.rollout.base.{rollout_registration.ROLLOUT_REGISTRY_ATTR} is gone; the hf rollout adapter "
        "cannot be registered (opd_verl/cpu_port/rollout_registration.py)"
    )
    assert all(isinstance(k, tuple) and len(k) == 2 and isinstance(v, str) for k, v in registry.items()), (
        "_ROLLOUT_REGISTRY is no longer a (name, mode) -> 'module.Class' dict"
    )
    src = inspect.getsource(base.get_rollout_class)
    assert "_ROLLOUT_REGISTRY" in src, "get_rollout_class no longer reads _ROLLOUT_REGISTRY"
    assert rollout_registration.rollout_registry() is registry


def test_process_group_initialiser_signature_and_default_backend():
    import verl.utils.distributed as dist

    fn = getattr(
        dist.initialize_global_process_group_ray, "_opd_verl_original", dist.initialize_global_process_group_ray
    )
    params = tuple(inspect.signature(fn).parameters)
    assert params == gloo_patch.EXPECTED_PARAMETERS, (
        f"verl.utils.distributed.initialize_global_process_group_ray parameters are {params}; "
        "update opd_verl/cpu_port/gloo_patch.py"
    )
    assert 'f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in inspect.getsource(fn), (
        "the default backend string changed; check whether opd_verl/cpu_port/gloo_patch.py is still needed"
    )
    import verl.workers.engine_workers as ew

    assert "initialize_global_process_group_ray(timeout_second=None)" in inspect.getsource(ew.TrainingWorker.__init__)


def test_fsdp2_offload_policy_name():
    import importlib

    module = importlib.import_module(fsdp_engines.ENGINE_MODULE)
    assert hasattr(module, fsdp_engines.OFFLOAD_POLICY_NAME), f"{fsdp_engines.ENGINE_MODULE}.CPUOffloadPolicy moved"
    src = inspect.getsource(module.FSDPEngine._build_fsdp_module)
    assert "CPUOffloadPolicy(pin_memory=True)" in src, "veRL's FSDP2 offload policy call changed; see fsdp_engines.py"


def test_engine_and_replica_registries():
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    assert isinstance(EngineRegistry._engines, dict) and "language_model" in EngineRegistry._engines
    assert set(inspect.signature(EngineRegistry.register).parameters) >= {"model_type", "backend", "device"}
    assert set(inspect.signature(RolloutReplicaRegistry.register).parameters) == {"name", "loader"}


def test_trl_detection_reference():
    import importlib

    module = importlib.import_module(trl_compat.TARGET_MODULE)
    assert hasattr(module, trl_compat.TARGET_NAME)
    assert "AutoModelForCausalLMWithValueHead" in inspect.getsource(module.apply_monkey_patch)


def test_teacher_loop_reads_prompt_logprobs_fields():
    from verl.experimental.teacher_loop import teacher_manager

    src = inspect.getsource(teacher_manager)
    assert 'extra_fields["prompt_ids"]' in src and 'extra_fields["prompt_logprobs"]' in src
    assert '"prompt_logprobs": num_logprobs' in src


def test_file_logger_path_variable():
    from verl.utils import tracking

    assert "VERL_FILE_LOGGER_PATH" in inspect.getsource(tracking.FileLogger)


@pytest.mark.parametrize("name", ["PlatformRegistry", "PlatformBase", "get_platform"])
def test_platform_registry_api(name):
    import verl.plugin.platform as platform

    assert hasattr(platform, name)
