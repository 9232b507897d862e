"""Per-token weighting of the signal: IW-OPD and position masks (docs/objectives.md section 3).

All tensors are `(B, T)`; weights are float32, detached, and 0 wherever ``response_mask`` is 0. Only the mask-1
tokens, in order, count as the response (zeros inside a response are skipped).
"""

from __future__ import annotations

import math

import torch

from opd_verl.objectives.checks import check_int, check_number, check_same_shape, masked, valid_mask

__all__ = [
    "POSITION_MODES",
    "iw_opd_weights",
    "iw_opd_advantages",
    "iw_weights",
    "position_mask_weights",
    "cosine_fraction",
    "position_decile_means",
]

POSITION_MODES = ("prefix_mask", "suffix_mask", "prefix_weight")
_IW_EPS = 1e-8


def iw_opd_weights(discrepancy: torch.Tensor, response_mask: torch.Tensor, w_max: float = 1.5) -> torch.Tensor:
    """IW-OPD weights ``g_t = 1 + (w_max - 1) * clamp(1 - F_{t-1}, 0, 1)`` (section 3).

    ``d_t = |D_t| * mask_t``, ``F_{t-1} = (cumsum(d)_t - d_t) / (sum(d) + 1e-8)`` per row (exclusive prefix
    fraction of the accumulated discrepancy). The first valid token gets ``w_max``; weights fall monotonically
    to >= 1; a row without any discrepancy keeps ``w_max`` on every valid token.

    Args:
        discrepancy: `(B, T)` signed ``teacher - student`` log-prob discrepancy (the absolute value is taken).
        response_mask: `(B, T)` 1 on response tokens.
        w_max: weight of the first valid token, >= 1 (TRL's ``iw_opd_gamma`` is ``w_max - 1``).

    Returns:
        `(B, T)` float32 weights, detached, 0 where the mask is 0.
    """
    check_same_shape(response_mask, discrepancy=discrepancy)
    w_max = check_number("w_max", w_max, 1.0)
    mask = valid_mask(response_mask)
    return iw_weights(masked("discrepancy", discrepancy, mask).abs_(), mask, w_max)


def iw_weights(abs_discrepancy: torch.Tensor, mask: torch.Tensor, w_max: float) -> torch.Tensor:
    """IW-OPD weights from ``|D_t|`` `(B, T)` (finite, 0 at masked positions) and the float 0/1 ``mask``.

    ``F_{t-1} = (cumsum(d)_t - d_t) / (sum(d) + 1e-8)`` per row, ``g_t = 1 + (w_max - 1) * clamp(1 - F_{t-1}, 0, 1)``,
    0 where the mask is 0.
    """
    # g = w_max - k * (cumsum(d) - d) with k = (w_max - 1) / (sum(d) + 1e-8), clamped to [1, w_max]
    slope = abs_discrepancy.sum(dim=-1, keepdim=True).add_(_IW_EPS).reciprocal_().mul_(1.0 - w_max)
    weights = abs_discrepancy.cumsum(dim=-1).sub_(abs_discrepancy).mul_(slope).add_(w_max).clamp_(1.0, w_max)
    return weights.mul_(mask)


def iw_opd_advantages(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    w_max: float = 1.5,
    discrepancy: torch.Tensor | None = None,
) -> torch.Tensor:
    """IW-OPD advantages ``A'_t = g_t * A_t`` (weights detached, not renormalised).

    Args:
        advantages: `(B, T)` the signal ``A_t`` (OPD or G-OPD advantages).
        response_mask: `(B, T)` 1 on response tokens.
        w_max: as in :func:`iw_opd_weights`.
        discrepancy: `(B, T)` ``teacher - student``; None = ``advantages`` (right for the OPD signal). For G-OPD
            pass the OPD discrepancy: the weights always use ``teacher - student``.

    Returns:
        `(B, T)` float32, detached, 0 where the mask is 0.
    """
    check_same_shape(response_mask, advantages=advantages, discrepancy=discrepancy)
    w_max = check_number("w_max", w_max, 1.0)
    mask = valid_mask(response_mask)
    adv = masked("advantages", advantages, mask)
    disc = adv if discrepancy is None else masked("discrepancy", discrepancy, mask)
    return adv.mul_(iw_weights(disc.abs(), mask, w_max))


