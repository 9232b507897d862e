"""Ray and TransferQueue settings that let veRL's trainer start on a CPU machine, and the start-up guard.

veRL's resource pools always request accelerators (`num_gpus` per worker) and TransferQueue starts several storage
actors; on a CPU machine without logical GPUs or with too few CPU slots the run waits forever for a placement group
(no error). `apply_cpu_runtime` sizes Ray (logical GPUs for every pool, oversubscribed logical CPUs), sets one
storage unit and puts the CPU-shim environment into Ray's `runtime_env`; `check_cpu_runtime` refuses a config
that would hang, naming the field to change.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf, open_dict

from opd_verl.cpu_port.activate import activate_in_environment, cpu_environment

LOGICAL_CPUS = 16
STORAGE_UNITS = 1


class CPURuntimeError(RuntimeError):
    """A config that would make veRL's trainer wait forever for Ray resources on CPU."""


def required_logical_gpus(cfg: DictConfig) -> int:
    """Logical GPUs the run's resource pools ask for (`opd_verl.placement.required_gpus`): the trainer's pool plus
    separate pools (veRL's distillation teachers, a reward model with its own pool, the plugin's teachers with
    ``opd.teachers.placement=separate`` or ``kind=server``); colocated teachers add none."""
    from opd_verl.placement import required_gpus

    return sum(required_gpus(cfg).values())


def apply_cpu_runtime(cfg: DictConfig, metrics_file: str | None = None) -> DictConfig:
    """Set Ray's start-up resources and environment and TransferQueue's storage for a CPU run (in place).

    Also activates the CPU shims in this (driver) process and exports their environment, so Ray workers started
    from here inherit it.
    """
    activate_in_environment()
    env = cpu_environment(os.environ.get("VERL_USE_EXTERNAL_MODULES"))
    if metrics_file is not None:
        os.makedirs(os.path.dirname(metrics_file), exist_ok=True)
        env["VERL_FILE_LOGGER_PATH"] = metrics_file
        os.environ["VERL_FILE_LOGGER_PATH"] = metrics_file
    with open_dict(cfg):
        OmegaConf.update(cfg, "ray_kwargs.ray_init.num_cpus", LOGICAL_CPUS, force_add=True)
        # A larger count the user gave (+ray_kwargs.ray_init.num_gpus=N) is kept.
        given = OmegaConf.select(cfg, "ray_kwargs.ray_init.num_gpus", default=None) or 0
        OmegaConf.update(
            cfg, "ray_kwargs.ray_init.num_gpus", max(int(given), required_logical_gpus(cfg)), force_add=True
        )
        OmegaConf.update(cfg, "ray_kwargs.ray_init.include_dashboard", False, force_add=True)
        existing = OmegaConf.select(cfg, "ray_kwargs.ray_init.runtime_env.env_vars", default=None) or {}
        merged = {**dict(existing), **env}
        OmegaConf.update(cfg, "ray_kwargs.ray_init.runtime_env.env_vars", merged, merge=False, force_add=True)
        OmegaConf.update(
            cfg, "transfer_queue.backend.SimpleStorage.num_data_storage_units", STORAGE_UNITS, force_add=True
        )
    return cfg


def check_cpu_runtime(cfg: DictConfig) -> None:
    """Raise `CPURuntimeError` (naming the field) when a CPU run would hang waiting for Ray resources."""
    need = required_logical_gpus(cfg)
    have = OmegaConf.select(cfg, "ray_kwargs.ray_init.num_gpus", default=None)
    if have is None or int(have) < need:
        raise CPURuntimeError(
            f"ray_kwargs.ray_init.num_gpus={have} but the resource pools need {need} logical GPUs on CPU "
            "(trainer.n_gpus_per_node*nnodes + distillation/teacher pools); veRL would wait forever. "
            f"Add +ray_kwargs.ray_init.num_gpus={need} to the command line or run through opd_verl's CPU preset."
        )
    cpus = OmegaConf.select(cfg, "ray_kwargs.ray_init.num_cpus", default=None)
    units = int(OmegaConf.select(cfg, "transfer_queue.backend.SimpleStorage.num_data_storage_units", default=8))
    min_cpus = need + units + 4
    if cpus is None or int(cpus) < min_cpus:
        raise CPURuntimeError(
            f"ray_kwargs.ray_init.num_cpus={cpus} is below {min_cpus} logical CPUs (workers, TransferQueue storage "
            f"units, task runner, reward and agent loops); veRL would wait forever. Set ray_kwargs.ray_init.num_cpus."
        )
    if str(OmegaConf.select(cfg, "trainer.device", default="cuda")) != "cpu":
        raise CPURuntimeError("trainer.device must be cpu when the CPU shims are active")
    strategy = str(OmegaConf.select(cfg, "actor_rollout_ref.actor.strategy", default=""))
    if strategy != "fsdp2":
        raise CPURuntimeError(
            f"actor_rollout_ref.actor.strategy={strategy!r}; on CPU only fsdp2 works (fsdp1 needs device ids)"
        )
    if OmegaConf.select(cfg, "ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM", default=None) != "cpu":
        raise CPURuntimeError("ray_kwargs.ray_init.runtime_env.env_vars must carry VERL_PLATFORM=cpu for Ray workers")
