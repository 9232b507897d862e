"""OPSD in veRL 0.9.1's synchronous v1 loop: the plugin trainer with the OPSD actor worker.

`OPSDTrainer` subclasses `opd_verl.trainer.opd_trainer.OPDTrainer` and is registered with veRL's
``@register_trainer`` under ``opsd_sync``; `OPSDTaskRunner` (chosen by `opd_verl.main` when
``opd.signal.name=opsd``) selects it for ``trainer.v1.trainer_mode=sync``. Compared with veRL's step:

1. Setup: the actor role runs `opd_verl.workers.opsd_actor.make_opsd_worker_class()` (veRL's
   ``ActorRolloutRefWorker`` whose update computes the OPSD loss with the privileged teacher forward in the same
   process). The ``opd.opsd`` settings (with veRL's ``data.apply_chat_template_kwargs``) are sent to the workers
   after ``init_model`` and before a checkpoint is loaded, so an EMA teacher exists when its state is restored.
2. Advantage step: veRL's own pipeline (rewards, KL in reward, rollout correction) with the estimator
   ``opsd_in_actor``, which writes zero advantages: the ``full``/``topk`` losses are not advantages, and the
   ``sampled`` variant's advantage ``teacher - student`` is computed inside the actor from the privileged teacher
   forward, where the teacher's log-probs are.
3. Actor update: the micro-batch flag ``distillation_use_topk`` makes veRL's engine call the OPSD loss as a logits
   processor right after the student's forward (teacher forward there, under ``no_grad``), then as the loss.

Not combined with OPSD here (refused at start-up): the release rule, a weighting stage and ``task_coef``.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from verl.trainer.ppo.core_algos import register_adv_est
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from opd_verl.config import OPDConfigError
from opd_verl.trainer.opd_trainer import OPDTaskRunnerBase, OPDTrainer

__all__ = [
    "OPSD_ESTIMATOR",
    "OPSD_TRAINER_NAME",
    "OPSDTaskRunner",
    "OPSDTrainer",
    "check_opsd_supported",
    "opsd_worker_settings",
]

logger = logging.getLogger(__name__)

OPSD_TRAINER_NAME = "opsd_sync"
OPSD_ESTIMATOR = "opsd_in_actor"


@register_adv_est(OPSD_ESTIMATOR)
def opsd_in_actor_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, **kwargs):
    """Zero advantages and returns `(B, T)`: the OPSD actor loss computes its own signal (see module doc)."""
    zeros = torch.zeros_like(response_mask, dtype=torch.float32)
    return zeros, zeros.clone()


def opsd_worker_settings(config: DictConfig) -> dict[str, Any]:
    """The ``opd.opsd`` section as a plain dict plus ``chat_template_kwargs`` for the teacher's prompt:
    ``opd.opsd.teacher_chat_template_kwargs``, or when that is null the student's (veRL's
    ``data.apply_chat_template_kwargs``)."""
    settings = OmegaConf.to_container(config.opd.opsd, resolve=True)
    kwargs = settings.pop("teacher_chat_template_kwargs", None)
    if kwargs is None:
        kwargs = OmegaConf.select(config, "data.apply_chat_template_kwargs", default=None)
        kwargs = OmegaConf.to_container(kwargs, resolve=True) if kwargs else {}
    settings["chat_template_kwargs"] = kwargs
    return settings


def check_opsd_supported(opd, config: DictConfig) -> None:
    """Refuse what this trainer does not combine with OPSD (called in the driver before Ray, and by the trainer)."""
    if opd.signal.name != "opsd":
        raise OPDConfigError(f"OPSDTrainer needs opd.signal.name=opsd, got {opd.signal.name!r}")
    if opd.release.enabled:
        raise OPDConfigError("opd.release.enabled=true is not available with opd.signal.name=opsd: set it to false")
    if opd.weighting.name != "none":
        raise OPDConfigError(
            f"opd.weighting.name={opd.weighting.name!r} is not available with opd.signal.name=opsd "
            "(its loss is computed inside the actor): use weighting.name=none"
        )
    if opd.task_coef != 0.0:
        raise OPDConfigError(f"opd.task_coef={opd.task_coef} is not available with opd.signal.name=opsd: use 0")
    if OmegaConf.select(config, "actor_rollout_ref.model.use_fused_kernels", default=False):
        raise OPDConfigError(
            "opd.signal.name=opsd needs the student's logits, which actor_rollout_ref.model.use_fused_kernels=true "
            "never materialises: set it to false"
        )
    sp = OmegaConf.select(config, "actor_rollout_ref.actor.ulysses_sequence_parallel_size", default=1) or 1
    if int(sp) > 1:
        raise OPDConfigError(
            "opd.signal.name=opsd does not support sequence parallelism: set "
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1"
        )


class OPSDTaskRunnerBase(OPDTaskRunnerBase):
    """veRL's v1 task runner that selects `OPSDTrainer` for ``trainer.v1.trainer_mode=sync``."""

    trainer_name = OPSD_TRAINER_NAME


OPSDTaskRunner = ray.remote(OPSDTaskRunnerBase)


@register_trainer(OPSD_TRAINER_NAME)
class OPSDTrainer(OPDTrainer):
    """The plugin trainer with OPSD's actor worker (see the module docstring)."""

    trainer_name = OPSD_TRAINER_NAME

    def __init__(self, config: DictConfig):
        self._opsd_configured = False
        super().__init__(config)

    def _check_supported(self) -> None:
        super()._check_supported()
        check_opsd_supported(self.opd, self.config)

    # ------------------------------------------------------------------ setup
    def _init_resource_pool_mgr(self):
        from verl.trainer.ppo.utils import Role

        from opd_verl.workers.opsd_actor import make_opsd_worker_class

        super()._init_resource_pool_mgr()
        worker = ray.remote(make_opsd_worker_class())
        for role in (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef):
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = worker

    def _configure_opsd_workers(self) -> None:
        if self._opsd_configured:
            return
        self.actor_rollout_wg.configure_opsd(opsd_worker_settings(self.config))
        self._opsd_configured = True

    def _load_checkpoint(self):
        # veRL's _setup loads the checkpoint right after init_model: install the loss (and an EMA teacher) first.
        self._configure_opsd_workers()
        return super()._load_checkpoint()

    # ------------------------------------------------------------------ step
    def _compute_advantage(self, batch, metrics: dict):
        algorithm = self.config.algorithm
        original = algorithm.adv_estimator
        with open_dict(algorithm):
            algorithm.adv_estimator = OPSD_ESTIMATOR
        try:
            return PPOTrainerSync._compute_advantage(self, batch, metrics)
        finally:
            with open_dict(algorithm):
                algorithm.adv_estimator = original
