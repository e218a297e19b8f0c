"""The paged KV cache of one stage: K and V in fixed-size blocks of `block_size` positions, taken from a pool as
a session grows and given back the moment it shrinks or closes, so a session's `max_length` is a bound that is
checked, not memory that is reserved.

`BlockPool` holds every block of a stage's layers: k, v [L, Hkv, N, P, D] (one block is P positions of every
layer, so a position's K/V is one block id and an offset whatever the layer), a reference count per block, and the
prefix index: a full block whose tokens are known is sealed under a key chained from the keys of the blocks before
it (the same tokens from position 0, in the same scope, give the same key). A sealed block can be shared by many
sessions at once (reference counted); a write into a shared block copies it first (copy on write), a write into a
sealed block only this session holds unseals it. When its last session lets go, a sealed block stays in the index
(least recently used first out) until a block is needed and none is free.

`PagedCache` is one session's view: a block table per row, the rows' lengths and the tokens they hold. It has the
interface of `KVCache` (plan, update, commit, truncate, reset), so the model computes on either. Its memory is
the blocks it holds.

Threads: the pool's state is behind one lock (blocks are taken on the compute thread and given back by whichever
thread closes a session). A session closed while the compute thread runs one of its steps gives its blocks back
when that step ends (`in_use`), so a block is never handed to another session while a step still writes it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import threading
from collections.abc import Iterator

import torch

from layerline.errors import ResourceExhaustedError
from layerline.kv_cache import ForwardPlan, check_positions, slot_mask

DEFAULT_BLOCK_SIZE = 16
NULL_BLOCK = 0  # never handed out: all zeros, read for the key positions a row of a batch does not have


def block_key(parent: bytes, scope: str, tokens: list[int]) -> bytes:
    """The prefix index's key of a full block: its tokens, the key of the block before it (b"" for the first), and
    the scope it may be shared in (a client key, or "" where the stage shares prefixes across clients)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent)
    h.update(scope.encode())
    h.update(b"\0")
    h.update(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes())
    return h.digest()


