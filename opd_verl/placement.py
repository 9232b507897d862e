"""Where the worker groups run, checked in the driver before Ray starts.

veRL puts actor, rollout and reference in one resource pool (``global_pool``, ``trainer.nnodes`` x
``trainer.n_gpus_per_node`` GPUs) and colocates several worker groups on each of its GPUs (up to
``ResourcePoolManager.max_colocate_count``). The plugin's teacher and reward-correction workers (``kind=local``) join
that pool by default (``opd.teachers.placement=colocated``) and add no GPU to the job; ``placement=separate`` gives
them their own pool (``opd.teachers.nnodes`` x ``n_gpus_per_node``) beside it, as veRL does for its teacher servers
(``kind=server``), a reward model with its own pool, and ``distillation.*``.

`check_placement` refuses, naming the fields and a split that works:

- pools that need more GPUs than the launch has (when the driver can tell: Slurm's allocation, the GPUs Ray is told
  to start with, or the local GPUs when Ray starts here); veRL would stop at start-up, or wait for GPUs forever;
- batch sizes that do not divide by the actor's and the reference's data-parallel size (GPUs / Ulysses size), also
  with ``use_dynamic_bsz=true``, where veRL skips its start-up check and fails at the first actor update after a
  whole rollout. The teacher groups take uneven shards (their workers pad forwards), so they need no divisibility.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from opd_verl.config import OPDConfigError

__all__ = ["check_placement", "launch_gpus", "own_teacher_pool_gpus", "required_gpus", "trainer_gpus"]


def _int(cfg: DictConfig, key: str, default: int = 0) -> int:
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else int(value)


def trainer_gpus(cfg: DictConfig) -> int:
    """GPUs of veRL's global pool (actor, rollout, reference and colocated plugin teachers)."""
    return _int(cfg, "trainer.nnodes", 1) * _int(cfg, "trainer.n_gpus_per_node", 1)


def own_teacher_pool_gpus(cfg: DictConfig) -> int:
    """GPUs of the teachers' own pool: ``placement=separate`` local workers, or veRL's teacher servers (``kind=server``,
    whose ``distillation.*`` pool is filled in from ``opd.teachers`` after validation); 0 when colocated."""
    teachers = OmegaConf.select(cfg, "opd.teachers", default=None)
    if teachers is None:
        return 0
    if OmegaConf.select(cfg, "opd.signal.name", default="opd") == "opsd":
        return 0
    kind, placement = teachers.get("kind", "local"), teachers.get("placement", "colocated")
    if kind == "local" and placement == "colocated":
        return 0
    if kind == "server" and OmegaConf.select(cfg, "distillation.enabled", default=False):
        return 0  # already counted as veRL's distillation pool
    return int(teachers.get("nnodes", 1)) * int(teachers.get("n_gpus_per_node", 1))


def required_gpus(cfg: DictConfig) -> dict[str, int]:
    """GPUs each resource pool of the run asks for, by the fields that size it (pools with 0 GPUs left out)."""
    pools = {"trainer.nnodes x trainer.n_gpus_per_node": trainer_gpus(cfg)}
    if OmegaConf.select(cfg, "distillation.enabled", default=False):
        pools["distillation.nnodes x n_gpus_per_node"] = _int(cfg, "distillation.nnodes", 1) * _int(
            cfg, "distillation.n_gpus_per_node", 1
        )
    if OmegaConf.select(cfg, "reward.reward_model.enable", default=False) and OmegaConf.select(
        cfg, "reward.reward_model.enable_resource_pool", default=False
    ):
        pools["reward.reward_model.nnodes x n_gpus_per_node"] = _int(cfg, "reward.reward_model.nnodes", 1) * _int(
            cfg, "reward.reward_model.n_gpus_per_node", 1
        )
    own = own_teacher_pool_gpus(cfg)
    if own:
        pools["opd.teachers.nnodes x n_gpus_per_node"] = own
    return pools


def launch_gpus(cfg: DictConfig, environ: dict | None = None) -> int | None:
    """GPUs the launch has, when the driver can tell before Ray starts; None otherwise (veRL checks at start-up).

    In order: a Slurm allocation (``SLURM_JOB_NUM_NODES`` x ``SLURM_GPUS_ON_NODE``), ``ray_kwargs.ray_init.num_gpus``
    when this driver starts Ray, the local CUDA devices when it starts Ray without that field.
    """
    env = os.environ if environ is None else environ
    nodes, per_node = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES"), env.get("SLURM_GPUS_ON_NODE")
    if nodes and per_node and nodes.isdigit() and per_node.isdigit():
        return int(nodes) * int(per_node)
    if env.get("RAY_ADDRESS"):
        return None  # an existing cluster: its size is known to Ray only
    told = OmegaConf.select(cfg, "ray_kwargs.ray_init.num_gpus", default=None)
    if told is not None:
        return int(told)
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return count or None


def _sp(cfg: DictConfig, role: str) -> int:
    base = f"actor_rollout_ref.{role}"
    return max(
        _int(cfg, f"{base}.ulysses_sequence_parallel_size", 1) or 1,
        _int(cfg, f"{base}.fsdp_config.ulysses_sequence_parallel_size", 1) or 1,
    )


