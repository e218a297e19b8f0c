"""The matmul kernels a stage picks between, by number of rows, measured side by side in one run: MKL's x @ W_t on
the [in, out] layout (what a stage uses for one row) vs oneDNN on a packed copy (`layerline stage --pack-weights`,
from `PACKED_MIN_ROWS` rows on), on the model's own matmul shapes, cycling through enough distinct weights that
they stream from memory as in serving (one torch thread).

    .venv/bin/python bench/gemm_rows.py [--model smollm2] [--rows 1,2,3,4,8,16,128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from layerline.checkpoint import load_config
from layerline.model import PACKED_MIN_ROWS, linear_t, pack_weight
from layerline.model_source import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", default="1,2,3,4,8,16,128")
    ap.add_argument("--megabytes", type=int, default=400, help="weights cycled through per timing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    c = load_config(resolve_model(args.model))
    shapes = [
        (c.hidden_size, c.q_size + 2 * c.kv_size),  # qkv
        (c.q_size, c.hidden_size),  # o
        (c.hidden_size, 2 * c.intermediate_size),  # gate + up
        (c.intermediate_size, c.hidden_size),  # down
    ]
    layer_bytes = 4 * sum(i * o for i, o in shapes)
    layers = max(1, args.megabytes * (1 << 20) // layer_bytes)
    g = torch.Generator().manual_seed(0)
    plain = [[torch.randn(i, o, generator=g) * 0.02 for i, o in shapes] for _ in range(layers)]
    packed = [[pack_weight(w) for w in ws] for ws in plain]

    def per_layer(x: torch.Tensor, use_packed: bool) -> float:
        runs = []
        for _ in range(3):
            began = time.perf_counter()
            for ws, ps in zip(plain, packed, strict=True):
                for w, p in zip(ws, ps, strict=True):
                    xi = x[:, : w.shape[0]]
                    if use_packed:  # oneDNN at every row count (linear_t takes it from PACKED_MIN_ROWS on)
                        torch.ops.mkldnn._linear_pointwise(xi, p, None, "none", [], "")
                    else:
                        linear_t(xi, w)
            runs.append((time.perf_counter() - began) / layers)
        return statistics.median(runs)

    print(
        f"{args.model}: one layer's matmuls ({', '.join(f'{i}x{o}' for i, o in shapes)}; {layer_bytes >> 20} MiB "
        f"float32), {layers} distinct layers cycled; ms per layer, one thread. A stage with --pack-weights uses "
        f"the packed copy from {PACKED_MIN_ROWS} rows on."
    )
    print("| rows | MKL x @ W_t | per row vs 1 row | oneDNN packed | per row vs 1 row (MKL) | packed is |")
    print("|---:|---:|---:|---:|---:|---:|")
    one = None
    for n in (int(r) for r in args.rows.split(",")):
        x = torch.randn(n, max(i for i, _ in shapes), generator=g)
        with torch.inference_mode():
            mkl, onednn = per_layer(x, False), per_layer(x, True)
        one = one if one is not None else mkl
        print(
            f"| {n} | {1000 * mkl:.2f} | {mkl / n / one:.2f} | {1000 * onednn:.2f} | {onednn / n / one:.2f} | "
            f"{mkl / onednn:.2f}x |"
        )


if __name__ == "__main__":
    main()
