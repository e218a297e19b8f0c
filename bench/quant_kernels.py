"""Which kernel computes a matmul on quantized weights fastest here: torch's own weight-only kernels against
layerline's (layerline/quant/kernels.c), on the matrix shapes of the models the project runs, measured side by side
in one run (medians of interleaved repeats, 1 thread).

Candidates, y = x @ W^T for x of `rows` rows:
- torch float32 `mm` on the float weights (what the exact mode holds: 4 bytes a weight) and bfloat16 `mm`;
- `torch._weight_int8pack_mm` (int8 weights, one scale per output row), with bfloat16 and float32 activations;
- `torch.ops.aten._weight_int4pack_mm_for_cpu` (int4 in groups of 32 with a scale and a zero, bfloat16);
- layerline's kernels on GGUF Q4_1 / Q8_0 / Q5_0 blocks, in the file's row layout and interleaved by 8 rows;
- for many rows: layerline's tiles (blocks decoded to float32 a tile at a time, then torch's float32 GEMM).

The second table is the crossover that sets `TILE_MIN_ROWS` in layerline/quant/linear.py: from how many rows on
the tiles beat the kernels.

    .venv/bin/python bench/quant_kernels.py [--repeats 5] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import statistics
import time

import benchlib  # bench/benchlib.py, next to this script
import torch

import layerline.quant.linear as qlinear
import layerline.quant.tensor as qt
from layerline.quant.build import simd
from layerline.quant.linear import QuantLinear
from layerline.quant.tensor import Q4_1, Q5_0, Q8_0, QTensor, quantize, random_qtensor

SECTION = "Quantized matmul kernels"
SHAPES = [
    ("SmolLM2 q/k/v", 960, 576),
    ("SmolLM2 gate/up", 3072, 576),
    ("SmolLM2 down", 576, 1536),
    ("SmolLM2 LM head", 49152, 576),
    ("Qwen2.5-0.5B gate/up", 9728, 896),
    ("1.5B-class down", 1536, 8960),
]


def timed(fn, min_time: float = 0.2) -> float:
    fn()
    runs, began = 0, time.perf_counter()
    while runs < 5 or time.perf_counter() - began < min_time:
        fn()
        runs += 1
    return (time.perf_counter() - began) / runs


def candidates(n: int, k: int, rows: int) -> dict:
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) / k**0.5
    x = torch.randn(rows, k, generator=g)
    xb = x.to(torch.bfloat16)
    w_t, wb_t = w.t().contiguous(), w.t().contiguous().to(torch.bfloat16)
    scale = w.abs().amax(1) / 127
    w8 = torch.round(w / scale[:, None]).to(torch.int8)
    q4 = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    sz = torch.rand(k // 32, n, 2, generator=g).to(torch.bfloat16)
    out = {
        "torch float32 mm": lambda: torch.mm(x, w_t),
        "torch bfloat16 mm": lambda: torch.mm(xb, wb_t),
        "torch int8pack, bf16 act.": lambda: torch._weight_int8pack_mm(xb, w8, scale.to(torch.bfloat16)),
        "torch int8pack, fp32 act.": lambda: torch._weight_int8pack_mm(x, w8, scale),
        "torch int4pack (g32), bf16": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed4, 32, sz),
    }
    for name, qtensor in (
        ("Q4_1", quantize(w, Q4_1)),
        ("Q8_0", quantize(w, Q8_0)),
        ("Q5_0", random_qtensor(Q5_0, (n, k), g)),
    ):
        saved = qlinear.TILE_MIN_ROWS
        qlinear.TILE_MIN_ROWS = 1 << 30
        try:
            for label, interleave in (("rows", False), ("x8", True)):
                qt.INTERLEAVE = interleave  # (interleaving works in place: each variant gets a copy of its own)
                lin = QuantLinear([QTensor(qtensor.qtype, qtensor.shape, qtensor.data.clone())])
                out[f"layerline {name}, {label}"] = lambda lin=lin: lin(x)
            qt.INTERLEAVE = True
        finally:
            qlinear.TILE_MIN_ROWS = saved
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = [
        f"One thread, medians of {args.repeats} interleaved repeats; layerline's kernels built for this CPU with "
        f"{simd()}. Times in microseconds (lower is better).",
        f"Machine: {benchlib.machine()}.",
        "",
    ]
    for rows in (1, 4):
        table: dict[str, dict[str, float]] = {}
        fns = {label: candidates(n, k, rows) for label, n, k in SHAPES}
        for _ in range(args.repeats):
            for label, cands in fns.items():
                for name, fn in cands.items():
                    table.setdefault(name, {}).setdefault(label, []).append(timed(fn))  # type: ignore[arg-type]
        names = list(next(iter(fns.values())))
        lines += [
            f"{rows} row(s) of activations:",
            "",
            "| kernel | " + " | ".join(f"{label} ({n}x{k})" for label, n, k in SHAPES) + " |",
            "|---|" + "---:|" * len(SHAPES),
        ]
        for name in names:
            cells = [f"{1e6 * statistics.median(table[name][label]):.0f}" for label, _, _ in SHAPES]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    # the crossover: kernels vs tiles by row count, SmolLM2's gate/up in Q4_1
    g = torch.Generator().manual_seed(1)
    w = quantize(torch.randn(3072, 576, generator=g) / 24, Q4_1)
    lin = QuantLinear([w])
    lines += [
        "Kernels against decoded tiles + torch's float32 GEMM by row count (SmolLM2 gate/up, Q4_1 interleaved), "
        "microseconds:",
        "",
        "| rows | kernels | tiles | tiles / kernels |",
        "|---:|---:|---:|---:|",
    ]
    saved = qlinear.TILE_MIN_ROWS
    try:
        for rows in (1, 4, 8, 16, 24, 32, 48, 64, 128):
            x = torch.randn(rows, 576, generator=g)
            times = {"kernels": [], "tiles": []}
            for _ in range(args.repeats):
                for how, limit in (("kernels", 1 << 30), ("tiles", 1)):
                    qlinear.TILE_MIN_ROWS = limit
                    times[how].append(timed(lambda x=x: lin(x)))
            a, b = statistics.median(times["kernels"]), statistics.median(times["tiles"])
            lines.append(f"| {rows} | {1e6 * a:.0f} | {1e6 * b:.0f} | {b / a:.2f} |")
    finally:
        qlinear.TILE_MIN_ROWS = saved
    benchlib.publish(lines, args.out, SECTION)


if __name__ == "__main__":
    main()
