"""Baseline for the "score a batch" workload: the same stages run under `torch.distributed.pipelining`
(ScheduleGPipe, gloo, one process per stage on 127.0.0.1) instead of layerline's gRPC pipeline.

Workload: B token-id sequences of length T, cut into micro-batches of m rows. Stage i runs layers ranges[i] with
layerline's own `StageModel` (so the arithmetic is identical to layerline's); the last stage turns its logits into
per-token log-probabilities: for row b and column t < T-1, log_softmax(logits[b, t])[tokens[b, t + 1]] (float32,
[m, T-1] per micro-batch). Forward only: no loss, no backward.

    .venv/bin/python bench/gpipe_baseline.py [--model smollm2] [--batch 32] [--seq-len 128] [--micro-batch 4]
                                             [--repeats 3] [--threads 1]

Prints the median seconds per batch, sequences/s, and the largest difference from the one-process `LocalPipeline`
reference. Importable (`import gpipe_baseline` from bench/): `run_gpipe` is the API; nothing runs at import.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TIMEOUT = 1200.0  # seconds for the whole run_gpipe call (load, warm-up, repeats)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_sequences(batch: int, seq_len: int) -> list[list[int]]:
    """Deterministic token ids, all in [1, 4000]."""
    return [[1 + (7 * i + 13 * j) % 4000 for j in range(seq_len)] for i in range(batch)]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [m, T, vocab], tokens [m, T] -> float32 [m, T-1]: log-prob of tokens[:, t + 1] given the prefix."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, tokens[:, 1:, None].to(torch.int64)).squeeze(-1)


class _Stage(nn.Module):
    """A layerline StageModel as a pipelining submodule: first stage ids -> hidden, middle hidden -> hidden, last
    hidden (+ tokens, passed as a keyword on the last rank) -> log-probs.

    StageModel.forward runs under inference_mode, so it returns inference tensors. On torch 2.13 the pipelining
    runtime takes them as they are for a forward-only schedule (gloo sends them, the last rank's merge concatenates
    them, with or without grad mode), so they are passed on without a copy."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage
        self.is_last = bool(getattr(stage, "is_last", False))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        out = self.stage(x)
        if self.is_last:
            if tokens is None:
                raise ValueError("the last stage needs the micro-batch's tokens to score them")
            with torch.inference_mode():
                out = token_logprobs(out, tokens)
        return out


