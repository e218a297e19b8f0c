"""Checkpoint loading: a stage reads only its own tensors (bytes counted by the kernel), every stage dtype works,
and broken checkpoints give one clear error naming the file and the problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerline.checkpoint import load_stage, open_checkpoint
from layerline.errors import CheckpointError, UnsupportedModelError
from layerline.model import expected_tensors
from layerline.pipeline import LocalPipeline
from tiny_models import TinySpec, write_gguf

BIG = TinySpec("llama", layers=8, hidden=256, heads=4, kv_heads=2, intermediate=512, shard_bytes=3_000_000)
SMALL = TinySpec("llama", layers=2)


def _io_rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("RssFile:")).split()[1])


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def test_middle_stage_reads_only_its_share_of_a_sharded_checkpoint(tiny_checkpoint):
    folder, _ = tiny_checkpoint(BIG)
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) >= 3
    total = _folder_bytes(folder)
    ckpt = open_checkpoint(folder)
    share = ckpt.stored_bytes(list(expected_tensors(ckpt.config, 3, 5)))
    before = _io_rchar()  # bytes this process read through read(2), counted by the kernel
    stage = load_stage(folder, 3, 5, checkpoint=ckpt)
    read = _io_rchar() - before
    assert ckpt.bytes_read == share
    assert share <= read <= share * 1.02 + 256 * 1024, (read, share, total)  # + shard headers
    assert read < 0.3 * total
    assert stage.weight_bytes() == share


def test_middle_stage_of_a_gguf_touches_only_its_tensors(tiny_checkpoint, tmp_path):
    _, model = tiny_checkpoint(BIG)
    path = str(tmp_path / "big.gguf")
    write_gguf(model, path)
    load_stage(path, 0, 1)  # warm up: code pages touched once do not count below
    ckpt = open_checkpoint(path)
    share = ckpt.stored_bytes(list(expected_tensors(ckpt.config, 3, 5)))
    before = _rss_file_kb()  # file-backed pages mapped into this process
    load_stage(path, 3, 5, checkpoint=ckpt)
    touched = (_rss_file_kb() - before) * 1024
    assert ckpt.bytes_read == share
    assert touched <= share * 1.1 + 512 * 1024, (touched, share, os.path.getsize(path))
    assert touched < 0.4 * os.path.getsize(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stages_track_float32(tiny_checkpoint, dtype):
    folder, _ = tiny_checkpoint(SMALL)
    ref = LocalPipeline.load(folder, [(0, 1), (1, 2)])
    half = LocalPipeline.load(folder, [(0, 1), (1, 2)], dtype)
    assert all(p.dtype == dtype for s in half.stages for p in s.parameters())
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = ref.forward(ids), half.forward(ids)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().max() / a.abs().max() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    caches = half.new_caches(2, 16)
    assert caches[0].k.dtype == dtype
    inc = torch.cat([half.forward(ids[:, :8], caches=caches), half.forward(ids[:, 8:], caches=caches)], 1)
    assert (inc - b).abs().max() / b.abs().max() < 0.02


def test_mixed_dtypes_across_stages(tiny_checkpoint):
    """Each stage computes in its own dtype; hidden states are cast on entry."""
    folder, _ = tiny_checkpoint(SMALL)
    ref = LocalPipeline.load(folder, [(0, 2)])
    mixed = LocalPipeline([load_stage(folder, 0, 1, torch.bfloat16), load_stage(folder, 1, 2, torch.float32)])
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    a, b = ref.forward(ids), mixed.forward(ids)
    assert (a - b).abs().max() / a.abs().max() < 0.05


# ---- broken checkpoints -------------------------------------------------------------------------------------


@pytest.fixture
def small_copy(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint(SMALL)
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named_and_stages_without_it_still_load(small_copy):
    _rewrite(small_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_stage(small_copy, 0, 2)
    assert load_stage(small_copy, 0, 1).num_layers == 1  # layer 0 is intact


def test_wrong_shape_is_named(small_copy):
    def change(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, 64)

    _rewrite(small_copy, change)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape \(7, 64\), expected \(32, 64\)"):
        load_stage(small_copy, 0, 1)


def test_unsupported_architecture_is_named(small_copy):
    cfg = json.loads((small_copy / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (small_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'gpt_neox' is not supported"):
        load_stage(small_copy, 0, 1)


def test_truncated_and_garbage_safetensors(small_copy):
    path = small_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_stage(small_copy, 0, 1)
    garbage = b"{not json!!"
    path.write_bytes(len(garbage).to_bytes(8, "little") + garbage)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_stage(small_copy, 0, 1)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        load_stage(small_copy, 0, 1)


def test_corrupt_and_truncated_gguf(tiny_checkpoint, tmp_path):
    _, model = tiny_checkpoint(SMALL)
    good = tmp_path / "good.gguf"
    write_gguf(model, str(good))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_stage(bad, 0, 1)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_stage(cut, 0, 2)
    other = tmp_path / "notgguf.bin"
    other.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_stage(other, 0, 1)


def test_pickled_checkpoints_are_refused(tmp_path, small_copy):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(small_copy / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled"):
        load_stage(folder, 0, 1)


def test_index_naming_a_missing_shard(small_copy):
    names = load_file(small_copy / "model.safetensors").keys()
    weight_map = {n: "model-00009-of-00009.safetensors" for n in names}
    (small_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00009-of-00009.safetensors"):
        load_stage(small_copy, 0, 1)


def test_layer_range_outside_the_model(small_copy):
    with pytest.raises(CheckpointError, match="not within the model's 2 layers"):
        load_stage(small_copy, 1, 3)


@pytest.mark.parametrize("what", ["missing", "garbage"])
def test_cli_reports_bad_checkpoints_without_a_traceback(tmp_path, what):
    model = tmp_path / "nothing-here"
    if what == "garbage":
        model = tmp_path / "garbage.gguf"
        model.write_bytes(b"GGUF" + b"\xff" * 64)
    out = subprocess.run(
        [sys.executable, "-m", "layerline.cli", "run", "--model", str(model), "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("layerline: error:") and str(model) in out.stderr
    assert "Traceback" not in out.stderr
