"""Prefix-Teach release rule (docs/objectives.md section 4): teacher margins, change point, release.

Every step is vectorised over rows and splits (cumulative sums, no Python loop over tokens or splits); the
`(B, T)` work runs over row blocks (:mod:`opd_verl.objectives.rows`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from opd_verl.objectives.rows import (
    BlockPrefix,
    RowBuffers,
    blocked_output,
    check_finite_at_valid,
    load_mask,
    load_masked,
)
from opd_verl.objectives.signals import check_same_shape

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


class ReleasePlan(NamedTuple):
    """Per-row outcome of the release rule, before it is applied to advantages (all `(B,)`)."""

    release_index: torch.Tensor  # int64 first zeroed token position, T when nothing is released
    accepted: torch.Tensor  # bool
    gain: torch.Tensor  # float64, -inf where J < 2 * min_segment
    n_sentences: torch.Tensor  # int64
    n_valid: torch.Tensor  # int64
    n_kept: torch.Tensor  # int64
    scale: torch.Tensor  # float32 n_valid / n_kept


class SentenceStats(NamedTuple):
    """Per raw sentence id ``j`` of a row block (all `(R, W)`)."""

    counts: torch.Tensor  # float64 valid tokens with id j
    sums: torch.Tensor  # float64 sum of their margins
    first_valid: torch.Tensor  # int64 position of the first of them (meaningless where counts == 0)


def sorted_ids_width(sentence_ids: torch.Tensor) -> int:
    """Number of raw ids ``W = max(last id) + 1`` when the row-sorted path can apply, else 0.

    The path applies when every row's ids are >= 0 and non-decreasing over *all* positions (what
    :func:`batch_sentence_ids` produces); this only checks the last ids, :func:`sorted_sentence_stats` checks the
    order block by block. ``W`` is bounded by ``2 T + 64`` so the per-id tensors stay small.
    """
    batch, length = sentence_ids.shape
    if batch == 0 or length == 0:
        return 0
    last = sentence_ids[:, -1]
    if not bool((last >= 0).all()):
        return 0
    width = int(last.max()) + 1
    return width if width <= 2 * length + 64 else 0


def sorted_sentence_stats(
    ids: torch.Tensor, order_buf: torch.Tensor, width: int, mask_prefix: BlockPrefix, margin_prefix: BlockPrefix
) -> SentenceStats | None:
    """Sentence counts, margin sums and first valid positions of one row block; None if some row's ids are not
    >= 0 and non-decreasing over all positions (then :func:`release_rows` uses :func:`_release_general`).

    Raw id ``j`` occupies the positions ``[start_j, start_{j+1})`` (``searchsorted``), so its valid-token count and
    margin sum are differences of row prefix sums read at those `(R, W + 1)` boundaries.

    Args:
        ids: `(R, T)` integer sentence ids.
        order_buf: `(R, T)` float32 scratch buffer.
        width: ``W`` from :func:`sorted_ids_width`.
        mask_prefix: :class:`BlockPrefix` of the float 0/1 mask.
        margin_prefix: :class:`BlockPrefix` of the masked margins.
    """
    rows, length = ids.shape
    # order check in float32: rounding is monotone and exact below 2^24, and W <= 2 T + 64 bounds each row's last id
    as_float = order_buf.copy_(ids)
    if (
        length > 1
        and float(torch.sub(as_float[:, 1:], as_float[:, :-1]).amin()) < 0
        or float(as_float[:, 0].amin()) < 0
    ):
        return None
    ids = ids if ids.dtype == torch.int64 and ids.is_contiguous() else ids.long().contiguous()
    bounds = torch.arange(width + 1, device=ids.device).expand(rows, width + 1).contiguous()
    starts = torch.searchsorted(ids, bounds)  # first position with id >= j; starts[:, W] = T
    count_before = mask_prefix.at(starts)
    counts = count_before.diff(dim=-1)
    sums = margin_prefix.at(starts).diff(dim=-1)
    # a sentence's first valid token is usually its first token; search only when some is masked
    first_valid = starts[:, :-1]
    first_masked = (mask_prefix.values.gather(1, first_valid) == 0) & (counts > 0)
    if bool(first_masked.any()):
        first_valid = mask_prefix.first_reaching(count_before[:, :-1] + 1) - 1
    return SentenceStats(counts, sums, first_valid)


def release_plan(stats: SentenceStats, length: int, min_segment: int, penalty: float, min_gain: float) -> ReleasePlan:
    """Change point and release position of every row from its per-id statistics (section 4 steps 2-5).

    Sentences are the raw ids that hold at least one valid token, in order, as in :func:`_release_general`.

    Args:
        stats: :class:`SentenceStats` of a row block (`(R, W)` fields).
        length: T.
    """
    counts, sums = stats.counts, stats.sums
    batch, width = counts.shape
    device = counts.device
    nonempty = counts > 0
    through = nonempty.long().cumsum(dim=-1)  # sentences up to and including raw id j
    n_sent = through[:, -1].clone()
    n_width = max(int(n_sent.max()), 1)
    slot = torch.where(nonempty, through - 1, torch.full((), n_width, dtype=torch.int64, device=device))
    raw_x = sums / counts.clamp_min(1.0)
    x = torch.zeros(batch, n_width + 1, dtype=torch.float64, device=device).scatter_(1, slot, raw_x)[:, :n_width]

    cp = _change_points(x, n_sent, min_segment, penalty, min_gain)

    # first token of sentence tau*: the first valid position of raw id r* (the (tau* + 1)-th non-empty id)
    before_tau = through <= cp.tau[:, None]
    r_star = before_tau.sum(dim=-1).clamp_max(width - 1)
    first_tok = stats.first_valid.gather(1, r_star[:, None])[:, 0]
    release_index = torch.where(cp.accepted, first_tok, torch.full_like(first_tok, length))
    n_valid = counts.sum(dim=-1).round().long()
    n_kept = torch.where(cp.accepted, (counts * before_tau).sum(dim=-1).round().long(), n_valid)
    scale = n_valid.float() / n_kept.clamp_min(1).float()
    return ReleasePlan(release_index, cp.accepted, cp.gain, n_sent, n_valid, n_kept, scale)


def apply_plan_rows(out: torch.Tensor, plan: ReleasePlan, scratch: torch.Tensor) -> None:
    """Scale masked advantages by ``n_valid / n_kept`` and zero them from the release index on, in place.

    One multiplication by ``scale * clamp(release_index - t, 0, 1)`` (exactly ``scale`` before the release index
    and 0 from it on: both are integers below 2^24 in float32).

    Args:
        out: `(R, T)` float32 advantages, 0 at masked positions; ``plan`` of the same R rows.
        scratch: `(R, T)` float32 buffer.
    """
    positions = torch.arange(out.shape[1], dtype=torch.float32, device=out.device)
    index = plan.release_index[:, None].float()
    torch.sub(index, positions, out=scratch).clamp_(0.0, 1.0).mul_(plan.scale[:, None])
    out.mul_(scratch)


RELEASE_BUFFERS = ("margins", "order", "scratch")  # the RowBuffers names :func:`release_rows` uses


def release_buffer_dtypes(margins: torch.Tensor) -> dict[str, torch.dtype]:
    """Dtypes of :data:`RELEASE_BUFFERS`: float64 margins keep their precision, others are read as float32 (their
    sentence sums are always accumulated in float64)."""
    return {"margins": torch.float64 if margins.dtype == torch.float64 else torch.float32}


def release_rows(
    adv: torch.Tensor,
    mask: torch.Tensor,
    mask_prefix: BlockPrefix,
    bufs: RowBuffers,
    start: int,
    width: int,
    sentence_ids: torch.Tensor,
    margins: torch.Tensor,
    rule: tuple[int, float, float],
) -> ReleasePlan:
    """Apply the release rule in place to one row block of loaded advantages and return its plan.

    From per-sentence statistics when the block's ids are row-sorted (``width`` from :func:`sorted_ids_width`),
    else with :func:`_release_general`.

    Args:
        adv: `(R, T)` float32 advantages, 0 at masked positions (rows ``start .. start + R`` of the batch).
        mask: `(R, T)` the caller's mask; ``mask_prefix`` is the :class:`BlockPrefix` of its float 0/1 buffer.
        bufs: buffers holding :data:`RELEASE_BUFFERS` (and the mask).
        sentence_ids, margins: `(R, T)` rows of the inputs.
        rule: ``(min_segment, penalty, min_gain)``.
    """
    n = adv.shape[0]
    mask_f = mask_prefix.values[:, : adv.shape[1]]
    # loaded also for the general rule: a NaN/inf margin at a valid token is reported with its batch row
    load_masked(bufs["margins", n], margins, mask_f, mask, "margins", start, bufs.full("margins", n))
    stats = None
    if width:
        margin_prefix = BlockPrefix(bufs.full("margins", n), torch.float64)
        stats = sorted_sentence_stats(sentence_ids, bufs["order", n], width, mask_prefix, margin_prefix)
    if stats is not None:
        plan = release_plan(stats, adv.shape[1], *rule)
        apply_plan_rows(adv, plan, bufs["scratch", n])
        return plan
    result = _release_general(adv, mask.bool(), sentence_ids, margins, *rule)
    adv.copy_(result.advantages)
    return ReleasePlan(*result[1:], result.n_valid.float() / result.n_kept.clamp_min(1).float())


def merge_plans(plans: list[ReleasePlan]) -> ReleasePlan:
    """The plans of consecutive row blocks as one (fields concatenated over rows); ``plans`` not empty."""
    return ReleasePlan(*(torch.cat(field) for field in zip(*plans)))


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
    rule = (min_segment, float(penalty), float(min_gain))
    with torch.no_grad():
        if response_mask.shape[0] == 0:
            return _release_general(advantages, response_mask.bool(), sentence_ids, margins, *rule)
        names, dtypes = ("mask", *RELEASE_BUFFERS), release_buffer_dtypes(margins)
        out, blocks, bufs = blocked_output(response_mask.shape, advantages.device, names, dtypes)
        width = sorted_ids_width(sentence_ids)
        plans = []
        for start, end in blocks:
            n = end - start
            mask = response_mask[start:end]
            load_mask(bufs["mask", n], mask, bufs.full("mask", n))
            adv = out[start:end]
            load_masked(adv, advantages[start:end], bufs["mask", n], mask, "advantages", start, adv)
            rows = (sentence_ids[start:end], margins[start:end])
            plans.append(release_rows(adv, mask, BlockPrefix(bufs.full("mask", n)), bufs, start, width, *rows, rule))
        plan = merge_plans(plans)
    return ReleaseResult(out, plan.release_index, plan.accepted, plan.gain, plan.n_sentences, plan.n_valid, plan.n_kept)


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
