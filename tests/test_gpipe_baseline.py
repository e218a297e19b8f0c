"""bench/gpipe_baseline.py: the torch.distributed.pipelining (GPipe, gloo, 2 processes) baseline scores a batch
exactly as the one-process LocalPipeline does, on a tiny checkpoint."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from layerline.pipeline import LocalPipeline
from tiny_models import TinySpec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import gpipe_baseline  # noqa: E402  (bench/gpipe_baseline.py)


@pytest.mark.timeout(60)
def test_gpipe_logprobs_match_local_pipeline(tiny_checkpoint):
    spec = TinySpec("llama", kv_heads=2)
    folder, _ = tiny_checkpoint(spec)
    ranges = [(0, 3), (3, 6)]
    sequences = [[(7 * i + 13 * j) % 300 for j in range(16)] for i in range(4)]
    res = gpipe_baseline.run_gpipe(folder, ranges, sequences, micro_batch=2, repeats=1, timeout=60)
    got = torch.tensor(res["logprobs"])
    assert got.shape == (4, 15) and len(res["seconds"]) == 1 and res["seconds"][0] > 0
    ids = torch.tensor(sequences)
    logits = LocalPipeline.load(folder, ranges).forward(ids)
    expected = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert (got - expected).abs().max().item() <= 1e-4
