"""The paged KV cache against the contiguous one (the oracle: the same model computing on a cache allocated whole),
and the block pool's bookkeeping: blocks taken as rows grow and given back as they shrink or close, prefixes
shared and copied on write, and no block ever readable by a session it does not belong to."""

from __future__ import annotations

import random

import pytest
import torch

from layerline.errors import CacheFullError, ResourceExhaustedError
from layerline.kv_cache import KVCache
from layerline.paged_kv import BlockPool, PagedCache
from layerline.pipeline import LocalPipeline
from tiny_models import TinySpec, write_gguf

SPEC = TinySpec("llama", layers=4, kv_heads=2)


@pytest.fixture(scope="module")
def stage(tiny_checkpoint):
    folder, _ = tiny_checkpoint(SPEC)
    return LocalPipeline.load(folder, [(0, 4)], torch.float32).stages[0]


@pytest.fixture(scope="module")
def quantized_stage(tiny_checkpoint, tmp_path_factory):
    _, model = tiny_checkpoint(SPEC)
    path = str(tmp_path_factory.mktemp("paged") / "m.Q8_0.gguf")
    write_gguf(model, path, "Q8_0")
    s = LocalPipeline.load(path, [(0, 4)]).stages[0]
    assert s.decoder is not None  # decode steps take the one-call kernel, which reads through the block table
    return s


def pool_for(stage, blocks: int = 64, block_size: int = 4) -> BlockPool:
    c = stage.config
    return BlockPool(stage.num_layers, c.num_kv_heads, c.head_dim, blocks, block_size, stage.dtype)


def ids(n: int, seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (rows, n), generator=torch.Generator().manual_seed(seed))


def greedy(stage, cache, prompt: torch.Tensor, steps: int, rows=None) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill `prompt` [B, T] then decode greedily; the logits of every step and the tokens. A paged cache is told
    each step's tokens, as a stage does."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        held = [cache.lengths[r] for r in rows or range(x.shape[0])]
        positions = torch.tensor(held)[:, None] + torch.arange(x.shape[1])
        out = stage(x, positions, cache, rows, last_only=True)
        cache.note_tokens(rows or list(range(x.shape[0])), x, positions)
        return out

    logits = [forward(prompt)]
    tokens = [logits[-1][:, -1].argmax(-1)]
    for _ in range(steps):
        logits.append(forward(tokens[-1][:, None]))
        tokens.append(logits[-1][:, -1].argmax(-1))
    return logits, [t.tolist() for t in tokens]


