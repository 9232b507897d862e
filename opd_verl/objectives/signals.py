"""Per-token learning signals: OPD and G-OPD / ExOPD (docs/objectives.md sections 1 and 2).

All tensors are `(B, T)`; results are float32, detached, and 0 wherever ``response_mask`` is 0 (also zeros inside
a response). Inputs are masked before any arithmetic (``checks.masked``), so ``-inf``/NaN at padding never reach
a result; a NaN/inf at a valid token raises ``ValueError`` naming the input and the rows.
"""

from __future__ import annotations

import torch

from opd_verl.objectives.checks import check_lam, check_same_shape, masked, valid_mask

__all__ = ["discrepancy", "opd_advantages", "gopd_advantages", "gopd_signal"]


def discrepancy(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Teacher-student discrepancy ``D_t = tch_t - s_t`` (section 3), 0 where the mask is 0.

    Args:
        student_logprobs: `(B, T)` student log-prob of each sampled token (recomputed ``old_log_probs``).
        teacher_logprobs: `(B, T)` teacher log-prob of the same tokens.
        response_mask: `(B, T)` 1 on response tokens, 0 elsewhere (zeros inside a response allowed).

    Returns:
        `(B, T)` float32, detached.
    """
    check_same_shape(response_mask, student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs)
    mask = valid_mask(response_mask)
    return masked("teacher_logprobs", teacher_logprobs, mask).sub_(masked("student_logprobs", student_logprobs, mask))


def opd_advantages(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """OPD advantage ``A_t = tch_t - s_t`` (section 1; minus the k1 estimate of KL(student || teacher)).

    Shapes as in :func:`discrepancy`. Also the OPSD sampled-token advantage when ``teacher_logprobs`` come
    from the privileged-context teacher.
    """
    return discrepancy(student_logprobs, teacher_logprobs, response_mask)


def gopd_signal(
    disc: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    lam: float | torch.Tensor,
    ref_logprobs: torch.Tensor | None,
) -> torch.Tensor:
    """``disc + (lam - 1) * (tch - ref)`` (= ``lam * tch + (1 - lam) * ref - s``), ``disc = tch - s``.

    ``disc`` and ``teacher`` are masked float32 `(B, T)` (``teacher`` is overwritten), ``mask`` the float 0/1
    mask, ``lam`` checked by :func:`~opd_verl.objectives.checks.check_lam`. Rows with ``lam == 1`` are ``disc``
    exactly and never read ``ref_logprobs``.
    """
    if isinstance(lam, float):
        if lam == 1.0:
            return disc
        if ref_logprobs is None:
            raise ValueError(f"lam={lam} != 1 needs ref_logprobs (a reference model's log-probs); got None")
        return teacher.sub_(masked("ref_logprobs", ref_logprobs, mask)).mul_(lam - 1.0).add_(disc)
    lam = lam.to(disc.device)
    extended = (lam != 1.0).float()[:, None]
    if not bool(extended.any()):
        return disc
    if ref_logprobs is None:
        raise ValueError(f"lam={lam.tolist()} != 1 needs ref_logprobs (a reference model's log-probs); got None")
    ref = masked("ref_logprobs", ref_logprobs, mask * extended)
    # rows with lam == 1 add (tch - 0) * 0 = 0 exactly
    return teacher.sub_(ref).mul_((lam - 1.0)[:, None]).add_(disc)


def gopd_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    lam: float | torch.Tensor = 1.0,
    ref_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """G-OPD advantage ``A_t = lam * (tch_t - ref_t) - (s_t - ref_t)`` (section 2); ``lam > 1`` is ExOPD.

    ``lam == 1`` is exactly OPD, ``tch_t - s_t``: the reference is not read at all in those rows (it may be
    None, or non-finite there).

    Args:
        student_logprobs: `(B, T)` student log-probs of the sampled tokens (recomputed ``old_log_probs``).
        teacher_logprobs: `(B, T)` teacher log-probs of the same tokens.
        response_mask: `(B, T)` 1 on response tokens.
        lam: reward scale, finite and > 0; a float, or a `(B,)` tensor of per-row values (multi-teacher).
        ref_logprobs: `(B, T)` reference log-probs (veRL's ``ref_log_prob``, or a reward-correction base
            model's); required when some ``lam != 1``.

    Returns:
        `(B, T)` float32 advantages, detached, 0 where the mask is 0.
    """
    check_same_shape(
        response_mask,
        student_logprobs=student_logprobs,
        teacher_logprobs=teacher_logprobs,
        ref_logprobs=ref_logprobs,
    )
    lam = check_lam(lam, response_mask.shape[0])
    mask = valid_mask(response_mask)
    teacher = masked("teacher_logprobs", teacher_logprobs, mask)
    disc = teacher - masked("student_logprobs", student_logprobs, mask)
    return gopd_signal(disc, teacher, mask, lam, ref_logprobs)
