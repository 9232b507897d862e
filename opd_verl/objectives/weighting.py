"""Per-token weighting of the signal: IW-OPD and position masks (docs/objectives.md section 3).

All tensors are `(B, T)`; weights are float32, detached, and 0 wherever ``response_mask`` is 0. Only the mask-1
tokens, in order, count as the response (zeros inside a response are skipped).
"""

from __future__ import annotations

import math

import torch

from opd_verl.objectives.rows import blocked_output, load_mask, load_masked
from opd_verl.objectives.signals import check_same_shape

__all__ = [
    "POSITION_MODES",
    "iw_opd_weights",
    "iw_opd_advantages",
    "position_mask_weights",
    "cosine_fraction",
    "position_decile_means",
]

POSITION_MODES = ("prefix_mask", "suffix_mask", "prefix_weight")
_IW_EPS = 1e-8


def _check_number(name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        lo = "(" if low_open else "["
        hi = "inf)" if high == math.inf else f"{high}]"
        raise ValueError(f"{name} must be a finite number in {lo}{low}, {hi}, got {value!r}")
    return float(value)


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
    w_max = _check_number("w_max", w_max, 1.0)
    with torch.no_grad():
        return _iw_weighted(discrepancy, response_mask, w_max, None)


def iw_weights_rows(weights: torch.Tensor, abs_discrepancy: torch.Tensor, w_max: float) -> torch.Tensor:
    """``weights <- (w_max - 1) * clamp(1 - F_{t-1}, 0, 1)``, the IW-OPD weights minus 1, for one row block.

    ``F_{t-1} = (cumsum(d)_t - d_t) / (sum(d) + 1e-8)`` (section 3), computed as
    ``clamp((w_max - 1) - k * (cumsum(d)_t - d_t), 0, w_max - 1)`` with ``k = (w_max - 1) / (sum(d) + 1e-8)`` per row.
    The caller adds 1 (``g = 1 + weights``), usually fused with the product by the signal
    (``torch.addcmul(signal, signal, weights)``).

    Args:
        weights: `(R, T)` float32 result; nonzero also at masked positions.
        abs_discrepancy: `(R, T)` float32 ``|D_t|``, finite, 0 at masked positions.

    Returns:
        ``weights``.
    """
    gamma = w_max - 1.0
    csum = torch.cumsum(abs_discrepancy, dim=-1, out=weights)
    total = csum[:, -1:].clone() if csum.shape[-1] else csum.sum(dim=-1, keepdim=True)
    slope = total.add_(_IW_EPS).reciprocal_().mul_(-gamma)
    return csum.sub_(abs_discrepancy).mul_(slope).add_(gamma).clamp_(0.0, gamma)


def _iw_weighted(
    discrepancy: torch.Tensor, response_mask: torch.Tensor, w_max: float, advantages: torch.Tensor | None
) -> torch.Tensor:
    """IW-OPD weights, times ``advantages`` where given, over row blocks; 0 where the mask is 0.

    Args:
        discrepancy: `(B, T)` signed discrepancy.
        response_mask: `(B, T)`.
        advantages: `(B, T)` or None.
    """
    out, blocks, bufs = blocked_output(response_mask.shape, discrepancy.device, ("mask", "disc", "adv"))
    for start, end in blocks:
        n = end - start
        mask = response_mask[start:end]
        mask_f = bufs["mask", n]
        load_mask(mask_f, mask, bufs.full("mask", n))
        disc = bufs["disc", n]
        load_masked(disc, discrepancy[start:end], mask_f, mask, "discrepancy", start, bufs.full("disc", n))
        weights = iw_weights_rows(out[start:end], disc.abs_(), w_max)
        if advantages is None:
            weights.add_(1.0).mul_(mask_f)
        else:
            adv = bufs["adv", n]
            load_masked(adv, advantages[start:end], mask_f, mask, "advantages", start, bufs.full("adv", n))
            torch.addcmul(adv, adv, weights, out=weights)
    return out


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
    w_max = _check_number("w_max", w_max, 1.0)
    with torch.no_grad():
        disc = advantages if discrepancy is None else discrepancy
        return _iw_weighted(disc, response_mask, w_max, advantages)


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
    fraction = _check_number("fraction", fraction, 0.0, 1.0, low_open=True)
    weight = _check_number("weight", weight, 0.0)
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
    r0 = _check_number("r0", r0, 0.0, 1.0, low_open=True)
    r1 = _check_number("r1", r1, 0.0, 1.0, low_open=True)
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
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
    mask = response_mask.bool()
    rank, count = _valid_rank_and_count(mask)
    bins = torch.div(rank.clamp_min(0) * n_bins, count.clamp_min(1), rounding_mode="floor").clamp(0, n_bins - 1)
    vals = torch.where(mask, values.detach().float(), torch.zeros((), device=values.device))
    sums = torch.zeros(n_bins, dtype=torch.float64, device=values.device)
    sums.index_add_(0, bins[mask], vals[mask].double())
    counts = torch.zeros(n_bins, dtype=torch.int64, device=values.device)
    counts.index_add_(0, bins[mask], torch.ones_like(bins[mask]))
    means = (sums / counts.clamp_min(1)).float()
    return means, counts
