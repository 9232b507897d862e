"""The plugin trainer for OPSD: veRL's synchronous v1 trainer whose actor computes the OPSD loss.

Registered as ``opsd_sync`` (`opd_verl.trainer.base.PluginTrainer`). The actor role runs
`opd_verl.workers.opsd_actor.make_opsd_worker_class()`, whose update runs the privileged teacher forward beside the
student's; the ``opd.opsd`` settings reach the workers after ``init_model`` and before a checkpoint is loaded, so an
EMA teacher exists when its state is restored. The recipe's ``algorithm.adv_estimator=opsd_in_actor`` writes zero
advantages: the OPSD losses, the sampled-token one included, are computed inside the actor.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ray
import torch
from omegaconf import DictConfig, OmegaConf
from verl.trainer.ppo.core_algos import register_adv_est
from verl.trainer.ppo.v1.trainer_base import register_trainer

from opd_verl.config import OPSD_ESTIMATOR, OPSDConfig
from opd_verl.trainer.base import PluginTrainer
from opd_verl.trainer.opd_trainer import OPDTaskRunnerBase

__all__ = [
    "OPSD_ESTIMATOR",
    "OPSD_TRAINER_NAME",
    "OPSDTaskRunner",
    "OPSDTrainer",
    "opsd_worker_settings",
]

logger = logging.getLogger(__name__)

OPSD_TRAINER_NAME = "opsd_sync"


@register_adv_est(OPSD_ESTIMATOR)
def opsd_in_actor_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, **kwargs):
    """Zero advantages and returns `(B, T)`: the OPSD actor loss computes its own signal (see module doc)."""
    zeros = torch.zeros_like(response_mask, dtype=torch.float32)
    return zeros, zeros.clone()


def opsd_worker_settings(opsd: OPSDConfig, config: DictConfig) -> dict[str, Any]:
    """The parsed ``opd.opsd`` section as a plain dict plus ``chat_template_kwargs`` for the teacher's prompt:
    ``opd.opsd.teacher_chat_template_kwargs``, or when that is null the student's (veRL's
    ``data.apply_chat_template_kwargs`` of the whole ``config``)."""
    settings = dataclasses.asdict(opsd)
    kwargs = settings.pop("teacher_chat_template_kwargs", None)
    if kwargs is None:
        kwargs = OmegaConf.select(config, "data.apply_chat_template_kwargs", default=None)
        kwargs = OmegaConf.to_container(kwargs, resolve=True) if kwargs else {}
    settings["chat_template_kwargs"] = kwargs
    return settings


class OPSDTaskRunnerBase(OPDTaskRunnerBase):
    """veRL's v1 task runner that selects `OPSDTrainer` for ``trainer.v1.trainer_mode=sync``."""

    trainer_name = OPSD_TRAINER_NAME


OPSDTaskRunner = ray.remote(OPSDTaskRunnerBase)


@register_trainer(OPSD_TRAINER_NAME)
class OPSDTrainer(PluginTrainer):
    """The plugin trainer with OPSD's actor worker (see the module docstring)."""

    trainer_name = OPSD_TRAINER_NAME

    def __init__(self, config: DictConfig):
        self._opsd_configured = False
        super().__init__(config)

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
        self.actor_rollout_wg.configure_opsd(opsd_worker_settings(self.opd.opsd, self.config))
        self._opsd_configured = True

    def _load_checkpoint(self):
        # veRL's _setup loads the checkpoint right after init_model: install the loss (and an EMA teacher) first.
        self._configure_opsd_workers()
        return super()._load_checkpoint()
