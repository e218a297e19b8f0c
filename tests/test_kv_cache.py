"""The KV cache on its own terms: incremental decode equals a full recompute, rows of different lengths share a
batch, positions must continue exactly, the max length holds, and the memory it reports is what it holds."""

from __future__ import annotations

import pytest
import torch

from layerline.errors import CacheFullError, PositionError
from layerline.kv_cache import KVCache
from layerline.pipeline import LocalPipeline
from tiny_models import TinySpec

SPEC = TinySpec("llama", layers=4, kv_heads=2)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    folder, _ = tiny_checkpoint(SPEC)
    return LocalPipeline.load(folder, [(0, 1), (1, 4)])


def test_incremental_decode_equals_full_recompute(pipe):
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    full = pipe.forward(ids)
    caches = pipe.new_caches(1, 24)
    steps = [pipe.forward(ids[:, :10], caches=caches)]
    for t in range(10, 24):
        steps.append(pipe.forward(ids[:, t : t + 1], caches=caches))
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


def test_rows_at_different_positions_in_one_batch(pipe):
    """Two sequences of different lengths decode in one forward (per-row positions), as each would alone."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 300, (1, 9), generator=g), torch.randint(0, 300, (1, 4), generator=g)
    ref_a, ref_b = pipe.forward(a), pipe.forward(b)
    caches = pipe.new_caches(2, 16)
    pipe.forward(a[:, :8], caches=caches, rows=[0])
    pipe.forward(b[:, :3], caches=caches, rows=[1])
    step = torch.tensor([[a[0, 8]], [b[0, 3]]])
    out = pipe.forward(step, torch.tensor([[8], [3]]), caches)
    assert (out[0, 0] - ref_a[0, 8]).abs().max() <= 1e-4
    assert (out[1, 0] - ref_b[0, 3]).abs().max() <= 1e-4
    # rows given out of order and as a subset
    caches2 = pipe.new_caches(3, 16)
    pipe.forward(b[:, :3], caches=caches2, rows=[2])
    pipe.forward(a[:, :8], caches=caches2, rows=[0])
    out2 = pipe.forward(torch.tensor([[b[0, 3]], [a[0, 8]]]), torch.tensor([[3], [8]]), caches2, rows=[2, 0])
    assert (out2[0, 0] - ref_b[0, 3]).abs().max() <= 1e-4
    assert (out2[1, 0] - ref_a[0, 8]).abs().max() <= 1e-4
    assert caches2[0].lengths == [9, 0, 4]


def test_right_padding_and_left_padding_agree(pipe):
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(5))
    ref = pipe.forward(ids)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.int64), ids], 1)
    left_pos = torch.tensor([[-1, -1, -1, 0, 1, 2, 3, 4]])
    right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.int64)], 1)
    right_pos = torch.tensor([[0, 1, 2, 3, 4, -1, -1, -1]])
    out_l = pipe.forward(left, left_pos, pipe.new_caches(1, 8))
    out_r = pipe.forward(right, right_pos, pipe.new_caches(1, 8))
    assert (out_l[:, 3:] - ref).abs().max() <= 1e-4
    assert (out_r[:, :5] - ref).abs().max() <= 1e-4
    assert torch.isfinite(out_l).all() and torch.isfinite(out_r).all()


def test_position_gap_overlap_and_overflow_are_refused(pipe):
    caches = pipe.new_caches(1, 8)
    pipe.forward(torch.tensor([[1, 2, 3]]), caches=caches)
    with pytest.raises(PositionError, match="expected 3"):
        pipe.forward(torch.tensor([[4]]), torch.tensor([[5]]), caches)  # gap
    with pytest.raises(PositionError, match="expected 3"):
        pipe.forward(torch.tensor([[4]]), torch.tensor([[2]]), caches)  # overlap
    with pytest.raises(CacheFullError, match="max length of 8"):
        pipe.forward(torch.tensor([[4] * 6]), torch.tensor([list(range(3, 9))]), caches)
    assert caches[0].lengths == [3]  # refused forwards leave the cache as it was
    out = pipe.forward(torch.tensor([[4]]), torch.tensor([[3]]), caches)
    assert torch.isfinite(out).all()


def test_truncate_then_replay_gives_the_same_logits(pipe):
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(6))
    caches = pipe.new_caches(1, 12)
    first = pipe.forward(ids, caches=caches)
    for c in caches:
        c.truncate(0, 7)
    again = pipe.forward(ids[:, 7:], caches=caches)
    assert (again - first[:, 7:]).abs().max() <= 1e-4


def test_reported_memory_matches_allocation():
    cache = KVCache(num_layers=3, rows=2, num_kv_heads=2, head_dim=16, max_len=10, dtype=torch.bfloat16)
    expected = 2 * 3 * 2 * 2 * 10 * 16 * 2
    assert cache.nbytes == expected
    assert KVCache.bytes_needed(3, 2, 2, 16, 10, 2) == expected
    with pytest.raises(ValueError):
        KVCache(1, 0, 1, 2, 4)


def test_stage_reports_cache_bytes(pipe):
    stage = pipe.stages[1]
    cache = stage.new_cache(rows=3, max_len=20)
    assert stage.cache_bytes(3, 20) == cache.nbytes == 2 * 3 * 3 * 2 * 20 * 16 * 4