def _worker(rank: int, spec: dict) -> dict:
    """One pipeline stage (rank `rank`); returns {"seconds": [...]} (+ "logprobs" at the last rank)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from layerline.checkpoint import load_stage

    world, micro_batch, timeout = len(spec["ranges"]), spec["micro_batch"], spec["timeout"]
    torch.set_num_threads(spec["threads"])
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # 127.0.0.1 only
    store = dist.TCPStore("127.0.0.1", spec["port"], is_master=False, timeout=timedelta(seconds=timeout))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    try:
        start, end = spec["ranges"][rank]
        stage_model = load_stage(spec["model_path"], start, end, torch.float32)
        if spec.get("pack_weights"):
            stage_model.pack_weights()
        tokens = torch.tensor(spec["sequences"], dtype=torch.int64)
        B, T = tokens.shape
        is_first, is_last = rank == 0, rank == world - 1
        # static shapes of one micro-batch: the runtime then skips its metadata-inference forward
        meta = torch.device("meta")
        hidden = torch.empty(micro_batch, T, stage_model.config.hidden_size, device=meta)
        ins = torch.empty(micro_batch, T, dtype=torch.int64, device=meta) if is_first else hidden
        outs = torch.empty(micro_batch, T - 1, device=meta) if is_last else hidden
        pstage = PipelineStage(_Stage(stage_model), rank, world, torch.device("cpu"), input_args=ins, output_args=outs)
        schedule = ScheduleGPipe(pstage, B // micro_batch)

        def step():
            if is_first:
                return schedule.step(tokens)
            if is_last:
                return schedule.step(tokens=tokens)  # keyword inputs are split into micro-batches too
            return schedule.step()

        with torch.no_grad():
            step()  # warm-up
            seconds, out = [], None
            for _ in range(spec["repeats"]):
                dist.barrier()
                t0 = time.perf_counter()
                out = step()
                dist.barrier()
                seconds.append(time.perf_counter() - t0)
        result = {"seconds": seconds}
        if is_last:
            result["logprobs"] = out.tolist()
        return result
    finally:
        dist.destroy_process_group()


def _worker_main(spec_path: str, rank: int, out_path: str) -> None:
    """Entry point of a stage process: `python gpipe_baseline.py --worker SPEC RANK OUT`."""
    with open(spec_path) as f:
        spec = json.load(f)
    parent, deadline = os.getppid(), time.monotonic() + spec["timeout"]

    def watchdog() -> None:  # never outlive the caller or the deadline
        while True:
            time.sleep(0.5)
            if os.getppid() != parent or time.monotonic() > deadline:
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    result = _worker(rank, spec)
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out_path + ".tmp", out_path)


def _tail(path: str, chars: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def run_gpipe(
    model_path: str,
    ranges: list[tuple[int, int]],
    sequences: list[list[int]],
    micro_batch: int,
    repeats: int = 3,
    threads: int = 1,
    timeout: float = DEFAULT_TIMEOUT,
    pack_weights: bool = False,
) -> dict:
    """Score `sequences` (B rows of T ids) with one process per layer range under ScheduleGPipe (gloo,
    127.0.0.1), micro-batches of `micro_batch` rows: one warm-up step, then `repeats` timed steps. With
    `pack_weights`, each stage model gets layerline's packed weight copies (`StageModel.pack_weights`).

    Returns {"seconds": wall seconds of each timed step for the whole batch, taken at the last rank between two
    barriers, "logprobs": the last step's log-probs as [B][T-1] floats}. The stage processes are subprocesses
    (nothing of the caller is re-imported) and are always stopped, within `timeout` seconds for the whole call."""
    import torch.distributed as dist

    world = len(ranges)
    if world < 2:
        raise ValueError("run_gpipe needs at least 2 layer ranges (one process each)")
    if not sequences or len({len(s) for s in sequences}) != 1 or len(sequences[0]) < 2:
        raise ValueError("sequences must be a non-empty list of equal-length rows of at least 2 tokens")
    if micro_batch <= 0 or len(sequences) % micro_batch:
        raise ValueError(f"batch of {len(sequences)} rows is not a whole number of {micro_batch}-row micro-batches")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")

    deadline = time.monotonic() + timeout
    # the rendezvous store lives here, on a port the OS picked: no free-port race
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="gpipe_baseline_") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(
                {
                    "port": store.port,
                    "model_path": os.fspath(model_path),
                    "ranges": [list(r) for r in ranges],
                    "sequences": [list(s) for s in sequences],
                    "micro_batch": micro_batch,
                    "repeats": repeats,
                    "threads": threads,
                    "timeout": timeout,
                    "pack_weights": pack_weights,
                },
                f,
            )
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        logs = [os.path.join(tmp, f"rank{r}.log") for r in range(world)]
        try:
            for r in range(world):
                with open(logs[r], "wb") as log:
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec_path, str(r), outs[r]]
                    procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
            while True:
                codes = [p.poll() for p in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    r = failed[0]
                    raise RuntimeError(f"run_gpipe: rank {r} exited with {codes[r]}:\n{_tail(logs[r])}")
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_gpipe: the stage processes did not finish within {timeout:.0f} s")
                time.sleep(0.05)
            with open(outs[-1]) as f:
                last = json.load(f)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            del store
    return {"seconds": last["seconds"], "logprobs": last["logprobs"]}


def reference_logprobs(
    model_path: str, ranges: Sequence[tuple[int, int]], sequences: list[list[int]], micro_batch: int
) -> tuple[list[list[float]], float]:
    """The one-process LocalPipeline's log-probs over the same micro-batches, and the seconds it took."""
    from layerline.pipeline import LocalPipeline

    pipe = LocalPipeline.load(model_path, list(ranges), torch.float32)
    tokens = torch.tensor(sequences, dtype=torch.int64)
    t0 = time.perf_counter()
    with torch.inference_mode():
        parts = [token_logprobs(pipe.forward(mb), mb) for mb in tokens.split(micro_batch)]
    seconds = time.perf_counter() - t0
    return torch.cat(parts).tolist(), seconds


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return (torch.tensor(a) - torch.tensor(b)).abs().max().item()


def main(argv: Sequence[str] | None = None) -> None:
    from layerline.checkpoint import load_config
    from layerline.model_source import resolve_model
    from layerline.pipeline import split_layers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per stage process")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    args = ap.parse_args(argv)

    path = resolve_model(args.model)
    ranges = split_layers(load_config(path).num_layers, stages=2)
    sequences = make_sequences(args.batch, args.seq_len)
    print(
        f"torch {torch.__version__}: GPipe over gloo, stages {ranges}, {args.batch} x {args.seq_len} tokens, "
        f"micro-batch {args.micro_batch}, {args.threads} thread(s) per process"
    )
    res = run_gpipe(path, ranges, sequences, args.micro_batch, args.repeats, args.threads, timeout=args.timeout)
    med = statistics.median(res["seconds"])
    print(f"seconds per batch: {', '.join(f'{s:.3f}' for s in res['seconds'])}")
    print(f"median {med:.3f} s, {args.batch / med:.2f} sequences/s, {args.batch * args.seq_len / med:.0f} tokens/s")
    torch.set_num_threads(args.threads)
    ref, ref_seconds = reference_logprobs(path, ranges, sequences, args.micro_batch)
    print(f"one-process LocalPipeline, same micro-batches, {args.threads} thread(s): {ref_seconds:.3f} s")
    print(f"max abs diff of log-probs vs LocalPipeline: {max_abs_diff(res['logprobs'], ref):.3g}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
