"""Input checks shared by the objectives: shapes, numbers, and masking that never lets NaN/inf leak."""

from __future__ import annotations

import math

import torch

__all__ = [
    "check_same_shape",
    "check_finite_at_valid",
    "valid_mask",
    "masked",
    "check_lam",
    "check_number",
    "check_int",
    "check_choice",
    "check_flag",
]


def _refuse(name: str, value, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is not allowed: {allowed}.")


def check_number(
    name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless it is a finite number in the given range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _refuse(name, value, "it must be a number")
    if not math.isfinite(value):
        _refuse(name, value, "it must be finite")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        if low is not None and high is not None:
            bounds = f"in {'(' if low_open else '['}{low}, {high}]"
        elif low is not None:
            bounds = f"{'>' if low_open else '>='} {low}"
        else:
            bounds = f"<= {high}"
        _refuse(name, value, f"it must be {bounds}")
    return float(value)


def check_int(name: str, value, low: int) -> int:
    """``value``; ``ValueError`` naming ``name`` unless it is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        _refuse(name, value, "it must be an integer")
    if value < low:
        _refuse(name, value, f"it must be >= {low}")
    return value


def check_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    """``value``; ``ValueError`` naming ``name`` and the allowed values unless it is one of them."""
    if value not in allowed:
        _refuse(name, value, f"allowed values are {', '.join(allowed)}")
    return value


def check_flag(name: str, value) -> bool:
    """``value``; ``ValueError`` naming ``name`` unless it is a bool."""
    if not isinstance(value, bool):
        _refuse(name, value, "it must be true or false")
    return value


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
    """Raise ``ValueError`` when ``values`` `(B, T)` is NaN/inf where the bool ``mask`` `(B, T)` is true."""
    bad = mask & ~torch.isfinite(values)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=-1)).flatten().tolist()[:8]
        raise ValueError(f"{name} has NaN/inf at {int(bad.sum())} valid response tokens (rows {rows})")


def valid_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """`(B, T)` float32 1 where ``response_mask`` is nonzero (a valid response token), else 0."""
    out = torch.empty(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    return torch.ne(response_mask, 0, out=out)


def masked(name: str, values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values`` in ``dtype`` where the float 0/1 ``mask`` (:func:`valid_mask`) is 1, 0 elsewhere, whatever
    ``values`` holds there; a NaN/inf at a valid position raises ``ValueError`` naming ``name``.

    Multiplying by the mask is exact for finite values; when the result's sum is not finite (a NaN/inf anywhere,
    e.g. ``-inf`` padding, or an overflowing sum) the values are selected with ``torch.where`` and checked.
    """
    values = values.detach()
    out = torch.mul(values.to(dtype), mask)
    if not math.isfinite(float(out.sum())):
        valid = mask.bool()
        out = torch.where(valid, values.to(dtype), torch.zeros((), dtype=dtype, device=values.device))
        check_finite_at_valid(name, out, valid)
    return out


def check_lam(lam: float | torch.Tensor, batch: int) -> float | torch.Tensor:
    """``lam`` as a float, or as a `(batch,)` float32 tensor of per-row values; each finite and > 0."""
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
