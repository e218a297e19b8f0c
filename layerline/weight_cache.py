"""Weights fetched from a coordinator, kept on disk: the checkpoint of a stage host that does not hold the model.

Layout, one folder per (model fingerprint, weight format) under the cache root (`~/.cache/layerline/weights` by
default); the format is a float dtype, or "stored" / "int8" / "int4" for quantized weights (`layerline.quant`):

    <root>/<fingerprint>/<format>/model.json       name, fingerprint, config (layerline's ModelConfig as JSON)
                                 tokenizer.json    layerline's Tokenizer as JSON (when the model has one)
                                 layer-00012.safetensors, embed.safetensors, head.safetensors

Each .safetensors file holds one group (a layer's tensors, the token embedding, or the final norm and LM head) and
records the SHA-256 of every tensor's bytes in its metadata, as the coordinator sent it. A quantized weight is kept
as its blocks (a flat uint8 tensor) with its GGML type and logical shape in the metadata, so a stage holds on disk
and in memory what the file's share takes. A group file is written
whole (to a temporary name, then renamed), so a fetch cut off half way leaves only whole groups behind; `verified`
hashes what is there before it is trusted and deletes what does not match, so it is fetched again.

`FetchedCheckpoint` reads such a folder with the interface of the other checkpoints (`checkpoint.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets

import torch

from layerline.config import ModelConfig, config_from_json
from layerline.errors import CheckpointError
from layerline.quant import WeightFormat
from layerline.quant.tensor import TYPE_BY_NAME, QTensor
from layerline.safetensors_io import SafetensorsFile, raw_bytes, write_safetensors

logger = logging.getLogger(__name__)

MODEL_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"
HASH_PREFIX = "sha256:"
QTYPE_PREFIX = "ggml_type:"  # metadata of a quantized weight: its GGML type name ...
SHAPE_PREFIX = "shape:"  # ... and its logical shape, "rows,cols"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def default_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "layerline", "weights")


def model_folder(root: str, fingerprint: str, weights: WeightFormat) -> str:
    if not re.fullmatch(r"[0-9a-f]{8,64}", fingerprint):
        raise CheckpointError(f"not a model fingerprint: {fingerprint!r}")
    return os.path.join(root, fingerprint, weights.name)


def group_of(name: str) -> str:
    """The file (without extension) a tensor is kept in."""
    m = _LAYER.match(name)
    if m:
        return f"layer-{int(m.group(1)):05d}"
    return "embed" if name == "model.embed_tokens.weight" else "head"


def sha256_of(t: torch.Tensor | QTensor) -> str:
    return hashlib.sha256(raw_bytes(t.data if isinstance(t, QTensor) else t)).hexdigest()


def write_model(
    folder: str, name: str, fingerprint: str, config_json: str, tokenizer_json: str, stored_types_json: str = ""
) -> None:
    """The model's description, written next to its weights (replacing an older one)."""
    os.makedirs(folder, exist_ok=True)
    description = {"name": name, "fingerprint": fingerprint, "config": json.loads(config_json)}
    if stored_types_json:
        description["stored_types"] = json.loads(stored_types_json)
    _write_atomic(os.path.join(folder, MODEL_FILE), json.dumps(description))
    if tokenizer_json:
        _write_atomic(os.path.join(folder, TOKENIZER_FILE), tokenizer_json)


def write_group(folder: str, group: str, tensors: dict[str, torch.Tensor | QTensor], hashes: dict[str, str]) -> None:
    """One group's tensors, with their hashes, as one file (written whole or not at all)."""
    metadata = {HASH_PREFIX + n: hashes[n] for n in tensors}
    plain: dict[str, torch.Tensor] = {}
    for n, t in tensors.items():
        if isinstance(t, QTensor):
            metadata[QTYPE_PREFIX + n] = t.type_name
            metadata[SHAPE_PREFIX + n] = f"{t.shape[0]},{t.shape[1]}"
            plain[n] = t.data
        else:
            plain[n] = t
    path = os.path.join(folder, f"{group}.safetensors")
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # unique across hosts sharing the folder too
    write_safetensors(tmp, plain, metadata)
    os.replace(tmp, path)


