"""What a stage holds for each tensor of a model in a given weight format, and how many bytes that takes.

`stored_types` reads, from a checkpoint's tensor table, the type each tensor is stored in (GGML type names for a
GGUF file: "Q4_K", "Q6_K", "F32"...). `held_types` turns that into the type a stage holds each tensor in for a weight
format (`layerline.quant`): the stored type ("stored"; a float checkpoint's tensors are held in float32), Q8_0 /
Q4_1 for matmul weights under "int8" / "int4", the dtype for a float format. `tensor_bytes` and `model_bytes` count the bytes.

These are the figures placement, capacity measurement, `layerline info` and the stage itself agree on.
"""

from __future__ import annotations

import math

from layerline.config import ModelConfig
from layerline.gguf_dequant import _BLOCK, qtype_name
from layerline.model import expected_tensors
from layerline.quant import WeightFormat
from layerline.quant.tensor import TYPE_BY_NAME, quantizable, quantized_type

FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "F32": 4, "F16": 2, "BF16": 2}


def held_types(
    shapes: dict[str, tuple[int, ...]], fmt: WeightFormat, stored: dict[str, str] | None = None
) -> dict[str, str]:
    """name -> the type a stage in format `fmt` holds it in. `stored`: the checkpoint's own types (GGML names)
    where it is quantized (a GGUF file); None for a float checkpoint."""
    out = {}
    for name, shape in shapes.items():
        if fmt.kind == "float":
            out[name] = str(fmt.dtype).removeprefix("torch.")
        elif not quantizable(name, shape):
            out[name] = "F32"
        elif fmt.quantizes:
            out[name] = qtype_name(quantized_type(fmt.kind, name))
        elif stored is not None and name in stored:
            out[name] = stored[name]
        else:
            out[name] = "F32"
    return out


def tensor_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    if type_name in FLOAT_BYTES:
        return n * FLOAT_BYTES[type_name]
    values, nbytes = _BLOCK[TYPE_BY_NAME[type_name]]
    return n // values * nbytes


def model_bytes(
    config: ModelConfig, fmt: WeightFormat, stored: dict[str, str] | None = None
) -> tuple[tuple[int, ...], int, int]:
    """(bytes of each layer, of the token embedding, of the final norm and LM head (the embedding again when
    tied)) of a model held in `fmt` (`stored`: the checkpoint's own types)."""
    everything = expected_tensors(config, 0, config.num_layers)
    types = held_types(everything, fmt, stored)
    layers = []
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        layers.append(sum(tensor_bytes(types[n], s) for n, s in everything.items() if n.startswith(prefix)))
    table = "model.embed_tokens.weight"
    embed = tensor_bytes(types[table], everything[table])
    head = tensor_bytes(types["model.norm.weight"], everything["model.norm.weight"])
    head += tensor_bytes(types[table], everything[table]) if config.tie_word_embeddings else 0
    if "lm_head.weight" in everything:
        head += tensor_bytes(types["lm_head.weight"], everything["lm_head.weight"])
    return tuple(layers), embed, head


def layer_types(config: ModelConfig, fmt: WeightFormat, stored: dict[str, str] | None = None) -> dict[str, str]:
    """The held type of each tensor of the model's largest layer, by its name within a layer ("mlp.up_proj.weight"),
    plus "embed" and "head": what a capacity measurement times."""
    sizes = model_bytes(config, fmt, stored)[0]
    i = max(range(len(sizes)), key=lambda j: sizes[j]) if sizes else 0
    everything = expected_tensors(config, 0, config.num_layers)
    types = held_types(everything, fmt, stored)
    prefix = f"model.layers.{i}."
    out = {n.removeprefix(prefix): t for n, t in types.items() if n.startswith(prefix)}
    out["embed"] = types["model.embed_tokens.weight"]
    out["head"] = types["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    return out
