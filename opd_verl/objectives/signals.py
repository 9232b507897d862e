"""Per-token learning signals: OPD and G-OPD / ExOPD (docs/objectives.md sections 1 and 2).

All tensors are `(B, T)`; results are float32, detached, and 0 wherever ``response_mask`` is 0 (also zeros
inside a response). Inputs are masked before any arithmetic (:func:`~opd_verl.objectives.rows.load_masked`), so
``-inf``/NaN at padding never reach the result; a non-finite value at a valid token raises ``ValueError`` naming
the input instead of leaking. The work runs over row blocks (:mod:`opd_verl.objectives.rows`).
"""

from __future__ import annotations

import math

import torch

from opd_verl.objectives.rows import RowBuffers, blocked_output, load_mask, load_masked

__all__ = [
    "SIGNAL_BUFFERS",
    "discrepancy",
    "opd_advantages",
    "gopd_advantages",
    "check_same_shape",
    "check_lam",
    "check_ref_given",
    "load_signal_block",
    "signal_rows",
]


def check_same_shape(response_mask: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the argument when a given tensor's shape differs from ``response_mask``'s."""
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be 2-D (batch, response_len), got shape {tuple(response_mask.shape)}")
    for name, value in tensors.items():
        if value is not None and value.shape != response_mask.shape:
            raise ValueError(
                f"{name} must have the shape of response_mask {tuple(response_mask.shape)}, got {tuple(value.shape)}"
            )


def signal_rows(
    out: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    lam: float | torch.Tensor,
    ref: torch.Tensor | None,
) -> torch.Tensor:
    """``out <- lam * (teacher - ref) - (student - ref)`` for one row block of loaded log-probs.

    The inputs are float32, finite, and 0 at masked positions (:func:`~opd_verl.objectives.rows.load_masked`),
    so the result is 0 there too. ``lam == 1`` computes ``teacher - student`` without touching ``ref``; with a
    `(R,)` ``lam``, ``ref`` must be 0 in the rows where ``lam == 1`` (then ``1 * teacher + 0 - student`` is exactly
    ``teacher - student``).

    Args:
        out: `(R, T)` float32 result.
        student, teacher: `(R, T)` float32.
        lam: a float, or `(R,)` float32 per-row values.
        ref: `(R, T)` float32, or None when every ``lam`` is 1.

    Returns:
        ``out``.
    """
    if isinstance(lam, float):
        if lam == 1.0:
            return torch.sub(teacher, student, out=out)
        return torch.mul(teacher, lam, out=out).add_(ref, alpha=1.0 - lam).sub_(student)
    torch.mul(teacher, lam[:, None], out=out)
    return out.add_(ref * (1.0 - lam)[:, None]).sub_(student)


SIGNAL_BUFFERS = ("mask", "ref_mask", "student", "teacher", "ref")


def load_signal_block(
    bufs: RowBuffers,
    start: int,
    end: int,
    response_mask: torch.Tensor,
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    lam: float | torch.Tensor,
    ref_logprobs: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | torch.Tensor, torch.Tensor | None]:
    """Load rows ``start:end`` of the mask and log-probs into ``bufs`` (names :data:`SIGNAL_BUFFERS`).

    The reference is read only where some ``lam != 1`` (per row with a tensor ``lam``).

    Returns:
        ``(mask_f, student, teacher, row_lam, ref)``: `(R, T)` float32 views (``ref`` None when not needed), and
        ``lam`` for these rows; arguments for :func:`signal_rows`. Also ``sums``: the sums of the loaded
        ``student``, ``teacher`` and ``ref`` (0 when not read).
    """
    n = end - start
    mask = response_mask[start:end]
    mask_f = bufs["mask", n]
    load_mask(mask_f, mask, bufs.full("mask", n))
    sums = {"ref": 0.0}
    for key, src in (("student", student_logprobs), ("teacher", teacher_logprobs)):
        sums[key] = load_masked(bufs[key, n], src[start:end], mask_f, mask, f"{key}_logprobs", start, bufs.full(key, n))
    row_lam = lam if isinstance(lam, float) else lam[start:end]
    ref = None
    if isinstance(row_lam, torch.Tensor):
        ref = bufs["ref", n].zero_()
        extended = (row_lam != 1.0).float()[:, None]
        if ref_logprobs is not None and bool(extended.any()):
            ref_mask = torch.mul(mask_f, extended, out=bufs["ref_mask", n])
            valid = mask.bool() & (extended > 0)
            sums["ref"] = load_masked(
                ref, ref_logprobs[start:end], ref_mask, valid, "ref_logprobs", start, bufs.full("ref", n)
            )
    elif row_lam != 1.0:
        ref = bufs["ref", n]
        sums["ref"] = load_masked(
            ref, ref_logprobs[start:end], mask_f, mask, "ref_logprobs", start, bufs.full("ref", n)
        )
    return mask_f, bufs["student", n], bufs["teacher", n], row_lam, ref, sums


def _signal(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    lam: float | torch.Tensor,
    ref_logprobs: torch.Tensor | None,
) -> torch.Tensor:
    """G-OPD signal over row blocks (see :func:`gopd_advantages`); arguments already validated."""
    out, blocks, bufs = blocked_output(response_mask.shape, student_logprobs.device, SIGNAL_BUFFERS)
    for start, end in blocks:
        loaded = load_signal_block(
            bufs, start, end, response_mask, student_logprobs, teacher_logprobs, lam, ref_logprobs
        )
        signal_rows(out[start:end], *loaded[1:5])
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
        return _signal(student_logprobs, teacher_logprobs, response_mask, 1.0, None)


def opd_advantages(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """OPD advantage ``A_t = tch_t - s_t`` (section 1; minus the k1 estimate of KL(student || teacher)).

    Shapes as in :func:`discrepancy`. Also the OPSD sampled-token advantage when ``teacher_logprobs`` come
    from the privileged-context teacher.
    """
    return discrepancy(student_logprobs, teacher_logprobs, response_mask)


def check_lam(lam: float | torch.Tensor, batch: int) -> float | torch.Tensor:
    if isinstance(lam, torch.Tensor):
        if lam.dim() == 0:
            return check_lam(float(lam), batch)
        if lam.shape != (batch,):
            raise ValueError(f"lam as a tensor must have shape (batch,) = ({batch},), got {tuple(lam.shape)}")
        lam_f = lam.detach().float()
        if not bool((torch.isfinite(lam_f) & (lam_f > 0)).all()):
            raise ValueError(f"lam must be finite and > 0 in every row, got {lam.tolist()}")
        return lam_f
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite number > 0 (1 = OPD, > 1 = ExOPD), got {lam!r}")
    return float(lam)


def check_ref_given(lam: float | torch.Tensor, ref_logprobs: torch.Tensor | None) -> None:
    """Raise ``ValueError`` when some ``lam != 1`` (checked by :func:`check_lam`) and ``ref_logprobs`` is None."""
    if ref_logprobs is None and (bool((lam != 1.0).any()) if isinstance(lam, torch.Tensor) else lam != 1.0):
        shown = lam.tolist() if isinstance(lam, torch.Tensor) else lam
        raise ValueError(f"lam={shown} != 1 needs ref_logprobs (a reference model's log-probs); got None")


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
    check_ref_given(lam, ref_logprobs)
    with torch.no_grad():
        if isinstance(lam, torch.Tensor):
            lam = lam.to(student_logprobs.device)
        return _signal(student_logprobs, teacher_logprobs, response_mask, lam, ref_logprobs)
