"""Prefix-Teach release rule (docs/objectives.md section 4): teacher margins, change point, release.

Vectorised over rows and splits: sentence sums are segment sums over `(B, J)`, every split's RSS comes from
cumulative sums over the J sentence scores (float64); no Python loop over tokens or splits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from opd_verl.objectives.checks import check_int, check_number, check_same_shape, masked, valid_mask

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
    check_int("min_segment", min_segment, 1)
    check_number("penalty", penalty, 0.0)
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


def _segment_sums(cumulative: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """`(B, J)` float64 sums of positions ``[first[:, j], first[:, j + 1])`` from the rows' inclusive cumulative
    sums `(B, T)`; ``first`` `(B, J + 1)` int64 in [0, T]."""
    before = torch.where(first > 0, cumulative.gather(1, (first - 1).clamp_min(0)).double(), 0.0)
    return before.diff(dim=-1)


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
    mask = valid_mask(response_mask)
    adv = masked("advantages", advantages, mask)
    return release_masked(adv, mask, sentence_ids, margins, min_segment, float(penalty), float(min_gain))


def release_masked(
    adv: torch.Tensor,
    mask: torch.Tensor,
    sentence_ids: torch.Tensor,
    margins: torch.Tensor,
    min_segment: int,
    penalty: float,
    min_gain: float,
    count: torch.Tensor | None = None,
) -> ReleaseResult:
    """:func:`release` of float32 advantages ``adv`` `(B, T)` already 0 where the float 0/1 ``mask`` is 0; the
    rule's arguments already checked; ``adv`` is scaled in place (it is the result's advantages). ``count``:
    ``mask.cumsum(-1)`` when the caller has it."""
    if sentence_ids.dtype.is_floating_point or sentence_ids.dtype == torch.bool:
        raise ValueError(f"sentence_ids must be an integer tensor, got dtype {sentence_ids.dtype}")
    batch, length = mask.shape
    device = mask.device
    if length == 0:  # one masked column: every row then has no sentence
        mask = torch.zeros(batch, 1, device=device)
        sentence_ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        margins = torch.zeros(batch, 1, device=device)
        count = None
    with torch.no_grad():
        # step 2: sentence index of every valid token, from 0 (ids may skip values; only their order matters)
        low, high = torch.aminmax(sentence_ids) if sentence_ids.numel() else (0, 0)
        exact = torch.float32 if max(-int(low), int(high)) < 2**24 else torch.float64
        ids = sentence_ids.to(exact, copy=True)
        count = mask.cumsum(dim=-1) if count is None else count  # valid tokens up to and including t
        n_valid_f = count[:, -1:]
        # in a row whose valid tokens are not its first n_valid positions, the ids become their running maximum over
        # the valid tokens (-1 before the first): neighbours then compare as consecutive valid tokens do
        holes = (count.gather(1, (n_valid_f.long() - 1).clamp_min(0)) != n_valid_f)[:, 0].nonzero()[:, 0]
        decreasing = False
        if holes.numel():
            sub, sub_valid = ids[holes], mask[holes].bool()
            running = sub.masked_fill(~sub_valid, -1).cummax(dim=-1).values
            decreasing = bool((sub_valid & (sub < running)).any())
            ids[holes] = running
        # a sentence starts at a valid token whose id exceeds the previous valid token's
        starts = torch.empty_like(ids)
        step = torch.sub(ids[:, 1:], ids[:, :-1], out=starts[:, 1:]).mul_(mask[:, 1:])
        first_valid = torch.searchsorted(count, torch.ones(batch, 1, device=device)).clamp_max_(mask.shape[1] - 1)
        negative = (ids.gather(1, first_valid) < 0) & (n_valid_f > 0)
        if decreasing or (step.numel() and float(step.amin()) < 0) or bool(negative.any()):
            raise ValueError("sentence_ids must be >= 0 and non-decreasing over the valid tokens of each row")
        step.gt_(0.0)
        starts[:, 0] = mask[:, 0]
        sentence = starts.cumsum_(dim=-1).sub_(1.0).float()  # -1 before the first valid token; exact below 2^24
        n_sent = sentence[:, -1].long() + 1
        n_width = max(int(n_sent.max()) if batch else 0, 1)

        # segment sums: sentence j holds the valid tokens of positions [first[j], first[j + 1])
        boundaries = torch.arange(n_width + 1, dtype=torch.float32, device=device).expand(batch, -1).contiguous()
        first = torch.searchsorted(sentence, boundaries)
        counts = _segment_sums(count, first)
        # in the margins' precision: float32, or float64 when given (a teacher's margins carry ~3 digits)
        margins = masked("margins", margins, mask, torch.float64 if margins.dtype == torch.float64 else torch.float32)
        sums = _segment_sums(margins.cumsum_(dim=-1), first)
        x = sums / counts.clamp_min(1.0)

        # step 3: change point per row
        cp = _change_points(x, n_sent, min_segment, penalty, min_gain)

        # step 4: the first valid token of sentence tau*
        first_tok = first.gather(1, cp.tau[:, None])[:, 0]
        release_index = torch.where(cp.accepted, first_tok, torch.full_like(first_tok, length))

        # step 5: keep the prefix, rescale it to the row's loss mass
        n_valid = counts.sum(dim=-1).round().long()
        before_tau = torch.arange(n_width, device=device)[None, :] < cp.tau[:, None]
        n_kept = torch.where(cp.accepted, (counts * before_tau).sum(dim=-1).round().long(), n_valid)
        scale = n_valid.float() / n_kept.clamp_min(1).float()
        # scale before the release index, 0 from it on (written over the sentence indices, no longer needed)
        positions = torch.arange(length, dtype=torch.float32, device=device)
        factor = torch.sub(release_index[:, None].float(), positions, out=sentence[:, :length])
        out = adv.mul_(factor.clamp_(0.0, 1.0).mul_(scale[:, None]))
    return ReleaseResult(out, release_index, cp.accepted, cp.gain, n_sent, n_valid, n_kept)


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
