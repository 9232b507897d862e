"""Full-vocabulary divergences for OPSD (docs/objectives.md section 5): generalized JSD, chunked and top-k.

Convention (TRL GKD): ``beta = 0`` is KL(teacher || student), ``beta = 1`` is KL(student || teacher), otherwise
``beta * KL(T || M) + (1 - beta) * KL(S || M)`` with the mixture ``M = beta * T + (1 - beta) * S`` in probability
space. Both logits are divided by ``temperature`` first. Each per-(position, vocab) term is clamped from above at
``pointwise_clip`` (when given) before the sum over the vocabulary; a position is flagged as clipped when one of
its terms is above the clip (the clamp lowered its sum), found in the same pass. The teacher side is a constant (no
gradient).
"""

from __future__ import annotations

import math

import torch

__all__ = ["generalized_jsd", "topk_generalized_jsd"]


def _check_gjsd_args(beta: float, temperature: float, pointwise_clip: float | None, chunk_size: int | None) -> None:
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a finite number in [0, 1], got {beta!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if pointwise_clip is not None and (not isinstance(pointwise_clip, (int, float)) or math.isnan(pointwise_clip)):
        raise ValueError(f"pointwise_clip must be None (off) or a number, got {pointwise_clip!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None (no chunking) or an int >= 1, got {chunk_size!r}")


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-entry terms ``p * (log p - log q)``, 0 where ``p == 0`` (so ``-inf`` log-probs never make NaN).

    Args:
        log_p: `(N, V)` float32 log-probabilities of the first distribution.
        log_q: `(N, V)` float32 log-probabilities of the second distribution.

    Returns:
        `(N, V)` float32 terms.
    """
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    return p * diff


def _log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 log-softmax of both sides after dividing by ``temperature``.

    Args:
        student_logits: `(N, V)` (any float dtype; gradients flow through).
        teacher_logits: `(N, V)` (treated as constants).

    Returns:
        (log_s, log_t): `(N, V)` float32 each.
    """
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return log_s, log_t


def _gjsd_terms(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-(position, vocab) generalized JSD terms before the clip (their row sums are the divergences).

    Args:
        log_s, log_t: `(N, V)` float32 student / teacher log-probabilities.

    Returns:
        `(N, V)` float32 terms.
    """
    if beta == 0:
        return _kl_terms(log_t, log_s)
    if beta == 1:
        return _kl_terms(log_s, log_t)
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    return beta * _kl_terms(log_t, log_m) + (1.0 - beta) * _kl_terms(log_s, log_m)


def _clipped_rows(terms: torch.Tensor, pointwise_clip: float | None) -> torch.Tensor:
    """Where the pointwise clip lowers a row's sum: some term of the row is above the clip.

    Args:
        terms: `(N, V)` per-entry terms before the clip.

    Returns:
        `(N,)` bool; all False when the clip is off.
    """
    if pointwise_clip is None:
        return torch.zeros(terms.shape[0], dtype=torch.bool, device=terms.device)
    return terms.detach().amax(dim=-1) > pointwise_clip


def _gjsd_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    temperature: float,
    pointwise_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized JSD of each row, summed over the last dimension, and its clip flags, from one pass in float32.

    Args:
        student_logits: `(N, V)` student logits (any float dtype; gradients flow through).
        teacher_logits: `(N, V)` teacher logits (treated as constants).

    Returns:
        rows: `(N,)` float32 per-row divergence.
        clipped: `(N,)` bool, True where some term of the row was above ``pointwise_clip`` (clamped).
    """
    terms = _gjsd_terms(*_log_probs(student_logits, teacher_logits, temperature), beta)
    clipped = _clipped_rows(terms, pointwise_clip)
    if pointwise_clip is not None:
        terms = terms.clamp(max=pointwise_clip)
    return terms.sum(dim=-1), clipped


def _gjsd_rows_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    temperature: float,
    pointwise_clip: float | None,
) -> torch.Tensor:
    """Analytic gradient of :func:`_gjsd_rows` w.r.t. the student logits, one row-sum per row.

    With ``c_v`` the per-entry term and ``active_v = [c_v <= clip]`` (clamp's gradient), ``d c_v / d p_S,v`` is
    ``(1 - beta) * (log p_S,v - log M_v)`` for the mixture, ``-p_T,v / p_S,v`` at beta 0 and
    ``log p_S,v - log p_T,v + 1`` at beta 1; through the softmax,
    ``dL/dz = (p_S * g - p_S * sum(p_S * g)) / temperature`` with ``g_v = active_v * d c_v / d p_S,v``.

    Args:
        student_logits: `(N, V)`; teacher_logits: `(N, V)`.

    Returns:
        `(N, V)` float32 gradient of each row's divergence w.r.t. that row's student logits.
    """
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    p_s = log_s.exp()
    zero = torch.zeros((), dtype=torch.float32, device=log_s.device)
    if beta == 0:
        psg = -log_t.exp()
    elif beta == 1:
        psg = p_s * (torch.where(p_s > 0, log_s - log_t, zero) + 1.0)
    else:
        log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
        psg = (1.0 - beta) * _kl_terms(log_s, log_m)
    if pointwise_clip is not None:
        psg = torch.where(_gjsd_terms(log_s, log_t, beta) <= pointwise_clip, psg, zero)
    return (psg - p_s * psg.sum(dim=-1, keepdim=True)) / temperature


def _forward_kl_rows_inplace(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, pointwise_clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_gjsd_rows` at ``beta = 0`` (same operations, same values) without autograd, reusing its buffers.

    Args:
        student_logits: `(N, V)`; teacher_logits: `(N, V)`.

    Returns:
        `(N,)` float32 per-row KL(teacher || student) and `(N,)` bool clip flags.
    """
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    p_t = log_t.exp()
    diff = log_t.sub_(log_s)
    terms = torch.where(p_t > 0, diff, torch.zeros((), dtype=diff.dtype, device=diff.device), out=diff).mul_(p_t)
    clipped = _clipped_rows(terms, pointwise_clip)
    if pointwise_clip is not None:
        terms.clamp_(max=pointwise_clip)
    return terms.sum(dim=-1), clipped


def _forward_kl_grad_inplace(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    pointwise_clip: float | None,
    grad_out: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """:func:`_gjsd_rows_grad` at ``beta = 0`` times ``grad_out`` (same values), written into ``out``.

    With ``g_v = p_T,v * active_v`` the gradient is ``(p_S * sum(g) - g) / temperature``; at ``p_T,v = 0`` the
    entry's activity does not matter (``g_v = 0`` either way), so no masking of ``0 * -inf`` is needed.

    Args:
        student_logits, teacher_logits: `(N, V)`; grad_out: `(N, 1)` float32; out: `(N, V)` destination.
    """
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    g = log_t.exp()
    if pointwise_clip is not None:
        terms = torch.where(g > 0, log_t.sub_(log_s), torch.zeros((), dtype=g.dtype, device=g.device), out=log_t)
        g.mul_(terms.mul_(g).le_(pointwise_clip))
    total = g.sum(dim=-1, keepdim=True)
    grad = log_s.exp_().mul_(total).sub_(g).div_(temperature)
    torch.mul(grad, grad_out, out=out)


class _ChunkedGJSD(torch.autograd.Function):
    """Row-chunked generalized JSD whose backward recomputes each chunk (checkpoint style, analytic gradient).

    The forward keeps no `(N, V)` intermediate and returns the clip flags of the same pass; the backward
    recomputes one chunk at a time and writes its gradient, so the memory needed beyond the inputs and the
    returned gradient is O(chunk_size x V). Rows are independent, so every row's value is that of the unchunked
    computation, and its gradient that of autograd through it up to float32 rounding.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, beta, temperature, pointwise_clip, chunk_size):
        n = student_logits.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=student_logits.device)
        clipped = torch.empty(n, dtype=torch.bool, device=student_logits.device)
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                s, t = student_logits[start:end], teacher_logits[start:end]
                if beta == 0:
                    out[start:end], clipped[start:end] = _forward_kl_rows_inplace(s, t, temperature, pointwise_clip)
                else:
                    out[start:end], clipped[start:end] = _gjsd_rows(s, t, beta, temperature, pointwise_clip)
        ctx.save_for_backward(student_logits, teacher_logits)
        ctx.args = (beta, temperature, pointwise_clip, chunk_size)
        ctx.mark_non_differentiable(clipped)
        return out, clipped

    @staticmethod
    def backward(ctx, grad_out, _grad_clipped):
        student_logits, teacher_logits = ctx.saved_tensors
        beta, temperature, pointwise_clip, chunk_size = ctx.args
        grad_student = None
        if ctx.needs_input_grad[0]:
            grad_student = torch.empty_like(student_logits)
            n = student_logits.shape[0]
            with torch.no_grad():
                for start in range(0, n, chunk_size):
                    end = min(start + chunk_size, n)
                    if beta == 0:
                        _forward_kl_grad_inplace(
                            student_logits[start:end],
                            teacher_logits[start:end],
                            temperature,
                            pointwise_clip,
                            grad_out[start:end, None].float(),
                            grad_student[start:end],
                        )
                        continue
                    grad = _gjsd_rows_grad(
                        student_logits[start:end], teacher_logits[start:end], beta, temperature, pointwise_clip
                    )
                    grad_student[start:end] = grad.mul_(grad_out[start:end, None].float())
        return grad_student, None, None, None, None, None


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    pointwise_clip: float | None = None,
    chunk_size: int | None = None,
    return_clipped: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-position generalized Jensen-Shannon divergence over the full vocabulary (docs/objectives.md section 5).

    ``beta = 0``: KL(teacher || student); ``beta = 1``: KL(student || teacher); otherwise
    ``beta * KL(T || M) + (1 - beta) * KL(S || M)``, ``M = beta * T + (1 - beta) * S``. Matches TRL's
    ``GKDTrainer.generalized_jsd_loss`` (``reduction="none"`` summed over the vocabulary) when the clip is off.

    Args:
        student_logits: `(..., V)` student logits; differentiable (any float dtype, computed in float32).
        teacher_logits: `(..., V)` teacher logits, same shape; treated as constants. ``-inf`` entries are allowed.
        beta: mixture weight in [0, 1].
        temperature: > 0; both logits are divided by it first.
        pointwise_clip: upper clamp of each per-(position, vocab) term before summing over V; None = off.
        chunk_size: positions per chunk; None = all at once. With a chunk size the value and the gradient are
            those of the unchunked computation (rows are independent; the backward uses the closed-form gradient,
            equal to autograd's up to float32 rounding), and the memory needed beyond the inputs (and the gradient
            itself) is O(chunk_size x V) because the backward recomputes one chunk at a time. This holds also when
            all positions fit in one chunk: the graph keeps only the inputs, so calls whose graphs wait for one
            backward (one per sample in the OPSD loss) leave no `(N, V)` intermediates behind.
        return_clipped: also return where the clip lowered a position's divergence, from the same pass over the
            vocabulary (no second pass without the clip).

    Returns:
        `(...)` float32 divergence per position (summed over the vocabulary; no reduction over positions); with
        ``return_clipped``, also `(...)` bool: True where some term of the position was above ``pointwise_clip``
        (so the clamp lowered its sum), all False when the clip is off.
    """
    _check_gjsd_args(beta, temperature, pointwise_clip, chunk_size)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the vocabulary)")
    lead_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    student_2d = student_logits.reshape(-1, vocab)
    teacher_2d = teacher_logits.detach().reshape(-1, vocab)
    needs_graph = torch.is_grad_enabled() and student_2d.requires_grad
    if chunk_size is None or (chunk_size >= student_2d.shape[0] and not needs_graph):
        rows, clipped = _gjsd_rows(student_2d, teacher_2d, float(beta), float(temperature), pointwise_clip)
    else:
        rows, clipped = _ChunkedGJSD.apply(
            student_2d, teacher_2d, float(beta), float(temperature), pointwise_clip, chunk_size
        )
    if return_clipped:
        return rows.reshape(lead_shape), clipped.reshape(lead_shape)
    return rows.reshape(lead_shape)


def topk_generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    k: int = 50,
    beta: float = 0.5,
    temperature: float = 1.0,
    pointwise_clip: float | None = None,
    teacher_topk_values: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    return_clipped: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Generalized JSD restricted to the teacher's top-k ids, both sides renormalised over those ids.

    Give either the full ``teacher_logits`` (the top-``k`` ids are taken from them) or the teacher's own
    top-k as ``teacher_topk_values`` (logits or log-probs: a per-position constant shift cancels in the
    renormalisation) with ``teacher_topk_ids`` (what a teacher server returns). The student's logits are
    gathered at the same ids, divided by ``temperature`` and renormalised over the k ids, and the generalized
    JSD of :func:`generalized_jsd` is taken between the two k-way distributions.

    Args:
        student_logits: `(..., V)` student logits; differentiable.
        teacher_logits: `(..., V)` teacher logits (constants), or None when the top-k values/ids are given.
        k: number of teacher ids, >= 1 (ignored when ``teacher_topk_ids`` is given).
        beta, temperature, pointwise_clip: as in :func:`generalized_jsd`.
        teacher_topk_values: `(..., k)` teacher logits or log-probs at ``teacher_topk_ids``.
        teacher_topk_ids: `(..., k)` int64 token ids.
        return_clipped: as in :func:`generalized_jsd` (flags over the k terms).

    Returns:
        `(...)` float32 divergence per position; with ``return_clipped``, also `(...)` bool clip flags.
    """
    _check_gjsd_args(beta, temperature, pointwise_clip, None)
    if teacher_logits is not None:
        if teacher_topk_values is not None or teacher_topk_ids is not None:
            raise ValueError("give either teacher_logits or (teacher_topk_values, teacher_topk_ids), not both")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= teacher_logits.shape[-1]:
            raise ValueError(f"k must be an int in [1, vocab size {teacher_logits.shape[-1]}], got {k!r}")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} "
                f"and {tuple(teacher_logits.shape)}"
            )
        teacher_topk_values, teacher_topk_ids = teacher_logits.detach().topk(k, dim=-1)
    elif teacher_topk_values is None or teacher_topk_ids is None:
        raise ValueError("give teacher_logits, or both teacher_topk_values and teacher_topk_ids")
    if teacher_topk_values.shape != teacher_topk_ids.shape or teacher_topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher_topk_values/teacher_topk_ids must have shape (..., k) matching student_logits' leading "
            f"dimensions {tuple(student_logits.shape[:-1])}, got {tuple(teacher_topk_values.shape)} and "
            f"{tuple(teacher_topk_ids.shape)}"
        )
    student_k = student_logits.gather(-1, teacher_topk_ids.long())
    kk = student_k.shape[-1]
    rows, clipped = _gjsd_rows(
        student_k.reshape(-1, kk),
        teacher_topk_values.detach().reshape(-1, kk),
        float(beta),
        float(temperature),
        pointwise_clip,
    )
    lead_shape = student_logits.shape[:-1]
    if return_clipped:
        return rows.reshape(lead_shape), clipped.reshape(lead_shape)
    return rows.reshape(lead_shape)