class BlockPool:
    """The blocks of one stage's layers, their reference counts and the prefix index."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        budget_bytes: int | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"a block pool needs blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        # one head's blocks side by side: a row's blocks, taken in order from a fresh pool, are one run of memory
        # per head as in a contiguous cache, and attention reads a head's keys a block at a time
        shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
        # Slots past a row's length are read (and masked) in attention, so they must hold no NaN: a block is zeroed
        # when first taken, and block 0, never handed out, is the zeros a row shorter than its batch reads. Not
        # zeros() for the whole pool: on the CPU untouched pages then cost no memory until sessions need them.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self._zero(NULL_BLOCK)
        self._touched = bytearray(num_blocks)
        self.block_size, self.num_blocks = block_size, num_blocks - 1  # usable blocks
        self.block_bytes = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize
        self.budget_bytes = budget_bytes if budget_bytes is not None else num_blocks * self.block_bytes
        self.layer_k, self.layer_v = self.k.unbind(0), self.v.unbind(0)  # per layer: [Hkv, N, P, D]
        self.refs = [0] * num_blocks
        # free blocks: a stack popped from the end (low ids first), with a flag per block; a block taken out of
        # turn (`_take(after=...)`) only loses its flag, and its entry is dropped when the stack reaches it
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self._is_free = bytearray([0]) + bytearray([1]) * (num_blocks - 1)
        self._nfree = num_blocks - 1
        self._cached: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # unheld sealed blocks, LRU
        self._index: dict[bytes, int] = {}  # key -> sealed block
        self._key: dict[int, bytes] = {}  # sealed block -> key
        self.lock = threading.Lock()
        self.hits = 0  # positions found in the prefix index
        self.reserved = 0  # blocks promised to admitted steps (`reserve`), not taken yet

    @classmethod
    def for_budget(cls, num_layers: int, num_kv_heads: int, head_dim: int, budget_bytes: int, **kw) -> BlockPool:
        """As many blocks as `budget_bytes` holds."""
        block_size = kw.get("block_size", DEFAULT_BLOCK_SIZE)
        dtype = kw.get("dtype", torch.float32)
        per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize
        blocks = budget_bytes // per_block
        if blocks <= 0:
            raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block of {per_block} bytes")
        return cls(num_layers, num_kv_heads, head_dim, blocks, budget_bytes=budget_bytes, **kw)

    # -- figures (any thread) --

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self._nfree - len(self._cached)

    @property
    def cached_blocks(self) -> int:
        """Blocks no session holds that the prefix index keeps until they are needed."""
        return len(self._cached)

    @property
    def free_blocks(self) -> int:
        return self._nfree

    @property
    def available_blocks(self) -> int:
        """Blocks a step can be promised now: free ones and cached ones (the least recently used cached go first),
        less those promised to admitted steps already."""
        return self._nfree + len(self._cached) - self.reserved

    def reserve(self, cache: PagedCache, n: int) -> bool:
        """Promise `n` blocks to `cache`'s next step (taken by its forward, the rest given back after it, or when
        the cache closes); False when fewer are available."""
        with self.lock:
            if n > self._nfree + len(self._cached) - self.reserved:
                return False
            self.reserved += n
            cache._promised += n
            return True

    def describe(self) -> str:
        return (
            f"{self.num_blocks} blocks of {self.block_size} positions ({self.num_blocks * self.block_bytes} bytes, "
            f"--kv-cache-bytes): {self.used_blocks} in use, {self.cached_blocks} cached, {self.free_blocks} free"
            + (f", {self.reserved} of them promised to steps already admitted" if self.reserved else "")
        )

    # -- blocks (callers hold self.lock) --

    def _take(self, cache: PagedCache | None = None, after: int | None = None) -> int:
        """A block for `cache` (from its promise when it holds one, else only if none is promised to others);
        block `after + 1` when it is free, so that a row's blocks stay one run of ids (its keys and values are then
        one view of the pool: `PagedCache.update`)."""
        if cache is not None and cache._promised:
            cache._promised -= 1
            self.reserved -= 1
        elif self._nfree + len(self._cached) <= self.reserved:
            raise ResourceExhaustedError(f"the stage's KV cache is full: {self.describe()}")
        if self._nfree:
            blk = after + 1 if after is not None and after + 1 < len(self._is_free) else NULL_BLOCK
            if not self._is_free[blk]:  # (the null block is never free)
                blk = self._free.pop()
                while not self._is_free[blk]:  # taken out of turn before
                    blk = self._free.pop()
            self._is_free[blk] = 0
            self._nfree -= 1
            if not self._touched[blk]:
                self._zero(blk)
                self._touched[blk] = 1
        elif self._cached:
            blk, key = self._cached.popitem(last=False)  # the least recently used cached block
            del self._index[key], self._key[blk]
        else:
            raise ResourceExhaustedError(f"the stage's KV cache is full: {self.describe()}")
        self.refs[blk] = 1
        return blk

    def _hold(self, blk: int) -> None:
        if self.refs[blk] == 0:
            self._cached.pop(blk, None)
        self.refs[blk] += 1

    def _let_go(self, blk: int) -> None:
        self.refs[blk] -= 1
        if self.refs[blk] < 0:
            raise AssertionError(f"block {blk} let go more often than held")
        if self.refs[blk] == 0:
            key = self._key.get(blk)
            if key is not None:
                self._cached[blk] = key
            else:
                self._free.append(blk)
                self._is_free[blk] = 1
                self._nfree += 1
                if len(self._free) > 2 * len(self._is_free):  # entries of blocks taken out of turn: drop them
                    self._free = [b for b in dict.fromkeys(reversed(self._free)) if self._is_free[b]][::-1]

    def _seal(self, blk: int, key: bytes) -> None:
        if key in self._index or blk in self._key:
            return  # the same tokens are sealed in another block already (computed twice): keep that one
        self._index[key], self._key[blk] = blk, key

    def _unseal(self, blk: int) -> None:
        key = self._key.pop(blk, None)
        if key is not None:
            del self._index[key]

    def _zero(self, blk: int) -> None:
        self.k[:, :, blk].zero_()
        self.v[:, :, blk].zero_()

    def _copy(self, src: int, dst: int) -> None:
        self.k[:, :, dst].copy_(self.k[:, :, src])
        self.v[:, :, dst].copy_(self.v[:, :, src])

    def sealed(self, blk: int) -> bool:
        return blk in self._key

    def new_cache(self, rows: int, max_len: int, scope: str = "") -> PagedCache:
        return PagedCache(self, rows, max_len, scope)


class PagedCache:
    """One session's K/V in `pool`'s blocks: `rows` sequences of up to `max_len` positions each. `scope`: the
    prefix index's scope of its blocks (its client's key, or "" where prefixes are shared across clients)."""

    def __init__(self, pool: BlockPool, rows: int, max_len: int, scope: str = "") -> None:
        if rows <= 0 or max_len <= 0:
            raise ValueError(f"a KV cache needs rows > 0 and max_len > 0, got rows={rows}, max_len={max_len}")
        self.pool, self.max_len, self.scope = pool, max_len, scope
        self.lengths = [0] * rows
        self.tables: list[list[int]] = [[] for _ in range(rows)]
        self.tokens: list[list[int] | None] = [[] for _ in range(rows)]  # None: not known (a step came without)
        self.keys: list[list[bytes]] = [[] for _ in range(rows)]  # the keys of each row's first full blocks
        self.computed = 0  # positions this cache's forwards wrote (a prefix found in the index is not computed)
        self._state = threading.Lock()  # _active, _closed
        self._rows = threading.RLock()  # the tables: a prefix attached on the event loop, steps on the compute thread
        self._active = 0
        self._closed = False
        self._promised = 0  # blocks the pool promised this cache's next step (BlockPool.reserve)
        self._changes = [0] * rows  # per row, counts the changes of its block table
        self._table_tensors: dict[int, tuple[int, torch.Tensor]] = {}  # row -> (its changes then, its table)
        self._read_tables: dict[int, tuple[int, torch.Tensor]] = {}  # the same on the pool's device (`_slots`)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def blocks(self) -> int:
        return sum(len(t) for t in self.tables)

    @property
    def nbytes(self) -> int:
        """The bytes of the blocks this session holds (a block shared with other sessions counts for each)."""
        return self.blocks * self.pool.block_bytes

    # -- life --

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Around a step's computation: a close meanwhile gives the blocks back only once the step is over."""
        with self._state:
            self._active += 1
        try:
            yield
        finally:
            with self._state:
                self._active -= 1
                release = self._closed and not self._active
            if release:
                self._release()

    def close(self) -> None:
        """Give every block back (now, or when the step computing on it ends). Idempotent."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            busy = self._active > 0
        if not busy:
            self._release()

    def _release(self) -> None:
        with self._rows:
            with self.pool.lock:
                self.pool.reserved -= self._promised
                self._promised = 0
                for table in self.tables:
                    for blk in table:
                        self.pool._let_go(blk)
                    table.clear()
                self._changes = [c + 1 for c in self._changes]
            self.lengths = [0] * self.rows

    @property
    def promised(self) -> int:
        return self._promised

    def end_promise(self, unused: int) -> None:
        """After a step's forward: `unused` blocks promised to it that it did not take go back."""
        if unused <= 0 or not self._promised:
            return
        with self.pool.lock:
            unused = min(unused, self._promised)
            self.pool.reserved -= unused
            self._promised -= unused

    # -- rows --

    def reset(self, row: int | None = None) -> None:
        for r in range(self.rows) if row is None else [row]:
            self.truncate(r, 0)

    def truncate(self, row: int, length: int) -> None:
        """Roll a row back to its first `length` positions; the blocks past them are given back."""
        with self._rows:
            if not 0 <= length <= self.lengths[row]:
                raise ValueError(f"cannot truncate row {row} of length {self.lengths[row]} to {length}")
            P = self.pool.block_size
            keep = -(-length // P)
            with self.pool.lock:
                for blk in self.tables[row][keep:]:
                    self.pool._let_go(blk)
            del self.tables[row][keep:]
            self._changes[row] += 1
            self.lengths[row] = length
            if self.tokens[row] is not None:
                del self.tokens[row][length:]
            # a block sealed under a key stays sealed while its tokens are unchanged; the partial one is unsealed (or
            # copied) by the first write into it
            del self.keys[row][keep:]

    def attach_prefix(self, row: int, tokens: list[int]) -> int:
        """Take for an empty row the longest run of full blocks of `tokens` that the prefix index holds (in this
        cache's scope); returns the positions it now holds (a multiple of the block size)."""
        with self._rows:
            if self.lengths[row] or self.tables[row]:
                raise ValueError(f"row {row} is not empty: a prefix is attached to empty rows only")
            P, pool = self.pool.block_size, self.pool
            found, keys, parent = [], [], b""
            with pool.lock:
                for i in range(min(len(tokens), self.max_len) // P):
                    key = block_key(parent, self.scope, tokens[i * P : (i + 1) * P])
                    blk = pool._index.get(key)
                    if blk is None:
                        break
                    pool._hold(blk)
                    found.append(blk)
                    keys.append(key)
                    parent = key
                pool.hits += len(found) * P
            n = len(found) * P
            self.tables[row], self.keys[row], self.lengths[row] = found, keys, n
            self._changes[row] += 1
            self.tokens[row] = list(tokens[:n])
            return n

    def fork(self, row: int) -> PagedCache:
        """A one-row cache holding what row `row` holds, sharing its blocks (the first write into a shared block
        copies it)."""
        with self._rows:
            other = PagedCache(self.pool, 1, self.max_len, self.scope)
            with self.pool.lock:
                for blk in self.tables[row]:
                    self.pool._hold(blk)
            other.tables[0], other.lengths[0] = list(self.tables[row]), self.lengths[row]
            other.keys[0] = list(self.keys[row])
            other.tokens[0] = None if self.tokens[row] is None else list(self.tokens[row])
            return other

    # -- a forward --

    def plan(self, positions: torch.Tensor, rows: list[int] | None, windows: set[int | None]) -> ForwardPlan:
        """Check `positions` [B, T] (CPU int64, -1 = padding), take the blocks the new positions need (copying
        a shared block they write into) and prepare the forward's write and read slots."""
        with self._rows:
            if self._closed:
                raise ValueError("the session's KV cache is closed")
            rows, new_lengths, all_valid, valid = check_positions(self.lengths, self.max_len, positions, rows)
            batch, width = positions.shape
            P, pool = self.pool.block_size, self.pool
            taken: list[tuple[int, int]] = []  # (row, block) newly appended: given back if the pool runs out
            with pool.lock:
                try:
                    for r, n in zip(rows, new_lengths, strict=True):
                        old, table = self.lengths[r], self.tables[r]
                        for i in range(old // P, min(len(table), -(-n // P))):  # blocks the new positions write into
                            blk = table[i]
                            if pool.refs[blk] > 1:
                                fresh = pool._take(self, table[i - 1] if i else None)
                                pool._copy(blk, fresh)
                                pool._let_go(blk)
                                table[i] = fresh
                                self._changes[r] += 1
                            elif pool.sealed(blk):
                                pool._unseal(blk)
                            del self.keys[r][i:]
                        while len(table) * P < n:
                            table.append(pool._take(self, table[-1] if table else None))
                            taken.append((r, table[-1]))
                            self._changes[r] += 1
                except ResourceExhaustedError:
                    for r, blk in reversed(taken):
                        self.tables[r].pop()
                        pool._let_go(blk)
                    raise
            longest = max(new_lengths)
            device = pool.k.device
            first = self.lengths[rows[0]]
            start = first if all_valid and all(self.lengths[r] == first for r in rows) else None
            plan = ForwardPlan(
                batch=batch,
                width=width,
                kv_len=longest,
                top=longest,
                positions=positions.clamp(min=0).to(device),
                row_slice=None,
                rows=None,
                start=start,
                scatter=None,  # the slots, made by the first update (a decode step on the kernels needs none)
                new_lengths=new_lengths,
                cache_rows=rows,
                source=positions,
            )
            for w in windows:
                plan.masks[w] = slot_mask(plan.positions, longest, w, shared=start is not None)
            return plan

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: ForwardPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's k, v [B, Hkv, T, D] of `layer` into the rows' blocks; return all keys/values the
        batch sees, read through the block tables: [B, Hkv, S, D]."""
        kc, vc = self.pool.layer_k[layer], self.pool.layer_v[layer]  # [Hkv, N, P, D]
        if plan.paged is None and plan.run is None and plan.one is None:
            self._slots(plan)
        if plan.run is not None:  # one row in one run of blocks: a view of the pool, as a contiguous cache's row
            Hkv, _, P, D = kc.shape
            b0, nblk, s0 = plan.run, -(-plan.kv_len // P), plan.start
            keys = kc[:, b0 : b0 + nblk].reshape(Hkv, nblk * P, D)
            values = vc[:, b0 : b0 + nblk].reshape(Hkv, nblk * P, D)
            keys[:, s0 : s0 + plan.width] = k[0]
            values[:, s0 : s0 + plan.width] = v[0]
            return keys[None, :, : plan.kv_len], values[None, :, : plan.kv_len]
        if plan.one is not None:  # one row, one position: a plain write, and one index_select per tensor
            Hkv, _, P, D = kc.shape
            blk, off, table = plan.one
            kc[:, blk, off] = k[0, :, 0]
            vc[:, blk, off] = v[0, :, 0]
            S = table.numel() * P
            keys = kc.index_select(1, table).view(Hkv, S, D)
            values = vc.index_select(1, table).view(Hkv, S, D)
            return keys[None, :, : plan.kv_len], values[None, :, : plan.kv_len]
        b_idx, t_idx, blk, off, table = plan.paged  # type: ignore[misc]
        kc[:, blk, off] = k[b_idx, :, t_idx].transpose(0, 1)  # [Hkv, n, D]
        vc[:, blk, off] = v[b_idx, :, t_idx].transpose(0, 1)
        B, nblk = table.shape
        Hkv, _, P, D = kc.shape
        keys = kc[:, table].transpose(0, 1).reshape(B, Hkv, nblk * P, D)[:, :, : plan.kv_len]
        values = vc[:, table].transpose(0, 1).reshape(B, Hkv, nblk * P, D)[:, :, : plan.kv_len]
        return keys, values

    def _slots(self, plan: ForwardPlan) -> None:
        """Where the plan's positions are written (block and offset of each) and the blocks each row reads, from
        the block tables as the plan left them."""
        P, positions, longest = self.pool.block_size, plan.source, plan.kv_len
        nblk = -(-longest // P)
        device = self.pool.k.device
        with self._rows:
            held = [self.tables[r][:nblk] for r in plan.cache_rows]
            if len(held) == 1 and plan.start is not None and len(self.tables[plan.cache_rows[0]]) == nblk:
                row, first = plan.cache_rows[0], held[0][0]
                if held[0] == list(range(first, first + nblk)):
                    plan.run = first
                    return
                if plan.width == 1:
                    made = self._read_tables.get(row)
                    if made is None or made[0] != self._changes[row]:
                        made = self._read_tables[row] = (self._changes[row], torch.tensor(held[0], device=device))
                    plan.one = (held[0][plan.start // P], plan.start % P, made[1])
                    return
        table = torch.tensor([t + [NULL_BLOCK] * (nblk - len(t)) for t in held], dtype=torch.int64)  # [B, nblk]
        b_idx, t_idx = (positions >= 0).nonzero(as_tuple=True)
        p = positions[b_idx, t_idx]
        plan.paged = tuple(x.to(device) for x in (b_idx, t_idx, table[b_idx, p // P], p % P, table))

    def commit(self, plan: ForwardPlan) -> None:
        for r, n in zip(plan.cache_rows, plan.new_lengths, strict=True):
            self.computed += n - self.lengths[r]
            self.lengths[r] = n

    def note_tokens(
        self, rows: list[int], tokens: torch.Tensor | None, positions: torch.Tensor | list[list[int]]
    ) -> None:
        """After a forward: the token ids [B, T] of its positions (-1 = padding), so that the rows' full blocks
        can be sealed in the prefix index. Without tokens the rows' content is not known from here on."""
        with self._rows:
            P, pool = self.pool.block_size, self.pool
            seal = []
            token_rows = None if tokens is None else tokens.tolist()
            position_rows = positions if isinstance(positions, list) else positions.tolist()
            for b, r in enumerate(rows):
                if token_rows is None:
                    self.tokens[r] = None
                    continue
                known = self.tokens[r]
                if known is None:
                    continue
                known.extend(t for t, p in zip(token_rows[b], position_rows[b], strict=True) if p >= 0)
                if len(known) != self.lengths[r]:  # not the positions this row holds: stop trusting it
                    self.tokens[r] = None
                    continue
                keys = self.keys[r]
                while (len(keys) + 1) * P <= len(known):
                    i = len(keys)
                    keys.append(block_key(keys[-1] if keys else b"", self.scope, known[i * P : (i + 1) * P]))
                    seal.append((self.tables[r][i], keys[-1]))
            if seal:
                with pool.lock:
                    for blk, key in seal:
                        pool._seal(blk, key)

    # -- the quantized decode kernel's view of a row (quant/decode.py) --

    def kv_row(self, row: int) -> tuple[int, int, int, int, int, int, int, torch.Tensor]:
        """(k, v, layer stride, block stride, head stride, slot stride, block size, block table) in elements."""
        L, Hkv, N, P, D = self.pool.k.shape
        made = self._table_tensors.get(row)
        if made is None or made[0] != self._changes[row]:
            made = self._table_tensors[row] = (self._changes[row], torch.tensor(self.tables[row], dtype=torch.int64))
        table = made[1]
        return (self.pool.k.data_ptr(), self.pool.v.data_ptr(), Hkv * N * P * D, P * D, N * P * D, D, P, table)
