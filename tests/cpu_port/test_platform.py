"""The CPU platform shim: registry entry, device-module answers, activation only on request, gloo backend."""

import os
import subprocess
import sys
import textwrap

import torch

from opd_verl.cpu_port.platform import CPU_DEVICE_MODULE, PlatformCPU, register_platform


def test_registered_and_never_auto_detected():
    from verl.plugin.platform import PlatformRegistry

    assert register_platform() is PlatformCPU
    assert PlatformRegistry.get("cpu") is PlatformCPU
    platform = PlatformCPU()
    assert platform.is_platform_available(use_smi_check=True) is False  # auto-detection never picks it
    assert platform.device_name == "cpu" and platform.current_device() == "cpu"
    assert platform.communication_backend_name() == "gloo"
    assert platform.ray_resource_name() == "GPU" and platform.ray_resource_options(1) == {"num_gpus": 1}
    assert platform.device_module is CPU_DEVICE_MODULE and platform.is_ipc_supported() is False


def test_device_module_answers_cuda_style_calls():
    dm = CPU_DEVICE_MODULE
    assert dm.is_available() and dm.device_count() == 1 and dm.current_device() == "cpu"
    free, total = dm.mem_get_info()
    assert 0 < free <= total
    assert dm.memory_allocated() > 0 and dm.max_memory_reserved() > 0
    dm.empty_cache(), dm.synchronize(), dm.ipc_collect(), dm.set_per_process_memory_fraction(0.5)
    state = dm.get_rng_state()
    a = torch.rand(3)
    dm.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))
    dm.manual_seed(5)
    b = torch.rand(2)
    dm.manual_seed(5)
    assert torch.equal(b, torch.rand(2))
    assert dm.current_stream() is not None and dm.Event is torch.cpu.Event


def _run(code: str, env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES")}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_activation_through_verl_external_modules_and_gloo_group():
    code = """
        import os
        import verl
        from opd_verl.cpu_port.activate import is_active
        from verl.utils.device import get_device_name, get_nccl_backend
        from verl.workers.engine.base import EngineRegistry
        from verl.workers.rollout.base import get_rollout_class
        from verl.workers.rollout.replica import get_rollout_replica_class
        import verl.workers.engine_workers as ew
        import torch.distributed as dist
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        ew.initialize_global_process_group_ray(timeout_second=60)
        print(is_active(), get_device_name(), get_nccl_backend(), dist.get_backend())
        print(EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__)
        print(get_rollout_class("hf", "async").__name__, get_rollout_replica_class("hf").__name__)
        dist.destroy_process_group()
    """
    lines = _run(code, {"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "opd_verl.cpu_port.activate"}).splitlines()
    assert lines[-3] == "True cpu gloo cpu:gloo"
    assert lines[-2] == "FSDPEngineWithLMHead"
    assert lines[-1] == "HFServerAdapter HFRolloutReplica"


def test_not_activated_without_request():
    code = """
        import verl
        import opd_verl.cpu_port.activate as a
        from verl.plugin.platform import PlatformRegistry
        print(a.is_active(), PlatformRegistry.get("cpu"))
    """
    out = _run(code, {"VERL_USE_EXTERNAL_MODULES": "opd_verl.cpu_port.activate"}).splitlines()
    assert out[-1] == "False None"