@pytest.mark.parametrize("which", ["float32", "quantized"])
def test_one_session_computes_what_the_contiguous_cache_does(stage, quantized_stage, which):
    s = stage if which == "float32" else quantized_stage
    prompt = ids(11, 1)  # not a multiple of the block size: the last block is partial
    ref_logits, ref_tokens = greedy(s, s.new_cache(1, 40), prompt, 20)
    paged = pool_for(s).new_cache(1, 40)
    logits, tokens = greedy(s, paged, prompt, 20)
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits, strict=True):
        assert (a - b).abs().max().item() <= 1e-5
    assert paged.lengths == [31] and paged.blocks == -(-31 // 4)


def test_rows_of_different_lengths_and_batched_sessions(stage):
    """A two-row session whose rows differ in length, decoded in one forward, and two sessions batched in one pass
    (forward_many), each against its own contiguous twin."""
    a, b = ids(9, 2), ids(5, 3)
    ref, paged = stage.new_cache(2, 32), pool_for(stage).new_cache(2, 32)
    for cache in (ref, paged):
        stage(a, cache=cache, rows=[0])
        stage(b, cache=cache, rows=[1])
    step = torch.tensor([[7], [8]])
    want = stage(step, cache=ref, last_only=True)
    got = stage(step, cache=paged, last_only=True)
    assert (got - want).abs().max().item() <= 1e-5 and paged.lengths == [10, 6]
    # a padded prefill of both rows at once
    pos = torch.tensor([[10, 11, 12], [-1, -1, 6]])
    x = ids(3, 4, rows=2)
    assert (stage(x, pos, paged) - stage(x, pos, ref)).abs().max().item() <= 1e-5

    pool = pool_for(stage)
    refs = [stage.new_cache(1, 32) for _ in range(2)]
    pages = [pool.new_cache(1, 32) for _ in range(2)]
    for i, (r, p) in enumerate(zip(refs, pages, strict=True)):
        stage(ids(6 + 3 * i, 10 + i), cache=r)
        stage(ids(6 + 3 * i, 10 + i), cache=p)
    x = torch.tensor([[5]]), torch.tensor([[9]])
    want = stage.forward_many([(x[0], torch.tensor([[6]]), refs[0], None), (x[1], torch.tensor([[9]]), refs[1], None)])
    got = stage.forward_many([(x[0], torch.tensor([[6]]), pages[0], None), (x[1], torch.tensor([[9]]), pages[1], None)])
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max().item() <= 1e-5


def test_batched_decode_on_the_kernels_reads_each_sessions_blocks(quantized_stage):
    s = quantized_stage
    pool = pool_for(s)
    refs = [s.new_cache(1, 32) for _ in range(3)]
    pages = [pool.new_cache(1, 32) for _ in range(3)]
    for i in range(3):
        for c in (refs[i], pages[i]):
            s(ids(3 + 4 * i, 20 + i), cache=c)
    parts = lambda caches: [  # noqa: E731
        (torch.tensor([[4 + i]]), torch.tensor([[c.lengths[0]]]), c, None) for i, c in enumerate(caches)
    ]
    for g, w in zip(s.forward_many(parts(pages)), s.forward_many(parts(refs)), strict=True):
        assert (g - w).abs().max().item() <= 1e-5


def test_blocks_are_taken_as_a_row_grows_and_given_back_as_it_shrinks(stage):
    pool = pool_for(stage, blocks=9, block_size=4)  # 8 and the null block
    cache = pool.new_cache(1, 1000)  # the max length is a bound, not a reservation
    assert pool.used_blocks == 0 and cache.nbytes == 0
    stage(ids(9, 5), cache=cache)
    assert cache.blocks == 3 and pool.used_blocks == 3 and pool.free_blocks == 5
    cache.truncate(0, 4)
    assert cache.blocks == 1 and pool.free_blocks == 7
    stage(ids(28, 6), torch.arange(4, 32)[None], cache)  # all 8 blocks
    with pytest.raises(ResourceExhaustedError, match="KV cache is full: 8 blocks of 4 positions"):
        stage(ids(1, 7), torch.tensor([[32]]), cache)
    assert cache.lengths == [32]  # the refused step changed nothing
    with pytest.raises(CacheFullError):
        pool.new_cache(1, 3).plan(torch.arange(4)[None], None, set())
    cache.close()
    assert pool.used_blocks == 0 and pool.free_blocks == 8


def test_a_close_during_a_step_gives_the_blocks_back_when_the_step_ends(stage):
    pool = pool_for(stage, blocks=9)
    cache = pool.new_cache(1, 32)
    with cache.in_use():
        stage(ids(8, 1), cache=cache)
        cache.close()
        assert pool.used_blocks == 2  # still being computed on
    assert pool.used_blocks == 0


def test_a_shared_prefix_is_computed_once_and_a_divergent_write_copies_only_the_partial_block(stage):
    P = 4
    pool = pool_for(stage, blocks=64, block_size=P)
    prompt_a = ids(33, 8)[0].tolist()
    prompt_b = prompt_a[:32]  # the first 8 blocks of a, whole: b then generates its own continuation
    alone = {
        name: greedy(stage, stage.new_cache(1, 64), torch.tensor([p]), 6)
        for name, p in (("a", prompt_a), ("b", prompt_b))
    }

    a = pool.new_cache(1, 64, scope="client-1")
    assert greedy(stage, a, torch.tensor([prompt_a]), 6)[1] == alone["a"][1]
    b = pool.new_cache(1, 64, scope="client-1")
    assert b.attach_prefix(0, prompt_b) == 32  # every block of its prompt is cached
    b.truncate(0, 31)  # as a client does: the last prompt token is computed, for its logits
    before, computed = pool.used_blocks, b.computed
    got_b = greedy(stage, b, torch.tensor([prompt_b[31:]]), 6)
    assert b.computed - computed == 1 + 6  # the one prompt position and the decode steps, nothing of the prefix
    assert got_b[1] == alone["b"][1]
    for x, y in zip(got_b[0], alone["b"][0], strict=True):
        assert (x - y).abs().max().item() <= 1e-4
    # the write at 31 went into block 7 (positions 28..31), shared with a: it alone was copied
    assert b.tables[0][:7] == a.tables[0][:7] and b.tables[0][7] != a.tables[0][7]
    assert pool.used_blocks == before + 1 + 2  # the copy, and two blocks for positions 32..37


def test_prefixes_are_shared_within_a_scope_only_and_a_closed_sessions_blocks_stay_cached(stage):
    pool = pool_for(stage, blocks=17, block_size=4)
    tokens = ids(12, 9)[0].tolist()
    a = pool.new_cache(1, 64, scope="key-a")
    stage(torch.tensor([tokens]), cache=a)
    a.note_tokens([0], torch.tensor([tokens]), torch.arange(12)[None])
    a.close()
    assert pool.used_blocks == 0 and pool.cached_blocks == 3 and pool.available_blocks == 16
    assert pool.new_cache(1, 64, scope="key-b").attach_prefix(0, tokens) == 0  # another client's: nothing
    mine = pool.new_cache(1, 64, scope="key-a")
    assert mine.attach_prefix(0, tokens + [1, 2]) == 12 and pool.cached_blocks == 0 and pool.used_blocks == 3
    mine.close()
    # cached blocks go when memory is needed, least recently used first
    big = pool.new_cache(1, 64, scope="key-c")
    stage(ids(60, 10), cache=big)
    assert pool.cached_blocks == 1 and pool.used_blocks == 15
    assert pool.new_cache(1, 64, scope="key-a").attach_prefix(0, tokens) == 0  # its first block went first


def test_block_tables_never_share_a_block_that_is_written(stage):
    """Random open / step / truncate / fork / attach / close sequences on one small pool, each session's K/V
    checked against what was written for it: no session ever reads another's positions, and the reference counts
    always match the tables."""
    c = stage.config
    Hkv, D, P, L = c.num_kv_heads, c.head_dim, 3, 2
    pool = BlockPool(L, Hkv, D, 24, P)
    rng = random.Random(0)
    sessions: dict[int, tuple[PagedCache, list[list[float]]]] = {}  # id -> (cache, per row: value of each position)
    next_id = 0

    def write(cache: PagedCache, shadow: list[list[float]], row: int, n: int) -> None:
        """n more positions: few distinct tokens (prefixes repeat across sessions), and at each position a value
        that follows from the tokens up to it, as K/V do."""
        start = cache.lengths[row]
        positions = torch.arange(start, start + n)[None]
        plan = cache.plan(positions, [row], set())
        history = list(cache.tokens[row] or [])
        new = [rng.randrange(2) for _ in range(n)]
        vals = [float(hash(tuple(history + new[: i + 1])) % 1_000_000) for i in range(n)]
        k = torch.tensor(vals).view(1, 1, n, 1).expand(1, Hkv, n, D).contiguous()
        for layer in range(L):
            cache.update(layer, k * (layer + 1), -k, plan)
        cache.commit(plan)
        shadow[row].extend(vals)
        cache.note_tokens([row], torch.tensor([new]), positions)

    def check() -> None:
        held = [0] * len(pool.refs)  # the usable blocks and the null block
        for cache, shadow in sessions.values():
            for row in range(cache.rows):
                n = cache.lengths[row]
                assert len(cache.tables[row]) == -(-n // P)
                for blk in cache.tables[row]:
                    held[blk] += 1
                if not n:
                    continue
                blk = torch.tensor([cache.tables[row][p // P] for p in range(n)])
                off = torch.arange(n) % P
                for layer in range(L):
                    got = pool.k[layer][0, blk, off, 0]
                    assert got.tolist() == [v * (layer + 1) for v in shadow[row][:n]], (layer, row)
                    assert pool.v[layer][0, blk, off, 0].tolist() == [-v for v in shadow[row][:n]]
        assert held == pool.refs
        assert pool.used_blocks == sum(1 for r in pool.refs if r)

    for _ in range(400):
        op = rng.choice(["open", "step", "step", "step", "truncate", "fork", "attach", "close"])
        try:
            if op == "open" or not sessions:
                sessions[next_id] = (pool.new_cache(2, 40, scope="s"), [[], []])
                next_id += 1
            else:
                sid = rng.choice(list(sessions))
                cache, shadow = sessions[sid]
                row = rng.randrange(cache.rows)
                if op == "step":
                    write(cache, shadow, row, rng.randint(1, 7))
                elif op == "truncate":
                    n = rng.randint(0, cache.lengths[row])
                    cache.truncate(row, n)
                    del shadow[row][n:]
                elif op == "fork":
                    sessions[next_id] = (cache.fork(row), [list(shadow[row])])
                    next_id += 1
                elif op == "attach":
                    toks = cache.tokens[row]
                    if toks:
                        new = pool.new_cache(1, 40, scope="s")
                        n = new.attach_prefix(0, list(toks))  # the blocks may be another session's: same tokens
                        sessions[next_id] = (new, [list(shadow[row][:n])])
                        next_id += 1
                elif op == "close":
                    cache.close()
                    del sessions[sid]
        except (ResourceExhaustedError, CacheFullError):
            pass
        check()
    for cache, _ in sessions.values():
        cache.close()
    assert pool.used_blocks == 0 and sum(pool.refs) == 0


def test_the_contiguous_cache_is_unchanged(stage):
    cache = stage.new_cache(1, 8)
    assert isinstance(cache, KVCache) and cache.nbytes == KVCache.bytes_needed(4, 1, 2, stage.config.head_dim, 8, 4)


def test_blocks_promised_to_a_step_are_not_taken_by_another(stage):
    """A stage promises an admitted step its blocks (stage_server/kv.py): another session's step cannot take them,
    and what the step does not use goes back."""
    pool = pool_for(stage, blocks=5, block_size=4)  # 4 usable
    a, b = pool.new_cache(1, 64), pool.new_cache(1, 64)
    assert pool.reserve(a, 3) and not pool.reserve(b, 2) and pool.available_blocks == 1
    with pytest.raises(ResourceExhaustedError):
        stage(ids(8, 1), cache=b)  # 2 blocks, and only 1 is not promised
    assert b.blocks == 0 and pool.free_blocks == 4  # the refused step took nothing
    stage(ids(8, 2), cache=a)  # takes 2 of its 3
    assert a.promised == 1 and pool.reserved == 1
    a.end_promise(1)
    assert a.promised == 0 and pool.reserved == 0 and pool.available_blocks == 2
    assert pool.reserve(b, 2)
    b.close()  # a closed cache's promise goes back too
    assert pool.reserved == 0 and pool.available_blocks == 2


def test_a_row_keeps_one_run_of_blocks_and_computes_the_same_on_it_as_on_scattered_blocks(stage, monkeypatch):
    """A row whose blocks are consecutive ids is read and written as one view of the pool (`ForwardPlan.run`), a row
    whose blocks are scattered through index tensors: both give the contiguous cache's logits. The pool hands a
    growing row the block after its last one when that is free, also after other sessions' blocks came back out of
    order."""
    P = 4
    pool = pool_for(stage, blocks=64, block_size=P)
    ref = greedy(stage, stage.new_cache(1, 48), ids(6, 30), 20)
    warm = pool.new_cache(1, 48)
    stage(ids(10, 31), cache=warm)  # blocks 1, 2 and a partial 3, their tokens not told: none sealed
    warm.close()  # all three back to the free blocks, in table order: 3 is the next one out, then 2 and 1
    alone = pool.new_cache(1, 48)
    seen: dict[int, list] = {}
    plan = PagedCache.plan

    def spy(self, *args):
        p = plan(self, *args)
        seen.setdefault(id(self), []).append(p)
        return p

    monkeypatch.setattr(PagedCache, "plan", spy)
    got = greedy(stage, alone, ids(6, 30), 20)
    t = alone.tables[0]
    assert t == list(range(t[0], t[0] + len(t))) and len(t) == -(-26 // P)
    assert all(p.run == t[0] and p.paged is None for p in seen[id(alone)])  # every step took the view
    assert got[1] == ref[1]
    for x, y in zip(got[0], ref[0], strict=True):
        assert (x - y).abs().max().item() <= 1e-5

    # two sessions growing in turn take blocks in turn: neither row is one run, and both compute what they should
    a, b = pool.new_cache(1, 48), pool.new_cache(1, 48)
    prompts = ids(3, 32), ids(3, 33)
    refs = [greedy(stage, stage.new_cache(1, 48), p, 16) for p in prompts]
    logits: list[list[torch.Tensor]] = [[], []]
    x = list(prompts)
    for _ in range(17):
        for i, cache in enumerate((a, b)):
            positions = torch.tensor([[cache.lengths[0]]]) + torch.arange(x[i].shape[1])
            out = stage(x[i], positions, cache, None, last_only=True)
            cache.note_tokens([0], x[i], positions)
            logits[i].append(out)
            x[i] = out[:, -1].argmax(-1)[:, None]
    for cache, got_logits, (want, _) in zip((a, b), logits, refs, strict=True):
        t = cache.tables[0]
        assert t != list(range(t[0], t[0] + len(t)))
        decode_plans = seen[id(cache)][1:]  # after the prompt: one-position steps, read with the row's table
        assert all(p.run is None and p.one is not None and p.paged is None for p in decode_plans[P:])
        for g, w in zip(got_logits, want, strict=True):
            assert (g - w).abs().max().item() <= 1e-5
    for cache in (a, b, alone):
        cache.close()
    assert pool.used_blocks == 0 and pool.free_blocks + pool.cached_blocks == pool.num_blocks


def test_the_free_blocks_stay_counted_through_many_out_of_turn_takes(stage):
    pool = pool_for(stage, blocks=9, block_size=2)  # 8 usable
    rng = random.Random(5)
    caches: list[PagedCache] = []
    for _ in range(400):
        if caches and (rng.random() < 0.4 or pool.available_blocks < 2):
            caches.pop(rng.randrange(len(caches))).close()
        else:
            cache = pool.new_cache(1, 16)
            stage(ids(rng.randint(1, 4), rng.randrange(1000)), cache=cache)  # no tokens told: nothing is sealed
            caches.append(cache)
        held = [blk for c in caches for blk in c.tables[0]]
        assert len(set(held)) == len(held) and pool.used_blocks == len(held)
        assert pool.free_blocks == 8 - len(held) and len(pool._free) <= 2 * 9 + 1
