"""Opening a checkpoint and building the stage model for a layer range from it, reading only that range's tensors.

Two formats: a Hugging Face folder (config.json + model.safetensors, or sharded *.safetensors with
model.safetensors.index.json) and a GGUF file (`gguf_model.py`); and a stage host's cache of weights fetched from a
coordinator (`weight_cache.py`). Pickled checkpoints (pytorch_model.bin) are
refused: nothing untrusted is unpickled. Errors name the file and what is wrong with it.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os

import torch

from layerline import progress
from layerline.config import ModelConfig
from layerline.devices import resolve_device, weights_for
from layerline.errors import CheckpointError
from layerline.gguf_model import GGUFCheckpoint
from layerline.model import StageModel, check_range, expected_tensors
from layerline.quant import WeightFormat, resolve
from layerline.quant.build import available as kernels_available
from layerline.quant.tensor import QTensor, quantizable, quantized_type
from layerline.quant.tensor import quantize as quantize_weight
from layerline.safetensors_io import SafetensorsFile, TensorEntry
from layerline.weight_cache import FetchedCheckpoint, is_fetched_folder

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


class HFCheckpoint:
    """A Hugging Face checkpoint folder; shard headers are read only when one of their tensors is wanted."""

    def __init__(self, folder: str) -> None:
        self.path = folder
        self.config = ModelConfig.from_json_file(os.path.join(folder, "config.json"))
        self.bytes_read = 0
        self._files: dict[str, SafetensorsFile] = {}
        index = os.path.join(folder, INDEX_FILE)
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                self._where = {str(k): str(v) for k, v in weight_map.items()}
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
            for shard in set(self._where.values()):
                if os.path.basename(shard) != shard:
                    raise CheckpointError(f"{index}: shard name {shard!r} must be a file in the same folder")
        else:
            shards = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(folder, "*.safetensors")))
            if not shards:
                hint = ""
                if glob.glob(os.path.join(folder, "*.bin")) or glob.glob(os.path.join(folder, "*.pt")):
                    hint = " (pickled .bin/.pt checkpoints are not loaded, for safety: convert them to safetensors)"
                raise CheckpointError(f"{folder}: no *.safetensors weights found{hint}")
            self._where = {}
            for s in shards:
                sf = self._file(os.path.basename(s))
                for name in sf.entries:
                    self._where[name] = os.path.basename(s)

    def _file(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(os.path.join(self.path, shard))
        return self._files[shard]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def source_name(self, name: str) -> str:
        return name

    def stored_bytes(self, names: list[str]) -> int:
        return sum(self._entry(n).end - self._entry(n).begin for n in names)

    def _entry(self, name: str) -> TensorEntry:
        sf = self._file(self._where[name])
        if name not in sf.entries:
            raise CheckpointError(f"{sf.path}: the index places tensor {name!r} in this file, but it is not there")
        return sf.entries[name]

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            self._entry(n)
            by_file.setdefault(self._where[n], []).append(n)
        out = {}
        for shard, shard_names in by_file.items():
            sf = self._file(shard)
            before = sf.bytes_read
            for name, t in sf.read(shard_names).items():
                if not t.is_floating_point():
                    raise CheckpointError(f"{sf.path}: tensor {name!r} has dtype {t.dtype}, expected floating point")
                out[name] = t.to(dtype)
            self.bytes_read += sf.bytes_read - before
        return out

    def stored_types(self) -> None:
        return None  # float tensors: a stage holds them in its float dtype

    def close(self) -> None:
        self._files.clear()


Checkpoint = HFCheckpoint | GGUFCheckpoint | FetchedCheckpoint


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A HF checkpoint folder or a GGUF file; anything else is a CheckpointError saying what was found."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if is_fetched_folder(path):
            return FetchedCheckpoint(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path}: a checkpoint folder needs a config.json")
        return HFCheckpoint(path)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return GGUFCheckpoint(path)
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic) and not a checkpoint folder")
    raise CheckpointError(f"model not found: {path}")


def load_config(path: str | os.PathLike) -> ModelConfig:
    ckpt = open_checkpoint(path)
    try:
        return ckpt.config
    finally:
        ckpt.close()


def load_stage(
    path: str | os.PathLike,
    start: int,
    end: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    checkpoint: Checkpoint | None = None,
    quantize: str = "",
    *,
    weights: WeightFormat | None = None,
) -> StageModel:
    """The stage model for layers [start, end) of the checkpoint at `path`, reading only the tensors it needs.

    The weights' form follows `quant.resolve(dtype, quantize)`: with no dtype, a GGUF file's quantized blocks are
    kept as they are (computed in float32); a dtype asks for every weight dequantized to it (the exact mode);
    `quantize` ("int8" / "int4") quantizes float weights at load. `weights` (a resolved format) overrides both."""
    device = resolve_device(device)
    fmt = weights_for(weights or resolve(dtype, quantize), device)
    ckpt = checkpoint if checkpoint is not None else open_checkpoint(path)
    try:
        config = ckpt.config
        try:
            check_range(config, start, end)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        names = list(expected_tensors(config, start, end))
        missing = [n for n in names if n not in ckpt]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(
                f"{ckpt.path}: missing tensor(s) {', '.join(ckpt.source_name(m) for m in missing[:3])}{more} "
                f"(needed by layers {start}:{end})"
            )
        shapes = expected_tensors(config, start, end)
        float_bytes = 4 * sum(math.prod(shape) for shape in shapes.values())
        stored_bytes = ckpt.stored_bytes(names)
        if fmt.quantizes or (fmt.kind == "stored" and not isinstance(ckpt, HFCheckpoint)):
            if kernels_missing(stored_bytes, float_bytes):
                fmt = resolve(torch.float32)
        held_bytes = float_bytes * fmt.dtype.itemsize // 4
        if device.type != "cpu" and not isinstance(ckpt, HFCheckpoint) and stored_bytes < held_bytes:
            logger.warning(
                "layers %d:%d on %s: the quantized kernels run on the CPU, so the file's blocks are dequantized to %s "
                "(%.1f MiB instead of %.1f MiB)",
                start,
                end,
                device,
                str(fmt.dtype).removeprefix("torch."),
                held_bytes / 2**20,
                stored_bytes / 2**20,
            )
        groups: dict[str, list[str]] = {}
        for n in names:  # a layer's tensors together: the bar moves a layer at a time
            groups.setdefault(".".join(n.split(".")[:3]) if n.startswith("model.layers.") else n, []).append(n)
        tensors: dict[str, torch.Tensor | QTensor] = {}
        what = "converting" if isinstance(ckpt, GGUFCheckpoint) and fmt.kind != "stored" else "loading"
        with progress.bar(len(groups), f"{what} layers {start}:{end}", "part") as shown:
            for group in groups.values():
                tensors.update(read_tensors(ckpt, group, fmt))
                shown.update(1)
        return StageModel(config, start, end, tensors, fmt.dtype, device)
    finally:
        if checkpoint is None:
            ckpt.close()


def read_tensors(ckpt: Checkpoint, names: list[str], fmt: WeightFormat) -> dict[str, torch.Tensor | QTensor]:
    """HF-named tensors in the form `fmt` asks for (see `layerline.quant`): float tensors of its dtype, or, for
    the quantized forms, matmul weights as `QTensor`s (a GGUF file's own blocks for "stored"; Q8_0 / Q4_1 made
    from float weights for "int8" / "int4"; a fetched folder's as it holds them). Norms and biases stay float."""
    if fmt.kind == "float" or isinstance(ckpt, HFCheckpoint):
        part = ckpt.read(names, fmt.dtype)
    elif isinstance(ckpt, FetchedCheckpoint):
        part = ckpt.read(names, fmt.dtype, quantized=True)  # its folder holds this very format
    else:
        part = ckpt.read(names, fmt.dtype, quantized=fmt.kind == "stored")
    if fmt.quantizes:  # one float tensor at a time, replaced by its blocks at once
        part = {n: quantize_weight(t, quantized_type(fmt.kind, n)) if _is_matrix(n, t) else t for n, t in part.items()}
    return part


def _is_matrix(name: str, t: torch.Tensor | QTensor) -> bool:
    return isinstance(t, torch.Tensor) and quantizable(name, tuple(t.shape))


def kernels_missing(stored_bytes: int, float_bytes: int) -> bool:
    """True (with a warning naming the memory it costs) when the quantized kernels cannot run here, so the stage
    must hold float32 weights instead."""
    why = kernels_available()
    if not why:
        return False
    logger.warning(
        "%s; loading float32 weights instead of quantized ones: %.0f MiB for these layers instead of %.0f MiB",
        why,
        float_bytes / (1 << 20),
        stored_bytes / (1 << 20),
    )
    return True