def _stored(sf: SafetensorsFile, name: str, t: torch.Tensor) -> torch.Tensor | QTensor:
    """A tensor read from a group file: as a QTensor where the metadata says it is quantized."""
    qtype = sf.metadata.get(QTYPE_PREFIX + name)
    if qtype is None:
        return t
    try:
        shape = tuple(int(d) for d in sf.metadata.get(SHAPE_PREFIX + name, "").split(","))
    except ValueError:
        raise CheckpointError(f"{sf.path}: tensor {name!r} has no readable shape") from None
    if qtype not in TYPE_BY_NAME:
        raise CheckpointError(f"{sf.path}: tensor {name!r} has type {qtype!r}, not one the kernels compute from")
    return QTensor.from_raw(TYPE_BY_NAME[qtype], shape, t.reshape(-1), name=f"{sf.path}: {name}")


def verified(folder: str, names: list[str]) -> set[str]:
    """The tensors among `names` the folder holds with bytes matching their recorded hashes. A group file that is
    unreadable or does not match is deleted (it will be fetched again)."""
    good: set[str] = set()
    by_group: dict[str, list[str]] = {}
    for n in names:
        by_group.setdefault(group_of(n), []).append(n)
    for group, wanted in by_group.items():
        path = os.path.join(folder, f"{group}.safetensors")
        if not os.path.exists(path):
            continue
        try:
            sf = SafetensorsFile(path)
            present = [n for n in wanted if n in sf.entries]
            for name, t in sf.read(present).items():
                _stored(sf, name, t)  # a quantized tensor must also be a whole one of its type
                if sf.metadata.get(HASH_PREFIX + name) != sha256_of(t):
                    raise CheckpointError(f"{path}: tensor {name!r} does not match its recorded SHA-256")
            good.update(present)
        except CheckpointError as e:
            _remove(path, e)
            good.difference_update(wanted)
    return good


def _remove(path: str, why: CheckpointError) -> None:
    logger.warning("dropping cached weights %s: %s", path, why)
    try:
        os.remove(path)
    except OSError:
        pass


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # unique across hosts sharing the folder too
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def is_fetched_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MODEL_FILE))


class FetchedCheckpoint:
    """A weight-cache folder read as a checkpoint: the config from model.json, tensors from the group files."""

    def __init__(self, folder: str) -> None:
        self.path = folder
        model_file = os.path.join(folder, MODEL_FILE)
        try:
            with open(model_file, encoding="utf-8") as f:
                d = json.load(f)
            self.name = str(d["name"])
            self.fingerprint = str(d["fingerprint"])
            self.config: ModelConfig = config_from_json(json.dumps(d["config"]))
            types = d.get("stored_types")
            self._stored_types = {str(k): str(v) for k, v in types.items()} if isinstance(types, dict) else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{model_file}: not a readable model description ({type(e).__name__}: {e})") from None
        self.bytes_read = 0
        self._files: dict[str, SafetensorsFile] = {}

    def stored_types(self) -> dict[str, str] | None:
        """The coordinator's checkpoint's own tensor types (None: a float checkpoint)."""
        return self._stored_types

    def tokenizer_json(self) -> str | None:
        path = os.path.join(self.path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()

    def _file(self, name: str) -> SafetensorsFile | None:
        group = group_of(name)
        if group not in self._files:
            path = os.path.join(self.path, f"{group}.safetensors")
            if not os.path.exists(path):
                return None
            self._files[group] = SafetensorsFile(path)
        return self._files[group]

    def __contains__(self, name: str) -> bool:
        sf = self._file(name)
        return sf is not None and name in sf.entries

    def source_name(self, name: str) -> str:
        return name

    def stored_bytes(self, names: list[str]) -> int:
        total = 0
        for n in names:
            sf = self._file(n)
            if sf is None or n not in sf.entries:
                raise CheckpointError(f"{self.path}: tensor {n!r} has not been fetched")
            total += sf.entries[n].end - sf.entries[n].begin
        return total

    def read(self, names: list[str], dtype: torch.dtype, quantized: bool = False) -> dict[str, torch.Tensor | QTensor]:
        """Tensors as float tensors of `dtype`; with `quantized`, the quantized weights as their `QTensor`s."""
        out: dict[str, torch.Tensor | QTensor] = {}
        for n in names:
            if n not in self:
                raise CheckpointError(f"{self.path}: tensor {n!r} has not been fetched")
        for n in names:
            sf = self._file(n)
            before = sf.bytes_read
            t = _stored(sf, n, sf.read([n])[n])
            if isinstance(t, QTensor):
                out[n] = t if quantized else t.dequantize(dtype)
            else:
                out[n] = t.to(dtype)
            self.bytes_read += sf.bytes_read - before
        return out

    def close(self) -> None:
        self._files.clear()
