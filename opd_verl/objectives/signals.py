"""Per-token learning signals: OPD and G-OPD / ExOPD (docs/objectives.md sections 1 and 2).

All tensors are `(B, T)`; results are float32, detached, and 0 wherever ``response_mask`` is 0 (also zeros
inside a response). Inputs are masked with ``torch.where`` before any arithmetic, so ``-inf``/NaN at padding
never reach the result; a non-finite value at a valid token raises ``ValueError`` instead of leaking.
"""

from __future__ import annotations

import math

import torch

__all__ = ["discrepancy", "opd_advantages", "gopd_advantages", "check_same_shape", "check_finite_at_valid"]


def check_same_shape(response_mask: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the argument when a given tensor's shape differs from ``response_mask``'s."""
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be 2-D (batch, response_len), got shape {tuple(response_mask.shape)}")
    for name, value in tensors.items():
        if value is not None and value.shape != response_mask.shape:
            raise ValueError(
                f"{name} must have the shape of response_mask {tuple(response_mask.shape)}, got {tuple(value.shape)}"
            )


def check_finite_at_valid(name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ``ValueError`` when ``values`` is NaN/inf at a position where ``mask`` is true.

    Args:
        values: `(B, T)` tensor.
        mask: `(B, T)` bool tensor.
    """
    bad = mask & ~torch.isfinite(values)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=-1)).flatten().tolist()[:8]
        raise ValueError(f"{name} has NaN/inf at {int(bad.sum())} valid response tokens (rows {rows})")


def _finalize(raw: torch.Tensor, mask: torch.Tensor, what: str) -> torch.Tensor:
    """0 where ``mask`` is false (whatever ``raw`` holds there: -inf/NaN at padding are fine); raise on NaN/inf
    at a valid position. ``raw`` is a fresh tensor and is overwritten in place (no `(B, T)` temporary); one sum
    stands for the finiteness check (a non-finite sum is then checked entry by entry)."""
    out = torch.where(mask, raw, torch.zeros((), dtype=raw.dtype, device=raw.device), out=raw)
    if not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
        check_finite_at_valid(what, out, mask)
    return out


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
    with torch.no_grad():
        raw = teacher_logprobs.float() - student_logprobs.float()
        return _finalize(raw, response_mask.bool(), "teacher_logprobs - student_logprobs")


def opd_advantages(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """OPD advantage ``A_t = tch_t - s_t`` (section 1; minus the k1 estimate of KL(student || teacher)).

    Shapes as in :func:`discrepancy`. Also the OPSD sampled-token advantage when ``teacher_logprobs`` come
    from the privileged-context teacher.
    """
    return discrepancy(student_logprobs, teacher_logprobs, response_mask)


def _check_lam(lam: float | torch.Tensor, batch: int) -> float | torch.Tensor:
    if isinstance(lam, torch.Tensor):
        if lam.dim() == 0:
            return _check_lam(float(lam), batch)
        if lam.shape != (batch,):
            raise ValueError(f"lam as a tensor must have shape (batch,) = ({batch},), got {tuple(lam.shape)}")
        lam_f = lam.detach().float()
        if not bool((torch.isfinite(lam_f) & (lam_f > 0)).all()):
            raise ValueError(f"lam must be finite and > 0 in every row, got {lam.tolist()}")
        return lam_f
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite number > 0 (1 = OPD, > 1 = ExOPD), got {lam!r}")
    return float(lam)


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
    lam = _check_lam(lam, response_mask.shape[0])
    mask = response_mask.bool()
    what = "G-OPD advantage (teacher/ref/student log-probs)"
    with torch.no_grad():
        student = student_logprobs.float()
        teacher = teacher_logprobs.float()
        if isinstance(lam, float):
            if lam == 1.0:
                return _finalize(teacher - student, mask, "teacher_logprobs - student_logprobs")
            if ref_logprobs is None:
                raise ValueError(f"lam={lam} != 1 needs ref_logprobs (a reference model's log-probs); got None")
            raw = (teacher * lam).add_(ref_logprobs.float(), alpha=1.0 - lam).sub_(student)
            return _finalize(raw, mask, what)
        lam = lam.to(student.device)
        ext = lam[:, None] != 1.0
        if ref_logprobs is None:
            if bool(ext.any()):
                raise ValueError(f"lam != 1 in some rows ({lam.tolist()}) needs ref_logprobs; got None")
            ref = torch.zeros_like(student)
        else:
            ref = torch.where(mask & ext, ref_logprobs.float(), torch.zeros((), device=student.device))
        raw = lam[:, None] * teacher + (1.0 - lam[:, None]) * ref - student
        # rows with lam == 1 are OPD exactly (no rounding through lam * teacher + 0 * ref)
        raw = torch.where(ext, raw, teacher - student)
        return _finalize(raw, mask, what)
