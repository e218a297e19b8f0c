"""The stage's KV memory, on the event loop: one block pool per set of layers served (`layerline/paged_kv.py`),
the caches sessions get from it, the wait for a block when none is free, prefixes attached to new sessions, and
the figures Info, the heartbeat and Prometheus report.

Paged (the default, --kv-block-size > 0): a session reserves nothing when it opens; its steps take blocks as its
rows grow. A session is admitted while the pool has a block per row to give. A step whose new positions need more
blocks than are free waits up to --kv-wait-ms for sessions to end or shrink, then fails with RESOURCE_EXHAUSTED
naming the budget; no admitted session's step is refused or changed for another's sake. Blocks of ended sessions
whose tokens are known stay in the prefix index until they are needed (least recently used first).

Contiguous (--kv-block-size 0): each session's whole max_length is reserved when it opens (`SessionTable`'s
budget), as before paging.

A stage re-planned onto other layers gets a new pool for them; the old pool goes with the last session on it.
"""

from __future__ import annotations

import asyncio
import time
import weakref

from layerline.errors import ResourceExhaustedError
from layerline.kv_cache import KVCache
from layerline.model import StageModel
from layerline.paged_kv import BlockPool, PagedCache
from layerline.stage_server.admission import WorkItem
from layerline.stage_server.config import StageConfig
from layerline.stage_server.sessions import Session, SessionTable

POLL_S = 0.01  # how often a step waiting for a block looks again


class StageKV:
    def __init__(self, config: StageConfig, sessions: SessionTable, clock=time.monotonic) -> None:
        self.config, self.sessions, self.clock = config, sessions, clock
        self.paged = config.kv_block_size > 0
        self._current: tuple[weakref.ref[StageModel], BlockPool] | None = None  # the pool of the layers served
        self._all: weakref.WeakSet[BlockPool] = weakref.WeakSet()  # and pools still held by older sessions
        self.waits = 0  # steps that had to wait for a block
        self.refused = 0  # steps refused after waiting

    def pool(self, model: StageModel) -> BlockPool:
        """The pool of `model`'s layers (made on first use, with the whole KV budget)."""
        if self._current is not None and self._current[0]() is model:
            return self._current[1]
        c = model.config
        pool = BlockPool.for_budget(
            model.num_layers,
            c.num_kv_heads,
            c.head_dim,
            self.config.kv_cache_bytes,
            block_size=self.config.kv_block_size,
            dtype=model.dtype,
            device=model.device,
        )
        self._current = (weakref.ref(model), pool)
        self._all.add(pool)
        return pool

    def reserve(self, model: StageModel, rows: int, max_length: int) -> int:
        """Bytes a new session reserves at open: its whole cache when not paged, nothing when paged (its blocks
        come as it grows) though a block per row must be there to take."""
        if not self.paged:
            return model.cache_bytes(rows, max_length)
        pool = self.pool(model)
        if pool.available_blocks < rows:
            raise ResourceExhaustedError(
                f"no KV block free for a session of {rows} rows: {pool.describe()}; retry when sessions end"
            )
        return 0

    def new_cache(self, model: StageModel, rows: int, max_length: int, owner: str) -> KVCache | PagedCache:
        if not self.paged:
            return model.new_cache(rows, max_length)
        scope = "" if self.config.share_prefixes else owner
        return self.pool(model).new_cache(rows, max_length, scope)

    # -- figures --

    def pools(self) -> list[BlockPool]:
        return list(self._all)

    @property
    def used_bytes(self) -> int:
        """What sessions hold: reservations, or blocks (a block shared by several sessions counts once)."""
        return self.sessions.used_bytes + sum(p.used_blocks * p.block_bytes for p in self.pools())

    def blocks(self) -> tuple[int, int, int, int]:
        """(total, used, cached, prefix hit positions) over the pools; zeros when not paged."""
        pools = self.pools()
        total = self._current[1].num_blocks if self._current is not None else 0
        return (
            total,
            sum(p.used_blocks for p in pools),
            sum(p.cached_blocks for p in pools),
            sum(p.hits for p in pools),
        )

    # -- a step's blocks --

    @staticmethod
    def blocks_needed(session: Session, item: WorkItem) -> int:
        """Blocks the step's new positions may take beyond what the rows hold, a copy of a shared block they write
        into included (steps of the session still queued are counted again: an upper bound)."""
        cache = session.cache
        if not isinstance(cache, PagedCache):
            return 0
        P, refs = cache.pool.block_size, cache.pool.refs
        rows = item.position_rows  # a small step's positions as lists: cheaper than a reduction
        top = [max(r) for r in rows] if rows is not None else item.positions.max(dim=1).values.tolist()
        need, extra = 0, item.step.propose  # a draft's proposals may add as many positions (drafting.py)
        for r, p in zip(item.rows, top, strict=True):
            if p < 0:
                continue
            p += extra
            table = cache.tables[r]
            need += max(0, -(-(p + 1) // P) - len(table))
            at = cache.lengths[r] // P
            if at < len(table) and refs[table[at]] > 1:
                need += 1
        return need

    async def wait_for_blocks(self, item: WorkItem) -> None:
        """Promise the step the blocks it needs (the compute thread's forward takes them), waiting up to
        --kv-wait-ms for them; then ResourceExhaustedError naming the budget."""
        cache = item.session.cache
        if not isinstance(cache, PagedCache):
            return
        need = self.blocks_needed(item.session, item)
        pool = cache.pool
        if not need or pool.reserve(cache, need):
            item.kv_promised = need
            return
        self.waits += 1
        deadline = self.clock() + self.config.kv_wait_s
        while not pool.reserve(cache, need):
            if self.clock() >= deadline or item.session.closed:
                self.refused += 1
                raise ResourceExhaustedError(
                    f"the stage's KV cache is full: the step needs {need} more blocks and they did not come free "
                    f"in {self.config.kv_wait_s:g} s (--kv-wait-ms); {pool.describe()}"
                )
            await asyncio.sleep(POLL_S)
        item.kv_promised = need

    # -- prefixes --

    def attach_prefix(self, session: Session, rows: list[int], tokens: list[int]) -> int:
        """The positions of `tokens` the session's (empty) rows now hold from the prefix index (0 when not
        paged); the last stage's sampler learns them too."""
        cache = session.cache
        if not isinstance(cache, PagedCache) or not tokens:
            return 0
        for r in rows:
            if cache.lengths[r]:
                raise ValueError(f"row {r} already holds {cache.lengths[r]} positions: prefixes attach to empty rows")
        held = min(cache.attach_prefix(r, tokens) for r in rows)
        for r in rows:
            cache.truncate(r, held)  # every row the same: the client continues all of them from there
            if session.sampler is not None:
                session.sampler.history[r] = list(tokens[:held])
        if session.rows == 1:  # the conversation so far, for a first stage's draft (drafting.py)
            session.seen = list(tokens[:held])
        return held
