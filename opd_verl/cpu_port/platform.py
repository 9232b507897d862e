"""A CPU platform for veRL's platform registry (`verl.plugin.platform`), selected with `VERL_PLATFORM=cpu`.

veRL routes every device call through `get_platform()`: the device name (passed as `device=` to tensors and device
meshes), the `torch.cuda`-style device module (memory stats, rng state, streams, `empty_cache`, ...), the collective
backend (`gloo` here) and the Ray resource name. The platform never auto-detects itself (`is_platform_available`
is False), so registering it changes nothing on a machine where veRL picks a GPU platform; it is used only when
`VERL_PLATFORM=cpu` is set (see `opd_verl.cpu_port.activate`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

PLATFORM_NAME = "cpu"


def _process_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - memory stats are informational only
        return 0


class CPUDeviceModule:
    """The `torch.cuda`-like namespace veRL calls through `get_torch_device()`, answered for the CPU.

    Calls with a direct CPU meaning (rng state, stream/event objects, synchronize) go to `torch` / `torch.cpu`;
    cache and allocator calls are no-ops; memory statistics report the process RSS and the host's memory.
    Anything else falls through to `torch.cpu`.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        """(free, total) bytes of host memory."""
        try:
            import psutil

            vm = psutil.virtual_memory()
            return int(vm.available), int(vm.total)
        except Exception:  # noqa: BLE001
            return 0, 0

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return _process_rss_bytes()

    @staticmethod
    def memory_reserved(device: Any = None) -> int:
        return _process_rss_bytes()

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return _process_rss_bytes()

    @staticmethod
    def max_memory_reserved(device: Any = None) -> int:
        return _process_rss_bytes()

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def memory_stats(device: Any = None) -> dict:
        return {}


CPU_DEVICE_MODULE = CPUDeviceModule()


class PlatformCPU(PlatformBase):
    """veRL platform for running its trainer on CPU processes (gloo collectives, logical Ray GPUs)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self):
        return CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        # Never auto-selected: only `VERL_PLATFORM=cpu` picks this platform.
        return False

    def current_device(self):
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        return None

    def synchronize(self, device_index=None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray assigns the logical GPUs that veRL's pools request through CUDA_VISIBLE_DEVICES.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        # veRL's resource pools always ask for accelerators; on CPU Ray is started with logical GPUs.
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def rollout_env_vars(self) -> dict[str, str]:
        return {}

    def cudart(self):
        return None


def register_platform():
    """Register the CPU platform under `cpu` in veRL's `PlatformRegistry` (idempotent). Returns the class."""
    if PlatformRegistry.get(PLATFORM_NAME) is not PlatformCPU:
        PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)
    return PlatformCPU


def requested() -> bool:
    """True when the environment selects the CPU platform (`VERL_PLATFORM=cpu`)."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME
