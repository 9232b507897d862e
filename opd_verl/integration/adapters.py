"""veRL-facing adapters: map veRL batch fields / call conventions onto the pure objectives.

Three kinds of entry, one per veRL hook that can carry what the objectives need:

- **Advantage estimators** (``algorithm.adv_estimator``): veRL's own ``compute_advantage`` passes only
  ``token_level_rewards, response_mask, config, index``; teacher/reference log-probs do not reach an estimator
  through it. The estimators below therefore take those tensors as extra keyword arguments
  (``student_logprobs``, ``teacher_logprobs``, ``ref_logprobs``, ``sentence_ids``, ``margins``) that a trainer
  passes when it calls ``get_adv_estimator_fn(name)(...)`` itself (a veRL fork's advantage step; the plugin's own
  trainer calls ``compose_advantages`` directly); called without them they raise ``ValueError`` saying so.
  ``token_level_rewards`` + ``index`` give the task advantage (veRL's GRPO estimator) when ``task_coef != 0``.
- **Distillation losses** (``distillation.distillation_loss.loss_mode``, estimator mode, with
  ``use_policy_gradient=true``): veRL's ``distillation_loss`` hands the whole micro-batch ``data``
  (``old_log_probs``, ``ref_log_prob``, ``teacher_logprobs`` of the sampled tokens from veRL's teacher servers,
  and the release rule's ``opd_sentence_ids``/``opd_margins`` where a trainer stored them). Each returns
  per-token losses ``-A`` so that veRL's wrapper, which runs PPO-clip with ``advantages = -losses.detach()``,
  optimises exactly the advantages ``A`` of the pure functions.
- **OPSD top-k GJSD** (``opsd_gjsd``): a distillation loss in top-k mode. veRL's own top-k logits processor is
  hard-wired to forward KL, so :func:`make_opsd_gjsd_loss_fn` builds the worker loss function to install with
  ``actor_rollout_wg.set_loss_fn(...)``: as a logits processor it computes the top-k generalized JSD from the
  student logits and the teacher's top-k (``teacher_logprobs``/``teacher_ids``); as the final loss it delegates
  to veRL's ``distillation_ppo_loss``, which reads those per-token values back through the registered name.

The stages (``StageParams``: signal, weighting, release, task_coef) come from the JSON in the environment variable
``OPD_VERL_STAGE_PARAMS`` (a mapping shaped like the ``opd:`` config section, which Ray workers see through their
runtime environment; ``opd.teachers.kind=server`` writes it), else the defaults; an estimator call may also pass
``params=StageParams(...)``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from opd_verl.objectives import StageParams, compose_advantages, topk_generalized_jsd

__all__ = [
    "STAGE_PARAMS_ENV",
    "ESTIMATOR_NAMES",
    "get_stage_params",
    "make_adv_estimator",
    "make_distillation_loss",
    "opsd_gjsd_distillation_loss",
    "opsd_gjsd_logits_processor",
    "make_opsd_gjsd_loss_fn",
]

STAGE_PARAMS_ENV = "OPD_VERL_STAGE_PARAMS"
ESTIMATOR_NAMES = ("opd_pipeline",)  # the registered name of `compose_advantages` (estimator and loss)


def get_stage_params() -> StageParams:
    """The stages from ``$OPD_VERL_STAGE_PARAMS``, else the defaults."""
    raw = os.environ.get(STAGE_PARAMS_ENV)
    if not raw:
        return StageParams()
    try:
        mapping = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{STAGE_PARAMS_ENV} must hold a JSON object like the opd: section: {err}") from err
    return StageParams.from_config(mapping)


def make_adv_estimator(name: str):
    """Advantage estimator for ``register_adv_est(name)``; returns ``(advantages, returns)`` like veRL's."""

    def estimator(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        config: Any = None,
        index: Any = None,
        *,
        student_logprobs: torch.Tensor | None = None,
        teacher_logprobs: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
        sentence_ids: torch.Tensor | None = None,
        margins: torch.Tensor | None = None,
        lam: float | torch.Tensor | None = None,
        step: int | None = None,
        total_steps: int | None = None,
        params: StageParams | None = None,
        metrics: dict | None = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if student_logprobs is None or teacher_logprobs is None:
            raise ValueError(
                f"adv_estimator={name!r} needs student_logprobs and teacher_logprobs, which veRL's compute_advantage "
                "does not pass: use the opd_verl trainer, pass them from your trainer's advantage step, or call "
                "opd_verl.objectives.compose_advantages there"
            )
        stage = params if params is not None else get_stage_params()
        task = None
        if stage.task_coef != 0.0:
            if index is None:
                raise ValueError(f"adv_estimator={name!r} with task_coef != 0 needs index (the rollout uid groups)")
            from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

            task, _ = compute_grpo_outcome_advantage(token_level_rewards, response_mask, index)
        adv, adv_metrics = compose_advantages(
            student_logprobs,
            teacher_logprobs,
            response_mask,
            params=stage,
            ref_logprobs=ref_logprobs,
            sentence_ids=sentence_ids,
            margins=margins,
            task_advantages=task,
            lam=lam,
            step=step,
            total_steps=total_steps,
        )
        if metrics is not None:
            metrics.update(adv_metrics)
        return adv, adv

    estimator.__name__ = f"compute_{name}_advantage"
    estimator.__qualname__ = estimator.__name__
    estimator.__doc__ = (
        f"opd_verl advantage estimator {name!r} (the configured opd: stages); needs the "
        "extra keyword tensors student_logprobs/teacher_logprobs[/ref_logprobs/sentence_ids/margins] `(B, T)`."
    )
    return estimator


def _padded(value: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor | None:
    if value is None:
        return None
    return value.to_padded_tensor(fill) if value.is_nested else value


def make_distillation_loss(name: str):
    """Distillation loss (estimator mode) for ``register_distillation_loss``: per-token losses ``-A`` `(B, T)`."""

    def loss_fn(config: Any, distillation_config: Any, model_output: dict, data: Any) -> tuple[torch.Tensor, dict]:
        from verl.workers.utils.padding import no_padding_2_padding

        if "teacher_logprobs" not in data.keys():
            raise ValueError(
                f"distillation loss_mode={name!r} needs teacher_logprobs of the sampled tokens in the batch"
            )
        teacher = no_padding_2_padding(data["teacher_logprobs"], data)
        if teacher.dim() == 3:
            if teacher.shape[-1] != 1:
                raise ValueError(
                    f"distillation loss_mode={name!r} needs the teacher's log-prob of the sampled token (estimator "
                    f"mode, one value per token), got teacher_logprobs with {teacher.shape[-1]} per token"
                )
            teacher = teacher.squeeze(-1)
        mask = _padded(data["response_mask"], 0).bool()
        student = _padded(data["old_log_probs"])
        keys = set(data.keys())
        ref = _padded(data["ref_log_prob"]) if "ref_log_prob" in keys else None
        sids = _padded(data["opd_sentence_ids"], 0) if "opd_sentence_ids" in keys else None
        margins = _padded(data["opd_margins"]) if "opd_margins" in keys else None
        adv, metrics = compose_advantages(
            student, teacher, mask, params=get_stage_params(), ref_logprobs=ref, sentence_ids=sids, margins=margins
        )
        if "rollout_is_weights" in keys:
            # veRL 0.9.1's policy-gradient wrapper would pass the micro-batch's rollout_is_weights on nested, which
            # its loss aggregation cannot mask. PPO-clip's per-token loss is positively homogeneous in the advantage
            # (loss(w * A) == w * loss(A) for w >= 0), so the weights go into A here and out of the micro-batch.
            weights = _padded(data["rollout_is_weights"], 0.0).to(adv.dtype)
            adv = adv * weights
            del data["rollout_is_weights"]
            metrics["opd/rollout_is_weight_mean"] = float(weights[mask].mean()) if mask.any() else 0.0
        return -adv, metrics

    loss_fn.__name__ = f"compute_{name}_distillation_loss"
    loss_fn.__qualname__ = loss_fn.__name__
    loss_fn.__doc__ = (
        f"opd_verl distillation loss {name!r}: -A per token from data's old_log_probs, teacher_logprobs "
        "(sampled token), ref_log_prob and optional opd_sentence_ids/opd_margins. Use with "
        "use_policy_gradient=true so veRL's wrapper optimises PPO-clip with advantages A. Rollout importance "
        "weights (rollout_is_weights) are folded into A and removed from data (veRL 0.9.1 cannot apply them there)."
    )
    return loss_fn


def opsd_gjsd_logits_processor(
    student_logits: torch.Tensor,
    data: Any,
    beta: float = 0.0,
    temperature: float = 1.0,
    pointwise_clip: float | None = None,
) -> dict[str, torch.Tensor]:
    """Top-k generalized JSD per token from the student logits and the teacher's top-k (veRL thd layout).

    Args:
        student_logits: `(1, total_nnz, V)` packed student logits (veRL's logits-processor input).
        data: micro-batch with nested ``teacher_logprobs`` / ``teacher_ids`` `(B, seq_i, k)`.

    Returns:
        ``{"distillation_losses": (1, total_nnz)}`` float32.
    """
    t_lp = data["teacher_logprobs"]
    t_ids = data["teacher_ids"]
    t_lp = (t_lp.values() if t_lp.is_nested else t_lp.reshape(-1, t_lp.shape[-1])).unsqueeze(0)
    t_ids = (t_ids.values() if t_ids.is_nested else t_ids.reshape(-1, t_ids.shape[-1])).unsqueeze(0)
    if t_lp.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"teacher top-k {tuple(t_lp.shape)} does not match student logits {tuple(student_logits.shape)} "
            "(sequence parallelism is not supported by opsd_gjsd)"
        )
    losses = topk_generalized_jsd(
        student_logits,
        beta=beta,
        temperature=temperature,
        pointwise_clip=pointwise_clip,
        teacher_topk_values=t_lp,
        teacher_topk_ids=t_ids,
    )
    return {"distillation_losses": losses}


def opsd_gjsd_distillation_loss(config: Any, distillation_config: Any, model_output: dict, data: Any):
    """Registered top-k distillation loss ``opsd_gjsd``: the per-token GJSD computed by the logits processor.

    Returns:
        `(B, T)` per-token losses (response layout) and metrics.
    """
    from verl.workers.utils.padding import no_padding_2_padding

    if "distillation_losses" not in model_output:
        raise ValueError(
            "loss_mode='opsd_gjsd' needs the per-token GJSD from its logits processor: install "
            "opd_verl.integration.adapters.make_opsd_gjsd_loss_fn(...) with actor_rollout_wg.set_loss_fn"
        )
    losses = no_padding_2_padding(model_output["distillation_losses"], data)
    mask = _padded(data["response_mask"], 0).bool()
    valid = losses[mask]
    metrics = {"opsd/gjsd": float(valid.mean()) if valid.numel() else 0.0}
    return losses, metrics


def make_opsd_gjsd_loss_fn(
    actor_config: Any,
    distillation_config: Any,
    beta: float = 0.0,
    temperature: float = 1.0,
    pointwise_clip: float | None = None,
):
    """Worker loss function for ``set_loss_fn`` in veRL's dual convention (logits processor / final loss).

    Requires ``distillation_config.distillation_loss.loss_mode == "opsd_gjsd"`` (top-k mode). With
    ``use_policy_gradient=false`` the GJSD is back-propagated directly (token-mean), as OPSD does.
    """
    from verl.trainer.distillation.losses import distillation_ppo_loss

    mode = distillation_config.distillation_loss.loss_mode
    if mode != "opsd_gjsd":
        raise ValueError(f"distillation.distillation_loss.loss_mode must be 'opsd_gjsd', got {mode!r}")

    def loss_fn(model_output=None, data=None, dp_group=None, student_logits=None, data_format="thd"):
        if student_logits is not None:
            return opsd_gjsd_logits_processor(student_logits, data, beta, temperature, pointwise_clip)
        return distillation_ppo_loss(actor_config, distillation_config, model_output, data, dp_group)

    return loss_fn
