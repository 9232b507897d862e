"""OPSD losses from the student's logits and the privileged teacher's forward (docs/objectives.md section 5).

Runs where the student logits are (inside the actor's loss): the teacher forward on the privileged inputs happens
in the same process under ``no_grad`` with the teacher's weights (:class:`opd_verl.opsd.teacher.TeacherWeights`),
so teacher logits never leave the worker. Variants (``opd.opsd.loss``):

- ``full``: generalized JSD over the full vocabulary per response token (``generalized_jsd``, chunked over
  positions, so the divergence needs O(chunk x V) beyond the logits).
- ``topk``: the same restricted to the teacher's top-k ids, both sides renormalised (``topk_generalized_jsd``).
- ``sampled``: no divergence; the advantage ``teacher - student`` log-prob of the sampled token, trained with the
  policy-gradient loss (:func:`sampled_token_advantages`).

Teacher logits are computed with ``logits_to_keep`` restricted to the response positions. The actor's loss
(`opd_verl.workers.opsd_actor`) runs the teacher over groups of samples of at most the actor's token budget and
consumes each group's logits before the next forward: no copy of the micro-batch's ``B x R x V`` logits is made.
``topk`` and ``sampled`` keep no teacher logits afterwards; ``full`` keeps each group's ``g x R_g x V`` logits (model
dtype, ``R_g``: the group's response width) for the chunked divergence's recompute backward, and nothing else of
size ``V`` per token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opd_verl.objectives import generalized_jsd, topk_generalized_jsd
from opd_verl.opsd.inputs import build_teacher_batch

__all__ = [
    "OPSD_LOSSES",
    "OPSDLossParams",
    "opsd_metrics",
    "opsd_response_divergences",
    "opsd_token_divergence",
    "sampled_token_advantages",
    "teacher_response_logits",
]

OPSD_LOSSES = ("full", "topk", "sampled")


@dataclass(frozen=True)
class OPSDLossParams:
    """Loss settings (``opd.opsd``): variant, beta, distillation temperature, pointwise clip, k, chunk size."""

    loss: str = "full"
    beta: float = 0.0
    temperature: float = 1.1
    pointwise_clip: float | None = 0.05
    topk: int = 50
    chunk_size: int = 512

    def __post_init__(self):
        if self.loss not in OPSD_LOSSES:
            raise ValueError(f"opd.opsd.loss={self.loss!r} is not allowed: allowed values are {', '.join(OPSD_LOSSES)}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"opd.opsd.chunk_size={self.chunk_size!r} is not allowed: it must be an integer >= 1")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"opd.opsd.topk={self.topk!r} is not allowed: it must be an integer >= 1")

    @classmethod
    def from_config(cls, opsd_cfg) -> OPSDLossParams:
        """From the validated `OPDConfig.opsd` (or any object with the same attributes)."""
        return cls(
            loss=opsd_cfg.loss,
            beta=float(opsd_cfg.beta),
            temperature=float(opsd_cfg.temperature),
            pointwise_clip=None if opsd_cfg.pointwise_clip is None else float(opsd_cfg.pointwise_clip),
            topk=int(opsd_cfg.topk),
            chunk_size=int(opsd_cfg.chunk_size),
        )


def opsd_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    params: OPSDLossParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence of the ``full`` or ``topk`` variant, and where the pointwise clip changed it.

    Args:
        student_logits: `(N, V)` raw student logits at N response tokens (differentiable; not yet divided by any
            temperature).
        teacher_logits: `(N, V)` raw teacher logits at the same tokens (constants).
        params: loss settings (``loss`` must be ``full`` or ``topk``).

    Returns:
        divergence: `(N,)` float32, differentiable w.r.t. ``student_logits``.
        clipped: `(N,)` bool, True where the pointwise clip lowered the token's divergence (one of its terms was
            above the clip), from the same pass over the vocabulary as the divergence.
    """
    if params.loss == "sampled":
        raise ValueError("opsd_token_divergence computes the full/topk variants; loss=sampled uses advantages")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student_logits and teacher_logits must both be (N, V), got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    teacher_logits = teacher_logits.detach()
    if params.loss == "full":
        return generalized_jsd(
            student_logits,
            teacher_logits,
            params.beta,
            params.temperature,
            params.pointwise_clip,
            params.chunk_size,
            return_clipped=True,
        )
    k = min(params.topk, teacher_logits.shape[-1])
    divs, clips = [], []
    for start in range(0, student_logits.shape[0], params.chunk_size):
        end = start + params.chunk_size
        div, clipped = topk_generalized_jsd(
            student_logits[start:end],
            teacher_logits[start:end],
            k=k,
            beta=params.beta,
            temperature=params.temperature,
            pointwise_clip=params.pointwise_clip,
            return_clipped=True,
        )
        divs.append(div)
        clips.append(clipped)
    if not divs:
        return student_logits.new_zeros(0, dtype=torch.float32), student_logits.new_zeros(0, dtype=torch.bool)
    return torch.cat(divs), torch.cat(clips)


