"""Row-chunked evaluation: row blocks that stay in cache, masked loading, prefix sums sampled at positions.

Every objective is row-independent, so on CPU the `(B, T)` work runs over blocks of rows small enough to stay in
cache, through reused buffers: one pass over each input, and no `(B, T)` temporary besides the result. Comparisons
and selections on bool tensors are an order of magnitude slower than float arithmetic on CPU, so masks are applied
by multiplying with a float 0/1 mask, with an exact ``torch.where`` path whenever a value could make that wrong.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "blocked_output",
    "BLOCK",
    "RowBuffers",
    "row_blocks",
    "load_mask",
    "load_masked",
    "check_finite_at_valid",
    "BlockPrefix",
]

BLOCK = 64  # columns per block of :class:`BlockPrefix`
_CHUNK_ELEMENTS = 1 << 19  # elements per row block on CPU (2 MiB of float32: fast, and overhead stays small)
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 26  # on GPUs: few kernel launches, buffers bounded (256 MiB each)
_CLAMP = 1e30  # |values| above this take the exact path (log-probs never get near it)


def row_blocks(batch: int, length: int, device: torch.device):
    """``(start, end)`` of consecutive row blocks: ~2 MiB of float32 each on CPU, up to 256 MiB elsewhere."""
    elements = _CHUNK_ELEMENTS if device.type == "cpu" else _CHUNK_ELEMENTS_ACCELERATOR
    rows = max(1, min(batch, elements // max(length, 1)))
    for start in range(0, batch, max(rows, 1)):
        yield start, min(start + rows, batch)


def blocked_output(
    shape: tuple[int, int], device: torch.device, names: tuple[str, ...], dtypes: dict[str, torch.dtype] | None = None
) -> tuple[torch.Tensor, list[tuple[int, int]], RowBuffers]:
    """The `(B, T)` float32 result (uninitialised), its row blocks, and the buffers ``names`` of one block."""
    batch, length = shape
    blocks = list(row_blocks(batch, length, device))
    rows = blocks[0][1] - blocks[0][0] if blocks else 0
    out = torch.empty(batch, length, dtype=torch.float32, device=device)
    return out, blocks, RowBuffers(rows, length, device, names, dtypes)


class RowBuffers:
    """Reused buffers of one row block (float32 unless ``dtypes`` says otherwise), carved from one allocation.

    ``width`` = length rounded up to a multiple of :data:`BLOCK`, plus one more block. The padding columns are 0
    and stay 0, so block sums over the full width equal those over the first ``length`` columns, and a
    :class:`BlockPrefix` window starting at any position <= length stays inside the buffer. One allocation (instead
    of one per buffer) lets the allocator hand the same memory back on the next call.
    """

    def __init__(
        self,
        rows: int,
        length: int,
        device: torch.device,
        names: tuple[str, ...],
        dtypes: dict[str, torch.dtype] | None = None,
    ):
        dtypes = dtypes or {}
        self.length = length
        self.width = (-(-length // BLOCK) + 1) * BLOCK
        # float64 buffers take two float32 slots
        slots = {name: 2 if dtypes.get(name) == torch.float64 else 1 for name in names}
        size = rows * self.width
        space = torch.empty(sum(slots.values()) * size, dtype=torch.float32, device=device)
        self._full = {}
        first = 0
        for name in names:
            buffer = space[first : first + slots[name] * size].view(rows, slots[name] * self.width)
            buffer = buffer.view(torch.float64) if slots[name] == 2 else buffer
            buffer[:, length:] = 0.0
            self._full[name] = buffer
            first += slots[name] * size

    def full(self, name: str, rows: int) -> torch.Tensor:
        """`(rows, width)` contiguous buffer, padding included."""
        return self._full[name][:rows]

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        """`(rows, length)` view of buffer ``name`` for a block of ``rows`` rows."""
        name, rows = key
        return self._full[name][:rows, : self.length]


def load_mask(dst: torch.Tensor, mask: torch.Tensor, dst_full: torch.Tensor) -> None:
    """``dst <- (mask != 0)`` as float32 0/1, for `(R, T)` views; ``mask`` of any dtype.

    A float or integer mask that already holds only 0 and 1 is copied (checked on the zero-padded ``dst_full``
    with one ``aminmax`` and one dot product: for values in [0, 1], ``sum(x^2) == sum(x)`` only when every value
    is 0 or 1).
    """
    dst.copy_(mask)
    if mask.dtype == torch.bool:
        return
    flat = dst_full.view(-1)
    low, high = torch.aminmax(flat)
    if float(low) >= 0.0 and float(high) <= 1.0 and float(torch.dot(flat, flat)) == float(flat.sum()):
        return
    dst.copy_(mask != 0)


def load_masked(
    dst: torch.Tensor,
    src: torch.Tensor,
    mask_f: torch.Tensor,
    mask: torch.Tensor,
    name: str,
    row0: int,
    dst_full: torch.Tensor,
) -> float:
    """``dst <- where(mask, src, 0)`` in ``dst``'s dtype for `(R, T)` views, raising on NaN/inf at a valid position.

    Fast path: multiply by ``mask_f`` and check that the sum of the row block ``dst_full`` (`(R, width)`, zero
    padding) is finite (it is not when a product is NaN/inf, e.g. ``-inf`` at padding times 0). Then clamp to
    +-1e30 first and check the sum of squares (finite exactly when every value is finite and below ~1e19 in
    magnitude, so no clamped value). Last, the exact path: ``torch.where``, and a NaN/inf at a valid position raises
    ``ValueError`` naming ``name`` and the rows (counted from ``row0``).

    Args:
        dst: `(R, T)` float32 (or float64) view of ``dst_full``.
        src: `(R, T)` values of any float dtype.
        mask_f: `(R, T)` float32 0/1.
        mask: `(R, T)` the caller's mask (any dtype; nonzero = valid), used only on the exact path.
        dst_full: `(R, width)` contiguous buffer ``dst`` is a view of.

    Returns:
        The sum of the loaded values.
    """
    flat = dst_full.view(-1)
    torch.mul(src, mask_f, out=dst)
    total = float(flat.sum())
    if math.isfinite(total):
        return total
    if src.dtype == dst.dtype:
        torch.clamp(src, -_CLAMP, _CLAMP, out=dst)
    else:
        dst.copy_(src).clamp_(-_CLAMP, _CLAMP)
    dst.mul_(mask_f)
    if not math.isfinite(float(torch.dot(flat, flat))):
        valid = mask.bool()
        check_finite_at_valid(name, src, valid, row0)
        torch.where(valid, src.to(dst.dtype), torch.zeros((), dtype=dst.dtype, device=src.device), out=dst)
    return float(flat.sum())


def check_finite_at_valid(name: str, values: torch.Tensor, mask: torch.Tensor, row0: int = 0) -> None:
    """Raise ``ValueError`` when ``values`` is NaN/inf where ``mask`` is true, naming ``name`` and the rows.

    Args:
        values: `(R, T)` tensor.
        mask: `(R, T)` bool tensor.
        row0: batch index of the first row (for the message).
    """
    bad = mask & ~torch.isfinite(values)
    if bool(bad.any()):
        rows = (torch.nonzero(bad.any(dim=-1)).flatten() + row0).tolist()[:8]
        raise ValueError(f"{name} has NaN/inf at {int(bad.sum())} valid response tokens (rows {rows})")


class BlockPrefix:
    """Row prefix sums of a `(R, width)` :class:`RowBuffers` buffer, read at any positions from per-block sums.

    ``at(p)`` = ``values[r, :p].sum()`` costs one pass over the buffer (block sums) plus a window of
    :data:`BLOCK` values per query, instead of a full-length cumulative sum. Positions are at most the buffer's
    ``length`` (its last block is padding, so every window is inside it). Sums within a block are taken in the
    buffer's dtype, the prefix over blocks in ``dtype``.
    """

    def __init__(self, values: torch.Tensor, dtype: torch.dtype | None = None):
        rows, width = values.shape
        self.dtype = dtype or values.dtype
        self.values = values
        blocks = values.view(rows, width // BLOCK, BLOCK)
        sums = blocks.sum(dim=-1).to(self.dtype)
        self._flat_blocks = blocks.view(-1, BLOCK)
        self._row_first_block = torch.arange(0, rows * (width // BLOCK), width // BLOCK, device=values.device)
        # before[:, j] = sum of the blocks before block j, j = 0 .. n_blocks
        self.before = torch.nn.functional.pad(sums.cumsum(dim=-1), (1, 0))

    def _window(self, block: torch.Tensor) -> torch.Tensor:
        """`(R, Q, BLOCK)` values of block ``block[r, q]``."""
        flat_index = (block + self._row_first_block[:, None]).flatten()
        return self._flat_blocks.index_select(0, flat_index).view(*block.shape, BLOCK)

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """`(R, Q)` sums of ``values[r, :positions[r, q]]``; positions int64 in [0, length]."""
        block = torch.div(positions, BLOCK, rounding_mode="floor")
        # row o of the table is o ones then zeros: the first (position - block start) values of the window
        window = self._window(block)
        table = _prefix_table(window.dtype, positions.device)
        inside = table.index_select(0, (positions - block * BLOCK).flatten()).view(*positions.shape, BLOCK)
        return self.before.gather(1, block) + torch.linalg.vecdot(window, inside).to(self.dtype)

    def first_reaching(self, targets: torch.Tensor) -> torch.Tensor:
        """`(R, Q)` int64 smallest ``p`` with ``at(p) >= targets[r, q]`` for a 0/1 mask's buffer (counts).

        For an integer target ``k >= 1`` this is one past the position of the k-th valid token; ``k <= 0`` gives 0.
        Targets above the row's total give a position past the last valid token.
        """
        targets = targets.to(self.dtype).contiguous()
        block = torch.searchsorted(self.before[:, 1:].contiguous(), targets, side="left")
        block = block.clamp_max(self.before.shape[1] - 2)
        inside = self._window(block).to(self.dtype).cumsum(dim=-1).add_(self.before.gather(1, block)[..., None])
        offset = torch.searchsorted(inside, targets[..., None], side="left")[..., 0]
        return torch.where(targets > 0, block * BLOCK + offset + 1, torch.zeros_like(block))


_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _prefix_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`(BLOCK + 1, BLOCK)` lower-triangular 0/1 table: row o holds o ones."""
    key = (dtype, device)
    if key not in _TABLES:
        _TABLES[key] = torch.ones(BLOCK + 1, BLOCK, dtype=dtype, device=device).tril(diagonal=-1)
    return _TABLES[key]
