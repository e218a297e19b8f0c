"""The GGUF header parser against the `gguf` package's own reader (the oracle), and its behaviour on damaged
files: every truncation or corruption is a CheckpointError, never another exception."""

from __future__ import annotations

import random

import gguf
import numpy as np
import pytest

from layerline.errors import CheckpointError
from layerline.gguf_file import GGUFFile
from layerline.model_source import resolve_model
from tiny_models import TinySpec, write_gguf


def _same_as_reader(path: str) -> int:
    ours = GGUFFile(path)
    reader = gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == expected
    assert set(ours.tensors) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        o = ours.tensors[t.name]
        assert (o.qtype, o.shape, o.n_bytes) == (int(t.tensor_type), tuple(reversed(t.shape.tolist())), int(t.n_bytes))
        assert np.array_equal(o.raw, np.ascontiguousarray(t.data).reshape(-1).view(np.uint8))
    return len(reader.tensors)


def test_real_file_matches_the_gguf_reader():
    assert _same_as_reader(resolve_model("smollm2")) == 272


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1"])
def test_written_files_match_the_gguf_reader(tiny_checkpoint, tmp_path, qtype):
    _, model = tiny_checkpoint(TinySpec("qwen2", layers=2))
    path = str(tmp_path / "m.gguf")
    write_gguf(model, path, qtype)
    assert _same_as_reader(path) == 2 * 12 + 3


def test_damaged_files_only_ever_raise_checkpoint_errors(tiny_checkpoint, tmp_path):
    _, model = tiny_checkpoint(TinySpec("llama", layers=1))
    good = tmp_path / "m.gguf"
    write_gguf(model, str(good))
    data = good.read_bytes()
    rng = random.Random(0)
    bad = tmp_path / "bad.gguf"
    cuts = sorted(rng.sample(range(len(data)), 150)) + [0, 3, 4, 8, 23, 24]
    for cut in cuts:
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            GGUFFile(bad)
    header_end = data.index(b"token_embd.weight") + 64  # metadata and tensor table live before the data
    for _ in range(150):
        blob = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(4, header_end)] = rng.randrange(256)
        bad.write_bytes(bytes(blob))
        try:
            GGUFFile(bad)  # a flip inside a string or a float may still leave a well-formed file
        except CheckpointError:
            pass
