"""`opd.teachers.kind=server`: express the `opd` section as veRL 0.9.1's own distillation config.

veRL's teacher servers (vLLM/SGLang replicas on their own resource pool, `distillation.*`) return the teacher's
log-prob of each sampled token. That is all OPD, G-OPD/ExOPD (with the student-init reference) and IW-OPD need, so
for those objectives the plugin's registered distillation loss ``opd_pipeline`` runs inside veRL's own trainer:
`distillation.distillation_loss.loss_mode=opd_pipeline` in estimator mode with the policy gradient, i.e. PPO-clip
with the advantages of the configured stages (`compose_advantages`). The stages reach the actor workers as JSON in
their environment (``OPD_VERL_STAGE_PARAMS``, read by `opd_verl.integration.adapters`).

veRL's advantage step still runs with `algorithm.adv_estimator`, without log-probs, and its result feeds only the
policy loss that `use_task_rewards=false` zeroes: the estimator is set to veRL's `grpo` (the plugin's need the
log-probs). Rollout importance weights are applied inside that loss (`opd_verl.integration.adapters`).

What the servers cannot provide is refused by `opd_verl.config` before this runs: the release rule (teacher
log-probs at the student's top-K ids), reward correction (a third model), per-teacher lam, routing by an
`extra_info` field, task-reward mixing and annealed weights.
"""

from __future__ import annotations

import dataclasses
import json

from omegaconf import DictConfig, OmegaConf, open_dict

from opd_verl.config import OPDConfig, OPDConfigError
from opd_verl.integration.adapters import STAGE_PARAMS_ENV

LOSS_MODE = "opd_pipeline"
STOCK_ESTIMATOR = "grpo"


def stage_params_json(opd: OPDConfig) -> str:
    """The stages of the parsed `opd` section (signal, weighting, release, task_coef) as the workers read them."""
    return json.dumps(dataclasses.asdict(opd.stage_params))


def apply_server_teachers(cfg: DictConfig, opd: OPDConfig) -> DictConfig:
    """Point veRL's `distillation.*` at the configured teachers and the plugin's `opd_pipeline` loss (in place).

    Args:
        cfg: the composed, validated config (`opd.teachers.kind=server`, signal opd or gopd).
        opd: its validated `opd` section.

    Returns:
        `cfg`, with `distillation.*`, `ray_kwargs.ray_init.runtime_env.env_vars`, the teacher entries and
        `algorithm.adv_estimator` (a stock estimator) set.
    """
    teachers = opd.teachers
    pool = teachers.nnodes * teachers.n_gpus_per_node
    template = OmegaConf.to_container(cfg.distillation.teacher_models.teacher_model, resolve=False)
    inference = template.get("inference", {})
    per_replica = int(inference.get("tensor_model_parallel_size", 1)) * int(inference.get("data_parallel_size", 1))
    per_replica *= int(inference.get("pipeline_model_parallel_size", 1) or 1)
    if pool % (per_replica * len(teachers.models)):
        raise OPDConfigError(
            f"opd.teachers.n_gpus_per_node={teachers.n_gpus_per_node} x opd.teachers.nnodes={teachers.nnodes} = {pool} "
            f"GPUs cannot be split evenly into {len(teachers.models)} teacher(s) of {per_replica} GPU(s) per replica "
            "(distillation.teacher_models.teacher_model.inference.*_parallel_size); make the pool a multiple"
        )
    entries = {"teacher_model": template}  # veRL requires this entry and drops it when several teachers follow
    for teacher in teachers.models:
        entry = json.loads(json.dumps(template))
        entry["model_path"] = teacher.path
        entry["key"] = teacher.route
        entry["num_replicas"] = pool // (per_replica * len(teachers.models))
        entries["teacher_model" if len(teachers.models) == 1 else f"opd_{teacher.name}"] = entry

    with open_dict(cfg):
        dist = cfg.distillation
        dist.enabled = True
        dist.nnodes = teachers.nnodes
        dist.n_gpus_per_node = teachers.n_gpus_per_node
        dist.teacher_key = teachers.routing_key
        dist.teacher_models = entries
        dist.distillation_loss.loss_mode = LOSS_MODE
        dist.distillation_loss.use_policy_gradient = True
        dist.distillation_loss.use_task_rewards = False
        # veRL's trainer still runs its stock advantage step, whose result feeds only the policy loss that
        # use_task_rewards=false zeroes; the plugin's estimators need log-probs that step does not pass.
        cfg.algorithm.adv_estimator = STOCK_ESTIMATOR
        OmegaConf.update(
            cfg,
            f"ray_kwargs.ray_init.runtime_env.env_vars.{STAGE_PARAMS_ENV}",
            stage_params_json(opd),
            force_add=True,
        )
    return cfg
