"""bench/decode_overhead.py's bare process rings (the floors layerline's decode is compared with): joined by OS pipes
or by raw gRPC streams, they decode transformers' greedy tokens, and their processes end when the ring is closed."""

from __future__ import annotations

import os
import sys

import pytest

from tiny_models import TinySpec, hf_greedy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import decode_overhead  # noqa: E402  (bench/decode_overhead.py)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ring_class", [decode_overhead.BareRing, decode_overhead.GrpcRing])
@pytest.mark.parametrize("ranges", [[(0, 4)], [(0, 1), (1, 4)], [(0, 1), (1, 3), (3, 4)]])
def test_ring_decodes_transformers_greedy_tokens(tiny_checkpoint, ring_class, ranges):
    folder, ref = tiny_checkpoint(TinySpec("llama", layers=4, kv_heads=2))
    prompt = [5, 17, 29, 3, 11, 8]
    ring = ring_class(folder, ranges, 1)
    try:
        assert ring.generate(prompt, 12) == hf_greedy(ref, prompt, 12)
        assert ring.generate(prompt[:3], 5) == hf_greedy(ref, prompt[:3], 5)  # a fresh sequence: the caches restart
    finally:
        ring.close()
    assert [p.returncode for p in ring.procs] == [0] * len(ranges)  # every stage process has ended, by itself
