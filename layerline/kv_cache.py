"""The KV cache of one stage: K and V of the stage's own layers for a set of sequences ("rows"), each row up to
`max_len` positions, allocated once so its memory is known before the first token.

A forward pass hands the cache a batch: `rows` (which cache rows the batch rows are) and `positions` [B, T]
(-1 marks padding). Position p of a row lives in slot p, so rows of different lengths share one batch, with left
or right padding, and a row's new positions must continue exactly where it stopped. `plan()` checks all of that
once per forward and precomputes the write indices and attention masks that every layer then reuses.
This module knows nothing of weights or of sessions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from layerline.errors import CacheFullError, PositionError


@dataclass
class ForwardPlan:
    """Everything the layers of one forward pass need to know about where tokens go and what they see."""

    batch: int
    width: int  # T, columns in this forward
    kv_len: int  # S, key slots each query may look at (the longest row after this forward)
    top: int  # 1 + the largest position in this forward (rotary tables must reach it)
    positions: torch.Tensor  # [B, T] on the compute device, padding clamped to 0
    row_slice: slice | None  # the batch rows are cache rows start..stop, in order (cheap views)
    rows: torch.Tensor | None  # else: cache row of each batch row [B]
    start: int | None  # all rows are unpadded and continue from this same length (slice writes)
    scatter: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # else: (batch idx, column idx, slot) [N]
    new_lengths: list[int] = field(default_factory=list)
    cache_rows: list[int] = field(default_factory=list)
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # window -> [B|1, 1, T, S] bool
    source: torch.Tensor | None = None  # a paged cache's: the positions as given (CPU, -1 = padding)
    # a paged cache's, made at the first update: (batch idx, column idx, block, offset) of each position written
    # [N], and the blocks each row reads [B, nblk]
    paged: tuple[torch.Tensor, ...] | None = None
    # a paged cache's, for one row whose blocks are one run of ids and whose step continues it unpadded: the run's
    # first block (its keys and values are then a view of the pool, written and read without index tensors)
    run: int | None = None
    # a paged cache's, for a one-row decode step on scattered blocks: (block, offset) of the position written, and
    # the row's block table on the device (kept while the table is unchanged: one index_select reads it)
    one: tuple[int, int, torch.Tensor] | None = None


class KVCache:
    """K/V for `num_layers` layers x `rows` sequences x `max_len` positions: k, v: [L, R, Hkv, S_max, D]."""

    def __init__(
        self,
        num_layers: int,
        rows: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if rows <= 0 or max_len <= 0:
            raise ValueError(f"a KV cache needs rows > 0 and max_len > 0, got rows={rows}, max_len={max_len}")
        shape = (num_layers, rows, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lengths = [0] * rows
        self._layer_k, self._layer_v = self.k.unbind(0), self.v.unbind(0)  # per-layer views, made once

    @staticmethod
    def bytes_needed(num_layers: int, rows: int, num_kv_heads: int, head_dim: int, max_len: int, itemsize: int) -> int:
        return 2 * num_layers * rows * num_kv_heads * max_len * head_dim * itemsize

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reset(self, row: int | None = None) -> None:
        """Forget a row's (or every row's) tokens; the memory stays allocated for reuse."""
        if row is None:
            self.lengths = [0] * self.rows
        else:
            self.lengths[row] = 0

    def truncate(self, row: int, length: int) -> None:
        """Roll a row back to its first `length` positions (later slots are overwritten on reuse)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"cannot truncate row {row} of length {self.lengths[row]} to {length}")
        self.lengths[row] = length

    def plan(self, positions: torch.Tensor, rows: list[int] | None, windows: set[int | None]) -> ForwardPlan:
        """Check `positions` [B, T] (CPU int64, -1 = padding) against the rows' lengths and prepare the forward."""
        rows, new_lengths, all_valid, valid = check_positions(self.lengths, self.max_len, positions, rows)
        batch, width = positions.shape
        longest = max(new_lengths)
        device = self.k.device
        lo, hi = min(rows), max(rows)
        contiguous = rows == list(range(lo, hi + 1))
        first = self.lengths[rows[0]]
        start = first if all_valid and all(self.lengths[r] == first for r in rows) else None
        scatter = None
        if start is None:
            if valid is None:
                valid = positions >= 0
            b_idx, t_idx = valid.nonzero(as_tuple=True)
            slots = positions[b_idx, t_idx]
            scatter = (b_idx.to(device), t_idx.to(device), slots.to(device))
        plan = ForwardPlan(
            batch=batch,
            width=width,
            kv_len=longest,
            top=longest,
            positions=positions.clamp(min=0).to(device),
            row_slice=slice(lo, hi + 1) if contiguous else None,
            rows=None if contiguous else torch.tensor(rows, dtype=torch.int64, device=device),
            start=start,
            scatter=scatter,
            new_lengths=new_lengths,
            cache_rows=rows,
        )
        for w in windows:
            plan.masks[w] = slot_mask(plan.positions, longest, w, shared=start is not None)
        return plan

    def commit(self, plan: ForwardPlan) -> None:
        for r, n in zip(plan.cache_rows, plan.new_lengths, strict=True):
            self.lengths[r] = n

    # what a paged cache (paged_kv.py) does besides, nothing here: the memory is the cache's own until it goes

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        pass

    promised = 0  # blocks promised to steps (a paged cache's; none here)

    def end_promise(self, unused: int) -> None:
        pass

    def note_tokens(
        self, rows: list[int], tokens: torch.Tensor | None, positions: torch.Tensor | list[list[int]]
    ) -> None:
        pass

    def kv_row(self, row: int) -> tuple[int, int, int, int, int, int, int, torch.Tensor]:
        """The quantized decode kernel's view of a row (quant/decode.py): (k, v, layer stride, block stride, head
        stride, slot stride, block size, block table) in elements; here the row is one block of max_len slots."""
        _, R, Hkv, S, D = self.k.shape
        offset = row * Hkv * S * D * self.k.element_size()
        table = torch.zeros(1, dtype=torch.int64)
        return (self.k.data_ptr() + offset, self.v.data_ptr() + offset, R * Hkv * S * D, 0, S * D, D, S, table)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: ForwardPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's k, v [B, Hkv, T, D] of `layer`, return all keys/values the batch sees:
        [B, Hkv, S, D]."""
        kc, vc = self._layer_k[layer], self._layer_v[layer]  # [R, Hkv, S_max, D]
        rows = plan.row_slice if plan.row_slice is not None else plan.rows
        if plan.start is not None:
            s0, s1 = plan.start, plan.start + plan.width
            kc[rows, :, s0:s1] = k
            vc[rows, :, s0:s1] = v
        else:
            b_idx, t_idx, slots = plan.scatter  # type: ignore[misc]
            r_idx = b_idx + plan.row_slice.start if plan.row_slice is not None else plan.rows[b_idx]
            kc[r_idx, :, slots] = k[b_idx, :, t_idx]  # [N, Hkv, D]
            vc[r_idx, :, slots] = v[b_idx, :, t_idx]
        return kc[rows, :, : plan.kv_len], vc[rows, :, : plan.kv_len]


SMALL = 64  # positions per forward up to which the checks run in plain Python


def check_positions(
    lengths: list[int], max_len: int, positions: torch.Tensor, rows: list[int] | None
) -> tuple[list[int], list[int], bool, torch.Tensor | None]:
    """The checks every cache makes of a forward's `positions` [B, T] (CPU int64, -1 = padding) for cache rows
    `rows` (None: 0..B-1) holding `lengths`: each row continues exactly where it stopped and stays within `max_len`.
    Returns (rows, the rows' lengths after the forward, whether no position is padding, the validity mask when it
    was computed)."""
    batch = positions.shape[0]
    if rows is None:
        rows = list(range(batch))
    if len(rows) != batch:
        raise ValueError(f"{batch} batch rows but {len(rows)} cache rows given")
    if len(set(rows)) != len(rows):
        raise ValueError("a cache row appears twice in one batch")
    for r in rows:
        if not 0 <= r < len(lengths):
            raise ValueError(f"cache row {r} out of range (cache has {len(lengths)} rows)")
    valid = None
    if positions.numel() <= SMALL:
        new_lengths, all_valid = _check_small(lengths, positions, rows)
    else:
        valid = positions >= 0
        held = torch.tensor([lengths[r] for r in rows], dtype=torch.int64)
        expected = held[:, None] + valid.cumsum(1) - 1  # [B, T]
        bad = valid & (positions != expected)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise PositionError(_gap_message(b, t, int(positions[b, t]), int(expected[b, t]), int(held[b])))
        new_lengths = (held + valid.sum(1)).tolist()
        all_valid = bool(valid.all())
    longest = max(new_lengths)
    if longest > max_len:
        b = new_lengths.index(longest)
        raise CacheFullError(f"row {b} would reach {longest} positions, over the cache's max length of {max_len}")
    return rows, new_lengths, all_valid, valid


def _check_small(lengths: list[int], positions: torch.Tensor, rows: list[int]) -> tuple[list[int], bool]:
    """The position checks in plain Python: for the few positions of a decode step this is several times faster
    than the tensor version."""
    new_lengths, all_valid = [], True
    for b, (r, row) in enumerate(zip(rows, positions.tolist(), strict=True)):
        n = lengths[r]
        for t, p in enumerate(row):
            if p < 0:
                all_valid = False
            elif p != n:
                raise PositionError(_gap_message(b, t, p, n, lengths[r]))
            else:
                n += 1
        new_lengths.append(n)
    return new_lengths, all_valid


def _gap_message(b: int, t: int, got: int, expected: int, held: int) -> str:
    return (
        f"row {b}: position {got} at column {t} does not continue the sequence "
        f"(expected {expected}; the cache holds {held} positions)"
    )


def chunk_plan(positions: torch.Tensor, windows: set[int | None], device: torch.device) -> ForwardPlan:
    """A plan for a forward without cache: each row attends within this chunk only, by position."""
    batch, width = positions.shape
    plan = ForwardPlan(
        batch=batch,
        width=width,
        kv_len=width,
        top=int(positions.max()) + 1,
        positions=positions.clamp(min=0).to(device),
        row_slice=None,
        rows=None,
        start=None,
        scatter=None,
    )
    valid = (positions >= 0).to(device)
    for w in windows:
        m = _visible(plan.positions[:, None, :], plan.positions[:, :, None], w)  # [B, T(query), T(key)]
        m = m & valid[:, None, :]
        m = m | ~m.any(-1, keepdim=True)  # a padding query with nothing visible sees everything (no NaN)
        plan.masks[w] = m.unsqueeze(1)
    return plan


def _visible(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    ok = key_pos <= query_pos
    if window is not None:
        ok = ok & (key_pos > query_pos - window)
    return ok


def slot_mask(positions: torch.Tensor, kv_len: int, window: int | None, shared: bool) -> torch.Tensor | None:
    """[B|1, 1, T, S] bool: slot s is visible to the query at positions[b, t]. None when every query sees every
    slot (one decode column per row, no window) so attention can skip the mask."""
    width = positions.shape[1]
    if width == 1 and window is None and shared:
        return None
    slots = torch.arange(kv_len, device=positions.device)
    query = positions[:1] if shared else positions  # with a shared start every row has the same positions
    return _visible(slots[None, None, :], query[:, :, None], window).unsqueeze(1)
