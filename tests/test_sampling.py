"""Sampling against transformers' own logits processors (the oracle for what each setting means), plus seeds."""

from __future__ import annotations

import pytest
import torch

from layerline.sampling import SamplingParams, apply_repetition_penalty, draw_generator, filter_logits, sample


@pytest.fixture
def logits():
    return torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_is_argmax(logits):
    assert sample(logits, SamplingParams()).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_matches_transformers(logits, k):
    from transformers.generation.logits_process import TopKLogitsWarper

    ours = filter_logits(logits, k, 1.0)
    theirs = TopKLogitsWarper(k)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(logits, p):
    from transformers.generation.logits_process import TopPLogitsWarper

    ours = filter_logits(logits, 0, p)
    theirs = TopPLogitsWarper(p)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert (~torch.isinf(ours)).sum(-1).min() >= 1


def test_repetition_penalty_matches_transformers(logits):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    history = [[1, 2, 2, 7], [], [49, 0]]
    ours = apply_repetition_penalty(logits, history, 1.3)
    for b, seen in enumerate(history):
        if not seen:
            assert torch.equal(ours[b], logits[b])
            continue
        theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), logits[b : b + 1].clone())
        assert torch.allclose(ours[b], theirs[0])


def test_same_seed_same_tokens_different_seed_different_tokens(logits):
    flat = torch.zeros(1, 1000)  # uniform: draws depend only on the generator
    params = SamplingParams(temperature=1.0, seed=1234)
    a = [sample(flat, params, draw_generator(params.base_seed(), i)).item() for i in range(20)]
    b = [sample(flat, params, draw_generator(params.base_seed(), i)).item() for i in range(20)]
    other = SamplingParams(temperature=1.0, seed=99)
    c = [sample(flat, other, draw_generator(other.base_seed(), i)).item() for i in range(20)]
    assert a == b and a != c
    assert len(set(a)) > 10  # the draws of one generation differ from each other
    # a draw depends on (seed, index) alone: resuming at draw 7 gives what the 8th draw gave
    assert [sample(flat, params, draw_generator(1234, i)).item() for i in range(7, 20)] == a[7:]
    unseeded = SamplingParams(temperature=1.0)
    assert unseeded.base_seed() != unseeded.base_seed()


def test_low_temperature_concentrates_and_top_k_restricts(logits):
    params = SamplingParams(temperature=0.01, seed=0)
    g = draw_generator(0, 0)
    assert all(sample(logits, params, g).tolist() == logits.argmax(-1).tolist() for _ in range(5))
    params = SamplingParams(temperature=5.0, top_k=3, seed=0)
    g = draw_generator(0, 0)
    top3 = logits.topk(3, -1).indices
    for _ in range(50):
        picks = sample(logits, params, g)
        assert all(picks[b] in top3[b] for b in range(3))


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0}, {"top_p": 1.5}, {"repetition_penalty": 0}]
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