def _batch_sizes(cfg: DictConfig) -> dict[str, int]:
    """Global batches (samples, after ``rollout.n``) that veRL splits evenly over a data-parallel group."""
    n = _int(cfg, "actor_rollout_ref.rollout.n", 1) or 1
    return {
        "data.train_batch_size": _int(cfg, "data.train_batch_size", 1) * n,
        "actor_rollout_ref.actor.ppo_mini_batch_size": _int(cfg, "actor_rollout_ref.actor.ppo_mini_batch_size", 1) * n,
    }


def _groups(cfg: DictConfig) -> dict[str, int]:
    """Ulysses size of each veRL group whose data-parallel size must divide the batches."""
    from verl.trainer.ppo.utils import need_reference_policy

    groups = {"actor": _sp(cfg, "actor")}
    if need_reference_policy(cfg) and not (_int(cfg, "actor_rollout_ref.model.lora_rank", 0) > 0):
        groups["ref"] = _sp(cfg, "ref")
    return groups


def _fits(cfg: DictConfig, gpus: int) -> bool:
    sizes = _batch_sizes(cfg)
    for sp in _groups(cfg).values():
        if gpus % sp:
            return False
        dp = gpus // sp
        if any(size % dp for size in sizes.values()):
            return False
    return True


def _trainer_splits(cfg: DictConfig, per_node: int) -> list[int]:
    """``trainer.n_gpus_per_node`` values up to ``per_node`` whose groups divide the batches (largest first)."""
    nnodes = _int(cfg, "trainer.nnodes", 1)
    return [g for g in range(per_node, 0, -1) if _fits(cfg, g * nnodes)]


def _suggest(cfg: DictConfig, per_node: int, separate: bool) -> str:
    """A split of ``per_node`` GPUs per node whose groups divide the batches."""
    splits = _trainer_splits(cfg, per_node)
    if not splits:
        return f"no trainer.n_gpus_per_node up to {per_node} divides them; change the batch sizes"
    colocated = f"trainer.n_gpus_per_node={splits[0]}"
    if not separate:
        return f"e.g. {colocated}"
    shared = [g for g in splits if g < per_node]
    if not shared:
        return f"e.g. opd.teachers.placement=colocated with {colocated}"
    g = shared[0]
    return (
        f"e.g. trainer.n_gpus_per_node={g} with opd.teachers.n_gpus_per_node={per_node - g}, "
        f"or opd.teachers.placement=colocated with {colocated} (teachers on all the trainer's GPUs)"
    )


def check_placement(cfg: DictConfig, environ: dict | None = None) -> None:
    """Raise `OPDConfigError` when the pools do not fit the launch's GPUs or a batch does not divide by a group's
    data-parallel size (see the module docstring); the message names the fields and a split that works."""
    pools = required_gpus(cfg)
    need = sum(pools.values())
    have = launch_gpus(cfg, environ)
    nnodes = _int(cfg, "trainer.nnodes", 1)
    own = own_teacher_pool_gpus(cfg)
    separate = own > 0 and OmegaConf.select(cfg, "opd.teachers.kind", default="local") == "local"
    if have is not None and need > have:
        asked = " + ".join(f"{name} = {gpus}" for name, gpus in pools.items())
        per_node = max(have // max(nnodes, 1), 1)
        raise OPDConfigError(
            f"the resource pools ask for {need} GPUs ({asked}) but the launch has {have}; veRL would stop at "
            f"start-up. Give the pools at most {have}: {_suggest(cfg, per_node, separate)}"
        )

    gpus = trainer_gpus(cfg)
    sizes = _batch_sizes(cfg)
    dynamic = bool(OmegaConf.select(cfg, "actor_rollout_ref.actor.use_dynamic_bsz", default=False))
    per_node = _int(cfg, "trainer.n_gpus_per_node", 1) + (own // max(nnodes, 1) if separate else 0)
    if have is not None:
        per_node = max(per_node, have // max(nnodes, 1))
    for group, sp in _groups(cfg).items():
        field = f"actor_rollout_ref.{group}.ulysses_sequence_parallel_size"
        if gpus % sp:
            raise OPDConfigError(
                f"{field}={sp} does not divide the {gpus} GPUs of trainer.nnodes x trainer.n_gpus_per_node; "
                f"{_suggest(cfg, per_node, separate)}"
            )
        dp = gpus // sp
        for name, size in sizes.items():
            if size % dp:
                n = _int(cfg, "actor_rollout_ref.rollout.n", 1)
                why = " (use_dynamic_bsz=true skips veRL's start-up check; it fails at the first actor update)"
                raise OPDConfigError(
                    f"{name} x actor_rollout_ref.rollout.n = {size // n} x {n} = {size} samples do not divide by the "
                    f"{group}'s data-parallel size {dp} (trainer.nnodes x trainer.n_gpus_per_node = {gpus} GPUs / "
                    f"{field}={sp}){why if dynamic else ''}; {_suggest(cfg, per_node, separate)}"
                )