def sampled_token_advantages(
    teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Sampled-token OPSD advantage ``tch_t - s_t`` with the privileged teacher (detached, 0 off the mask).

    Args:
        teacher_log_probs: `(B, T)` log-prob of the sampled token under the privileged teacher.
        student_log_probs: `(B, T)` the student's recomputed log-prob of it (``old_log_probs``).
        response_mask: `(B, T)` 1 on response tokens.

    Returns:
        `(B, T)` float32 advantages; non-finite values inside the mask raise.
    """
    mask = response_mask.bool()
    diff = teacher_log_probs.detach().float() - student_log_probs.detach().float()
    adv = torch.where(mask, diff, torch.zeros((), dtype=torch.float32, device=diff.device))
    if not torch.isfinite(adv).all():
        raise FloatingPointError("OPSD sampled-token advantage is not finite on some response token")
    return adv


def teacher_response_logits(
    model: torch.nn.Module,
    teacher_prompt_ids: Sequence[Sequence[int]],
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    pad_token_id: int,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Teacher logits at the positions that predict each response token, from the privileged inputs.

    Runs ``model`` (already under the teacher's weights and ``no_grad``) on teacher prompt + response batches of
    samples, keeping only the logits of the response positions (``logits_to_keep``).

    Args:
        model: a causal LM (Hugging Face signature, accepts ``logits_to_keep``).
        teacher_prompt_ids: B lists of privileged prompt token ids.
        responses: `(B, R)` student response ids (right padded).
        response_mask: `(B, R)` 1 on response tokens.
        pad_token_id: padding id.
        max_tokens: at most this many kept positions (samples x R) per forward; None = one forward.

    Returns:
        `(B, R, V)` teacher logits (model dtype); row ``[i, j]`` predicts ``responses[i, j]``.
    """
    batch, width = responses.shape
    per_forward = batch if max_tokens is None else max(1, max_tokens // max(width, 1))
    outs = []
    for start in range(0, batch, per_forward):
        end = min(start + per_forward, batch)
        tb = build_teacher_batch(
            teacher_prompt_ids[start:end], responses[start:end], response_mask[start:end], pad_token_id
        )
        keep = torch.arange(width, device=responses.device) + (tb["prompt_width"] - 1)
        out = model(
            input_ids=tb["input_ids"],
            attention_mask=tb["attention_mask"],
            position_ids=tb["position_ids"],
            use_cache=False,
            logits_to_keep=keep,
        )
        logits = out.logits if hasattr(out, "logits") else out[0]
        if logits.shape[1] != width:  # a model without `logits_to_keep` support returns every position
            logits = logits[:, keep]
        outs.append(logits)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # cat would copy even a single tensor


def opsd_metrics(
    divergence: torch.Tensor | None,
    clipped: torch.Tensor | None,
    teacher_token_log_probs: torch.Tensor,
    student_token_log_probs: torch.Tensor,
    has_context: torch.Tensor,
    num_samples_with_context: int,
    num_samples: int,
) -> dict[str, float]:
    """OPSD metrics over the response tokens of one (micro-)batch.

    Args:
        divergence: `(N,)` per-token divergence (None for ``sampled``).
        clipped: `(N,)` bool clip activations (None for ``sampled``).
        teacher_token_log_probs, student_token_log_probs: `(N,)` log-probs of the sampled tokens.
        has_context: `(N,)` bool, tokens of samples with a privileged context (the others carry no loss).
        num_samples_with_context, num_samples: counts over samples.

    Returns:
        ``opsd/divergence_mean`` (mean over tokens with context), ``opsd/sampled_gap_mean`` (mean of
        teacher - student on the sampled token), ``opsd/context_fraction`` (samples), ``opsd/clip_rate``
        (fraction of tokens whose divergence the clip lowered).
    """
    ctx = has_context.bool()
    n = int(ctx.sum())
    metrics = {"opsd/context_fraction": num_samples_with_context / max(num_samples, 1)}
    gap = (teacher_token_log_probs.detach().float() - student_token_log_probs.detach().float())[ctx]
    metrics["opsd/sampled_gap_mean"] = float(gap.mean()) if n else 0.0
    if divergence is not None:
        metrics["opsd/divergence_mean"] = float(divergence.detach()[ctx].mean()) if n else 0.0
        metrics["opsd/clip_rate"] = float(clipped[ctx].float().mean()) if n and clipped is not None else 0.0
    for key, value in metrics.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"OPSD metric {key} is not finite ({value})")
    return metrics


def opsd_response_divergences(
    student_rows: Sequence[torch.Tensor],
    teacher_rows: Sequence[torch.Tensor],
    params: OPSDLossParams,
    logits_temperature: float = 1.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-token ``full``/``topk`` divergences of each sample from its response rows of logits.

    Each sample is one call on a view of its rows (no copy of the student's logits), chunked over positions.

    Args:
        student_rows: per sample `(r_i, V)` student logits predicting its r_i response tokens (differentiable),
            already divided by ``logits_temperature`` (veRL's actor scales them by the rollout temperature).
        teacher_rows: per sample `(r_i, V)` raw teacher logits at the same positions (constants).
        params: loss settings; the distillation temperature ``params.temperature`` applies to the raw logits.
        logits_temperature: temperature the student rows were already divided by (> 0).

    Returns:
        (divergences, clipped): per sample `(r_i,)` float32 divergences and `(r_i,)` bool clip activations.
    """
    if len(student_rows) != len(teacher_rows):
        raise ValueError(f"got {len(student_rows)} student and {len(teacher_rows)} teacher samples")
    if not logits_temperature > 0:
        raise ValueError(f"logits_temperature must be > 0, got {logits_temperature!r}")
    # (s / T_r) / (T_d / T_r) = s / T_d: scale the constant teacher side instead of copying the student's logits.
    scaled = OPSDLossParams(
        loss=params.loss,
        beta=params.beta,
        temperature=params.temperature / logits_temperature,
        pointwise_clip=params.pointwise_clip,
        topk=params.topk,
        chunk_size=params.chunk_size,
    )
    divs, clips = [], []
    for s_rows, t_rows in zip(student_rows, teacher_rows, strict=True):
        t_scaled = t_rows.detach().float() / logits_temperature if logits_temperature != 1.0 else t_rows.detach()
        div, clipped = opsd_token_divergence(s_rows, t_scaled, scaled)
        divs.append(div)
        clips.append(clipped)
    return divs, clips