def _valid_rank_and_count(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of each valid token among its row's valid tokens `(B, T)` int64, and valid counts `(B, 1)`."""
    m = mask.long()
    csum = m.cumsum(dim=-1)
    return csum - 1, csum[:, -1:] if mask.shape[-1] > 0 else m.sum(dim=-1, keepdim=True)


def position_mask_weights(
    response_mask: torch.Tensor, mode: str, fraction: float = 0.3, weight: float = 1.5
) -> torch.Tensor:
    """Position ablation weights of IW-OPD's paper (section 3).

    ``k = ceil(fraction * n_valid)`` per row (counting only valid tokens; products within 1e-6 above an
    integer round down to it, so ``0.3 * 10`` gives 3 despite float rounding).

    - ``prefix_mask``: 1 on the first k valid tokens, 0 on the rest.
    - ``suffix_mask``: 1 on the last k valid tokens, 0 on the rest.
    - ``prefix_weight``: ``weight`` on the first k valid tokens, 1 on the rest.

    Args:
        response_mask: `(B, T)` 1 on response tokens.
        mode: one of ``prefix_mask``, ``suffix_mask``, ``prefix_weight``.
        fraction: in (0, 1].
        weight: >= 0, used by ``prefix_weight``.

    Returns:
        `(B, T)` float32 weights, 0 where the mask is 0.
    """
    if mode not in POSITION_MODES:
        raise ValueError(f"mode must be one of {list(POSITION_MODES)}, got {mode!r}")
    fraction = check_number("fraction", fraction, 0.0, 1.0, low_open=True)
    weight = check_number("weight", weight, 0.0)
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be 2-D (batch, response_len), got shape {tuple(response_mask.shape)}")
    mask = response_mask.bool()
    rank, count = _valid_rank_and_count(mask)
    k = torch.ceil(count.double() * fraction - 1e-6).long()
    if mode == "suffix_mask":
        inside = rank >= count - k
    else:
        inside = rank < k
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    if mode == "prefix_weight":
        values = torch.where(inside, torch.full((), weight, device=mask.device), torch.ones((), device=mask.device))
    else:
        values = inside.float()
    return torch.where(mask, values, zero)


def cosine_fraction(step: int, total_steps: int, r0: float = 0.3, r1: float = 1.0) -> float:
    """Annealed fraction ``r = r0 + (r1 - r0) * (1 - cos(pi * p)) / 2``, ``p = (step - 1) / (total_steps - 1)``.

    Steps count from 1 (veRL's ``global_steps``); ``p`` is clamped to [0, 1]; ``total_steps == 1`` gives ``r0``.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    r0 = check_number("r0", r0, 0.0, 1.0, low_open=True)
    r1 = check_number("r1", r1, 0.0, 1.0, low_open=True)
    p = 0.0 if total_steps == 1 else min(max((step - 1) / (total_steps - 1), 0.0), 1.0)
    return r0 + (r1 - r0) * (1.0 - math.cos(math.pi * p)) / 2.0


def position_decile_means(
    values: torch.Tensor, response_mask: torch.Tensor, n_bins: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` per relative-position bin of each row's valid tokens (deciles by default).

    A valid token of rank r (0-based) in a row with n valid tokens falls in bin ``floor(n_bins * r / n)``.

    Args:
        values: `(B, T)` e.g. the discrepancy.
        response_mask: `(B, T)` 1 on response tokens.
        n_bins: number of bins, >= 1.

    Returns:
        means: `(n_bins,)` float32 mean over all valid tokens in each bin (0 for an empty bin).
        counts: `(n_bins,)` int64 number of tokens in each bin.
    """
    check_same_shape(response_mask, values=values)
    check_int("n_bins", n_bins, 1)
    mask = valid_mask(response_mask)
    sums, counts = decile_sums(masked("values", values, mask), mask, n_bins)
    return (sums / counts.clamp_min(1)).float(), counts


def decile_sums(
    values: torch.Tensor, mask: torch.Tensor, n_bins: int = 10, count: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(n_bins,)` float64 sums of ``values`` and `(n_bins,)` int64 token counts per relative-position bin.

    The valid tokens of rank ``r`` (0-based) of ``n`` in a row, bin ``floor(n_bins * r / n)``, are the ranks
    ``[ceil(k n / n_bins), ceil((k + 1) n / n_bins))`` of bin k: each bin's sum is a difference of the row's
    cumulative sum at those rank boundaries.

    Args:
        values: `(B, T)` float32, 0 where the mask is 0.
        mask: `(B, T)` float32 0/1 (:func:`~opd_verl.objectives.checks.valid_mask`).
        count: ``mask.cumsum(-1)`` when the caller has it.
    """
    batch, length = mask.shape
    if length == 0:
        return torch.zeros(n_bins, dtype=torch.float64), torch.zeros(n_bins, dtype=torch.int64)
    if count is None:
        count = mask.cumsum(dim=-1)  # valid tokens up to and including t (exact in float32 below 2^24)
    csum = values.cumsum(dim=-1)
    n = count[:, -1:]
    k = torch.arange(n_bins + 1, device=mask.device, dtype=torch.float32)
    bounds = torch.floor((k * n + (n_bins - 1)) / n_bins)  # (B, n_bins + 1) ceil(k n / n_bins)
    # the bound-th valid token's position; its cumulative sum covers ranks [0, bound)
    last = torch.searchsorted(count, bounds.contiguous()).clamp_max_(length - 1)
    prefix = torch.where(bounds > 0, csum.gather(1, last).double(), 0.0)
    return prefix.diff(dim=-1).sum(dim=0), bounds.diff(dim=-1).sum(dim=0).long()
