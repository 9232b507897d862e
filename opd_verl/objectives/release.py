"""Prefix-Teach release rule (docs/objectives.md section 4): teacher margins, change point, release.

Every step is vectorised over rows and splits (cumulative sums, no Python loop over tokens or splits).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from opd_verl.objectives.signals import check_finite_at_valid, check_same_shape

__all__ = ["MARGIN_KINDS", "ReleaseResult", "topk_margin", "release_change_point", "apply_release", "release"]

MARGIN_KINDS = ("prob", "logprob")
_RSS_FLOOR = 1e-12


def topk_margin(teacher_logprobs_at_candidates: torch.Tensor, kind: str = "prob") -> torch.Tensor:
    """Teacher margin on the student's top-K candidate set: top-1 minus top-2 (section 4 step 1).

    Args:
        teacher_logprobs_at_candidates: `(B, T, K)` teacher log-probs at the student's K highest-ranked ids,
            K >= 2.
        kind: ``prob`` (default, **[our choice]**): the teacher's probabilities renormalised over the K
            candidates, margin in [0, 1]; ``logprob``: difference of the raw log-probs, >= 0.

    Returns:
        `(B, T)` float32 margins (detached).
    """
    if kind not in MARGIN_KINDS:
        raise ValueError(f"kind must be one of {list(MARGIN_KINDS)}, got {kind!r}")
    x = teacher_logprobs_at_candidates
    if x.dim() != 3 or x.shape[-1] < 2:
        raise ValueError(f"teacher_logprobs_at_candidates must have shape (B, T, K) with K >= 2, got {tuple(x.shape)}")
    x = x.detach().float()
    if kind == "prob":
        x = torch.softmax(x, dim=-1)
    top2 = x.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def _check_rule_args(min_segment: int, penalty: float, min_gain: float) -> None:
    if isinstance(min_segment, bool) or not isinstance(min_segment, int) or min_segment < 1:
        raise ValueError(f"min_segment must be an int >= 1, got {min_segment!r}")
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty) or penalty < 0:
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty!r}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or math.isnan(min_gain):
        raise ValueError(f"min_gain must be a number, got {min_gain!r}")


class _ChangePoints(NamedTuple):
    tau: torch.Tensor  # (B,) int64 index of the first right-side sentence of the best split (0 where none allowed)
    gain: torch.Tensor  # (B,) float64 BIC gain of the best split, -inf where no split is allowed
    accepted: torch.Tensor  # (B,) bool


def _change_points(x: torch.Tensor, n: torch.Tensor, min_segment: int, penalty: float, min_gain: float):
    """Single downward change point of each row, profiled RSS-BIC from cumulative sums (section 4 step 3).

    Args:
        x: `(B, J)` float64 sentence scores; entries at j >= n[b] are ignored.
        n: `(B,)` int64 number of sentences J_b of each row.

    Returns:
        _ChangePoints of `(B,)` tensors.
    """
    if x.shape[1] == 0:
        x = x.new_zeros(x.shape[0], 1)
    batch, width = x.shape
    device = x.device
    j_idx = torch.arange(width, device=device)
    valid = j_idx[None, :] < n[:, None]
    nf = n.double()
    x = torch.where(valid, x, torch.zeros((), dtype=torch.float64, device=device))
    # centre each row first: the same RSS values, less cancellation in Q - S^2 / n
    x = torch.where(valid, x - x.sum(-1, keepdim=True) / nf.clamp_min(1)[:, None], x.new_zeros(()))
    s = x.cumsum(-1)
    q = (x * x).cumsum(-1)
    s_tot = s[:, -1:]
    q_tot = q[:, -1:]
    # split tau = j + 1 puts sentences [0, tau) on the left
    n_left = (j_idx + 1).double()[None, :]
    n_right = nf[:, None] - n_left
    rss_left = (q - s * s / n_left).clamp_min(0.0)
    rss_right = ((q_tot - q) - (s_tot - s) ** 2 / n_right.clamp_min(1.0)).clamp_min(0.0)
    rss1 = (rss_left + rss_right).clamp_min(_RSS_FLOOR)
    allowed = (n_left >= min_segment) & (n_right >= min_segment)
    inf = torch.full((), math.inf, dtype=torch.float64, device=device)
    rss1 = torch.where(allowed, rss1, inf)
    best = rss1.min(dim=-1, keepdim=True).values
    # earliest split among exact ties
    first = torch.where(rss1 == best, j_idx[None, :], width).min(dim=-1).values.clamp_max(width - 1)
    has_split = allowed.any(dim=-1)
    rss0 = (q_tot[:, 0] - s_tot[:, 0] ** 2 / nf.clamp_min(1)).clamp_min(_RSS_FLOOR)
    rss1_best = best[:, 0]
    log_j = torch.log(nf.clamp_min(1))
    gain = nf * torch.log(rss0 / torch.where(has_split, rss1_best, rss0)) - penalty * log_j
    gain = torch.where(has_split, gain, -inf)
    s_left = s.gather(1, first[:, None])[:, 0]
    left_n = (first + 1).double()
    mean_left = s_left / left_n
    mean_right = (s_tot[:, 0] - s_left) / (nf - left_n).clamp_min(1.0)
    down = mean_right < mean_left
    accepted = has_split & (gain > min_gain) & down
    tau = torch.where(has_split, first + 1, torch.zeros_like(first))
    return _ChangePoints(tau=tau, gain=gain, accepted=accepted)


def release_change_point(
    sentence_scores: torch.Tensor, min_segment: int = 2, penalty: float = 2.0, min_gain: float = 0.0
) -> tuple[int | None, float]:
    """Single downward change point of one rollout's sentence scores (section 4 step 3).

    For each split tau (left ``x[:tau]``, right ``x[tau:]``, each >= ``min_segment`` sentences), RSS1(tau) is
    the within-side sum of squared deviations; RSS0 uses one mean; every RSS is clamped to >= 1e-12. The best
    split tau* has the smallest RSS1 (earliest on ties) and
    ``gain = J * ln(RSS0 / RSS1(tau*)) - penalty * ln(J)``. It is accepted iff ``gain > min_gain`` and the mean
    right of tau* is below the mean left of it. Computed in float64 from cumulative sums.

    Args:
        sentence_scores: `(J,)` mean teacher margin per sentence, finite.
        min_segment: minimum sentences on each side, >= 1.
        penalty: multiplier of ln(J), >= 0 (**[our choice]** default 2: a second mean and the change location).
        min_gain: acceptance threshold on the gain.

    Returns:
        ``(tau, gain)``: ``tau`` the index of the first released sentence when accepted, else None; ``gain``
        the BIC gain of the best split, ``-inf`` when J < 2 * min_segment (no split allowed).
    """
    _check_rule_args(min_segment, penalty, min_gain)
    if sentence_scores.dim() != 1:
        raise ValueError(f"sentence_scores must be 1-D (J,), got shape {tuple(sentence_scores.shape)}")
    x = sentence_scores.detach().double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("sentence_scores must be finite")
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    cp = _change_points(x[None, :], n, min_segment, float(penalty), float(min_gain))
    gain = float(cp.gain[0])
    return (int(cp.tau[0]) if bool(cp.accepted[0]) else None), gain


class ReleaseResult(NamedTuple):
    """Outputs of :func:`release`; every field is a tensor over rows except ``advantages``."""

    advantages: torch.Tensor  # (B, T) float32
    release_index: torch.Tensor  # (B,) int64 first zeroed token position, T when nothing is released
    accepted: torch.Tensor  # (B,) bool
    gain: torch.Tensor  # (B,) float64, -inf where J < 2 * min_segment
    n_sentences: torch.Tensor  # (B,) int64
    n_valid: torch.Tensor  # (B,) int64
    n_kept: torch.Tensor  # (B,) int64


def _release_general(
    advantages: torch.Tensor,
    mask: torch.Tensor,
    sentence_ids: torch.Tensor,
    margins: torch.Tensor,
    min_segment: int,
    penalty: float,
    min_gain: float,
) -> ReleaseResult:
    """Release rule for any sentence ids (masked positions may hold anything); ``mask`` is `(B, T)` bool."""
    device = advantages.device
    batch, length = mask.shape
    zero32 = torch.zeros((), dtype=torch.float32, device=device)
    with torch.no_grad():
        marg = torch.where(mask, margins.double(), torch.zeros((), dtype=torch.float64, device=device))

        # step 2: compact sentence index of every valid token (ids may skip values; only order matters)
        ids = sentence_ids.long()
        minus_one = torch.full((), -1, dtype=torch.int64, device=device)
        running = torch.where(mask, ids, minus_one).cummax(dim=-1).values
        prev = torch.nn.functional.pad(running[:, :-1], (1, 0), value=-1)
        if bool((mask & ((ids < prev) | (ids < 0))).any()):
            raise ValueError("sentence_ids must be >= 0 and non-decreasing over the valid tokens of each row")
        starts = mask & (ids > prev)
        # non-decreasing along each row (-1 before the first valid token)
        compact = starts.long().cumsum(dim=-1) - 1
        n_sent = compact[:, -1] + 1 if length else torch.zeros(batch, dtype=torch.int64, device=device)
        width = max(int(n_sent.max()) if batch else 0, 1)
        slot = compact.clamp_min(0)
        sums = torch.zeros(batch, width, dtype=torch.float64, device=device).scatter_add_(1, slot, marg)
        counts = torch.zeros(batch, width, dtype=torch.float64, device=device).scatter_add_(1, slot, mask.double())
        if not bool(torch.isfinite(sums).all()):
            check_finite_at_valid("margins", marg, mask)
        x = sums / counts.clamp_min(1.0)

        # step 3: change point per row
        cp = _change_points(x, n_sent, min_segment, penalty, min_gain)

        # step 4: first token of sentence tau* = number of positions before it (compact is non-decreasing)
        first_tok = (compact < cp.tau[:, None]).sum(dim=-1)
        release_index = torch.where(cp.accepted, first_tok, torch.full_like(first_tok, length))

        # step 5: keep the prefix, rescale it to the row's loss mass
        positions = torch.arange(length, device=device)
        kept = mask & (positions[None, :] < release_index[:, None])
        n_valid = mask.sum(dim=-1)
        n_kept = kept.sum(dim=-1)
        scale = n_valid.float() / n_kept.clamp_min(1).float()
        out = torch.where(kept, advantages.float() * scale[:, None], zero32)
        if not bool(torch.isfinite(out).all()):
            check_finite_at_valid("advantages", torch.where(mask, advantages.float(), zero32), mask)
    return ReleaseResult(out, release_index, cp.accepted, cp.gain, n_sent, n_valid, n_kept)


_CHUNK_ROWS = 16


def _ids_sorted(ids: torch.Tensor) -> bool:
    """Whether every row of the `(B, T)` integer ``ids`` is >= 0 and non-decreasing over all positions.

    Checked in row chunks through one reused buffer (no `(B, T)` temporary)."""
    batch, length = ids.shape
    if bool((ids[:, 0] < 0).any()):
        return False
    if length < 2:
        return True
    buf = torch.empty(min(batch, _CHUNK_ROWS), length - 1, dtype=torch.bool, device=ids.device)
    for start in range(0, batch, _CHUNK_ROWS):
        rows = ids[start : start + _CHUNK_ROWS]
        out = buf[: rows.shape[0]]
        torch.ge(rows[:, 1:], rows[:, :-1], out=out)
        if not bool(out.all()):
            return False
    return True


def _release_sorted(
    advantages: torch.Tensor,
    mask: torch.Tensor,
    sentence_ids: torch.Tensor,
    margins: torch.Tensor,
    min_segment: int,
    penalty: float,
    min_gain: float,
) -> ReleaseResult | None:
    """Release rule when the sentence ids are >= 0 and non-decreasing over *every* position of each row (what
    :func:`batch_sentence_ids` produces); None otherwise (the caller then uses :func:`_release_general`).

    Raw id ``j`` occupies the positions ``[start_j, start_{j+1})`` (``searchsorted``), so the per-sentence token
    counts and float64 margin sums are differences of row prefix sums taken at those `(B, W)` boundaries: the
    `(B, T)` work is two prefix sums (computed in row chunks through reused buffers) and the output. Sentences are
    the raw ids that hold at least one valid token, in order, as in :func:`_release_general`.
    """
    batch, length = mask.shape
    if batch == 0 or length == 0:
        return None
    device = mask.device
    ids = sentence_ids if sentence_ids.dtype == torch.int64 else sentence_ids.long()
    ids = ids.contiguous()
    width = int(ids[:, -1].max()) + 1 if bool((ids[:, -1] >= 0).all()) else 0
    if width == 0 or width > 2 * length + 64 or not _ids_sorted(ids):
        return None

    # starts[:, j] = first position with id >= j; starts[:, width] = length
    bounds = torch.arange(width + 1, device=device).expand(batch, width + 1).contiguous()
    starts = torch.searchsorted(ids, bounds)
    # prefix value before position p is the inclusive prefix sum at p - 1 (0 at p = 0)
    before = (starts - 1).clamp_min(0)
    at_zero = starts == 0
    count_prefix = torch.empty(batch, width + 1, dtype=torch.int64, device=device)
    sum_prefix = torch.empty(batch, width + 1, dtype=torch.float64, device=device)
    rows = min(batch, _CHUNK_ROWS)
    count_buf = torch.empty(rows, length, dtype=torch.int64, device=device)
    marg_buf = torch.empty(rows, length, dtype=margins.dtype, device=device)
    sum_buf = torch.empty(rows, length, dtype=torch.float64, device=device)
    zero_m = torch.zeros((), dtype=margins.dtype, device=device)
    for start in range(0, batch, _CHUNK_ROWS):
        end = min(start + _CHUNK_ROWS, batch)
        n = end - start
        torch.cumsum(mask[start:end], dim=-1, out=count_buf[:n])
        torch.where(mask[start:end], margins[start:end], zero_m, out=marg_buf[:n])
        torch.cumsum(marg_buf[:n], dim=-1, dtype=torch.float64, out=sum_buf[:n])
        torch.gather(count_buf[:n], 1, before[start:end], out=count_prefix[start:end])
        torch.gather(sum_buf[:n], 1, before[start:end], out=sum_prefix[start:end])
    count_prefix.masked_fill_(at_zero, 0)
    sum_prefix.masked_fill_(at_zero, 0.0)
    counts = count_prefix.diff(dim=-1)  # (B, W) valid tokens per raw id
    sums = sum_prefix.diff(dim=-1)
    if not bool(torch.isfinite(sums).all()):
        check_finite_at_valid("margins", margins, mask)

    # compact the raw ids that hold valid tokens into sentences 0..J_b-1
    nonempty = counts > 0
    through = nonempty.long().cumsum(dim=-1)  # sentences up to and including raw id j
    n_sent = through[:, -1].clone()
    n_width = max(int(n_sent.max()), 1)
    slot = torch.where(nonempty, through - 1, torch.full((), n_width, dtype=torch.int64, device=device))
    raw_x = sums / counts.clamp_min(1).double()
    x = torch.zeros(batch, n_width + 1, dtype=torch.float64, device=device).scatter_(1, slot, raw_x)[:, :n_width]

    cp = _change_points(x, n_sent, min_segment, penalty, min_gain)

    # first token of sentence tau*: the first valid position of raw id r* (the (tau* + 1)-th non-empty id)
    before_tau = through <= cp.tau[:, None]
    r_star = before_tau.sum(dim=-1).clamp_max(width - 1)
    first_tok = starts.gather(1, r_star[:, None])[:, 0]
    accepted = cp.accepted
    first_valid = mask.gather(1, first_tok.clamp_max(length - 1)[:, None])[:, 0]
    for b in torch.nonzero(accepted & ~first_valid).flatten().tolist():
        p = int(first_tok[b])
        first_tok[b] = p + int(torch.nonzero(mask[b, p:])[0, 0])
    release_index = torch.where(accepted, first_tok, torch.full_like(first_tok, length))

    n_valid = counts.sum(dim=-1)
    n_kept = torch.where(accepted, (counts * before_tau).sum(dim=-1), n_valid)
    scale = n_valid.float() / n_kept.clamp_min(1).float()
    if advantages.dtype == torch.float32:
        out = advantages * scale[:, None]
    else:
        out = advantages.float().mul_(scale[:, None])
    out.masked_fill_(~mask, 0.0)
    for b, index in enumerate(release_index.tolist()):
        if index < length:
            out[b, index:].zero_()
    if not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
        zero32 = torch.zeros((), dtype=torch.float32, device=device)
        check_finite_at_valid("advantages", torch.where(mask, advantages.float(), zero32), mask)
    return ReleaseResult(out, release_index, accepted, cp.gain, n_sent, n_valid, n_kept)


def release(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    sentence_ids: torch.Tensor,
    margins: torch.Tensor,
    min_segment: int = 2,
    penalty: float = 2.0,
    min_gain: float = 0.0,
) -> ReleaseResult:
    """Batched release rule (section 4 steps 2-5) with its diagnostics; see :func:`apply_release`."""
    _check_rule_args(min_segment, penalty, min_gain)
    check_same_shape(response_mask, advantages=advantages, sentence_ids=sentence_ids, margins=margins)
    if sentence_ids.dtype.is_floating_point or sentence_ids.dtype == torch.bool:
        raise ValueError(f"sentence_ids must be an integer tensor, got dtype {sentence_ids.dtype}")
    mask = response_mask.bool()
    with torch.no_grad():
        fast = _release_sorted(advantages, mask, sentence_ids, margins, min_segment, float(penalty), float(min_gain))
        if fast is not None:
            return fast
        return _release_general(advantages, mask, sentence_ids, margins, min_segment, float(penalty), float(min_gain))


def apply_release(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    sentence_ids: torch.Tensor,
    margins: torch.Tensor,
    min_segment: int = 2,
    penalty: float = 2.0,
    min_gain: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Release the suffix of each rollout after its teachability change point (section 4 steps 2-5).

    Sentence scores are the mean margin of each sentence's valid tokens; the change point is that of
    :func:`release_change_point`. When accepted, every token from the first token of sentence tau* on gets
    advantage 0 and the kept ones are multiplied by ``n_valid / n_kept``. ``response_mask`` is not changed
    (released tokens stay in the token-mean denominator).

    Args:
        advantages: `(B, T)` advantages to release (any float dtype).
        response_mask: `(B, T)` 1 on response tokens (zeros inside a response allowed).
        sentence_ids: `(B, T)` integer sentence index of each token, non-decreasing over the valid tokens;
            values at masked positions are ignored, and gaps in the numbering are allowed.
        margins: `(B, T)` teacher margin per token (e.g. :func:`topk_margin`); ignored where the mask is 0.
        min_segment, penalty, min_gain: as in :func:`release_change_point`.

    Returns:
        advantages_out: `(B, T)` float32, 0 where the mask is 0.
        release_index: `(B,)` int64 first zeroed token position, T when nothing is released.
    """
    result = release(advantages, response_mask, sentence_ids, margins, min_segment, penalty, min_gain)
    return result.advantages, result.release_index
