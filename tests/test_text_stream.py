"""Streaming text with stop strings: deltas add up to the final text, nothing of a stop string is ever sent, and
generation ends at stop tokens, stop strings and the length limit."""

from __future__ import annotations

import pytest

from layerline.text_stream import TextStream
from layerline.tokenizer import Tokenizer
from tiny_models import save_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(str(folder))
    return Tokenizer.from_path(str(folder))


def run(tok: Tokenizer, text: str, stop=(), stop_ids=(), limit: int | None = None):
    ids = tok.encode(text, add_special_tokens=False)
    stream = TextStream(tok.stream_decoder(skip_special_tokens=True), stop, stop_ids)
    deltas = []
    for i, t in enumerate(ids):
        deltas.append(stream.push(t, at_limit=limit is not None and i + 1 >= limit))
        if stream.finish_reason:
            break
    return deltas, stream


def test_no_stops_streams_everything(tok):
    text = "the capital of france is paris, hello world"
    deltas, stream = run(tok, text, limit=len(tok.encode(text, add_special_tokens=False)))
    assert "".join(deltas) == stream.text == text and stream.finish_reason == "length"


@pytest.mark.parametrize("stop", ["paris", "is p", "s, h", "world", "x"])
def test_stop_strings_are_cut_and_never_leak(tok, stop):
    text = "the capital of france is paris, hello world"
    deltas, stream = run(tok, text, stop=[stop, "zzz"])
    if stop in text:
        assert stream.text == text[: text.index(stop)] and stream.finish_reason == "stop"
    else:
        assert stream.finish_reason is None
    sent = "".join(deltas)
    assert sent == stream.text if stream.finish_reason else text.startswith(sent)
    assert stop not in sent


def test_stop_token_ends_without_its_text(tok):
    ids = tok.encode("hello world", add_special_tokens=False)
    stream = TextStream(tok.stream_decoder(), (), {ids[2]})
    out = [stream.push(t) for t in ids[:3]]
    assert stream.finish_reason == "stop" and "".join(out) == tok.decode(ids[:2])
