"""Stage servers as child processes on this machine: started in parallel on 127.0.0.1 with port 0, ready when
each prints its ready line, and always stopped (SIGTERM, then SIGKILL; the kernel also kills them if this process
dies first). Used by `layerline local`, the tests and the benchmarks. Knows nothing of the protocol."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from layerline.errors import LayerlineError

logger = logging.getLogger(__name__)

READY_PREFIX = "LAYERLINE_STAGE_READY "  # printed by layerline.stage_server.server.print_ready


PARENT_ENV = "LAYERLINE_PARENT_PID"


def die_with_parent() -> None:
    """Called by a stage process at start-up when a launcher set PARENT_ENV: ask the kernel (Linux) for SIGTERM
    when the launcher exits, so no stage outlives it; exit at once if it is already gone. (Done in the child
    itself: a preexec_fn would run between fork and exec of a threaded parent, which is not safe.)"""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != parent:
        raise SystemExit("layerline: the process that started this stage is gone")


def pinned_cores(n: int) -> list[int | None]:
    """A core of this process's own for each of `n` processes, or none for any when there are fewer cores."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return list(allowed[:n]) if 0 < n <= len(allowed) else [None] * n


class LocalCluster:
    def __init__(
        self,
        model: str | None,  # None: stages fetch it from the coordinator
        ranges: Sequence[tuple[int, int] | None],
        *,
        coordinator: str = "",
        dtype: str | None = None,  # --dtype of every stage (None: weights as the checkpoint stores them)
        quantize: str = "",  # --quantize of every stage
        threads: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 180.0,
        env: dict[str, str] | None = None,
        prefixes: Sequence[Sequence[str] | None] = (),
        pin: bool = False,
        devices: Sequence[str] = (),  # --device of each stage (one for all, or one per stage; none: the CPU)
    ) -> None:
        self.model, self.ranges, self.dtype, self.quantize = model, list(ranges), dtype, quantize
        if devices:
            from layerline.devices import one_per_stage  # (torch: only when devices are named)

            devices = one_per_stage(devices, len(self.ranges))
        self.devices = list(devices)
        # one core per stage (`layerline stage --cpus`) when there are enough: co-located stages then do not evict
        # each other's caches or migrate between cores
        self.cores = pinned_cores(len(self.ranges)) if pin else [None] * len(self.ranges)
        self.prefixes = list(prefixes)  # per stage: argv put in front of its command (e.g. a wrapper), or None
        self.coordinator = coordinator  # stages with no range (None) register there and get one
        cores = os.cpu_count() or 1
        self.threads = threads or max(1, cores // max(1, len(self.ranges)))
        self.extra_args, self.startup_timeout = list(extra_args), startup_timeout
        self.env = env
        self.processes: list[subprocess.Popen] = []
        self.logs: list[tempfile._TemporaryFileWrapper] = []
        self.route: list[str] = []
        self.listen: list[str] = []  # where each stage listens (differs from its route address with --advertise)
        self.metrics: list[str] = []  # host:port of each stage's Prometheus metrics ("" without --metrics-port)
        self.announced: list[dict] = []  # each stage's ready line, as printed

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def command(self, layers: tuple[int, int] | None, cpu: int | None = None, device: str | None = None) -> list[str]:
        if layers is None and not self.coordinator:
            raise LayerlineError("a stage without a layer range needs a coordinator")
        where = ["--layers", f"{layers[0]}:{layers[1]}"] if layers is not None else ["--coordinator", self.coordinator]
        return [
            sys.executable,
            "-m",
            "layerline.cli",
            "stage",
            *(["--model", self.model] if self.model is not None else []),  # None: fetched from the coordinator
            *where,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *(["--dtype", self.dtype] if self.dtype else []),
            *(["--quantize", self.quantize] if self.quantize else []),
            *(["--device", device] if device else []),
            "--threads",
            str(self.threads),
            *(["--cpus", str(cpu)] if cpu is not None else []),
            *self.extra_args,
        ]

    def start(self) -> list[str]:
        ready: queue.Queue[tuple[int, dict | None]] = queue.Queue()
        env = dict(os.environ, **(self.env or {}), **{PARENT_ENV: str(os.getpid())})
        try:
            for i, layers in enumerate(self.ranges):
                log = tempfile.NamedTemporaryFile(prefix=f"layerline-stage{i}-", suffix=".log", delete=False)
                self.logs.append(log)
                prefix = self.prefixes[i] if i < len(self.prefixes) and self.prefixes[i] else []
                p = subprocess.Popen(
                    [*prefix, *self.command(layers, self.cores[i], self.devices[i] if self.devices else None)],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    env=env,
                )
                self.processes.append(p)
                threading.Thread(target=_watch, args=(i, p, ready), daemon=True).start()
            addresses: list[str | None] = [None] * len(self.ranges)
            listen = [""] * len(self.ranges)
            metrics = [""] * len(self.ranges)
            announced: list[dict] = [{} for _ in self.ranges]
            deadline = time.monotonic() + self.startup_timeout
            while any(a is None for a in addresses):
                try:
                    i, info = ready.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise LayerlineError(f"stage servers did not start within {self.startup_timeout:g} s") from None
                if info is None:
                    what = "assigned by the coordinator" if self.ranges[i] is None else "{}:{}".format(*self.ranges[i])
                    raise LayerlineError(f"stage {what} failed to start:\n{self.log_tail(i)}")
                addresses[i] = info["address"]
                listen[i] = info.get("listen") or info["address"]
                metrics[i] = info.get("metrics", "")
                announced[i] = info
            self.route, self.listen, self.metrics = [a for a in addresses if a is not None], listen, metrics
            self.announced = announced
            return self.route
        except BaseException:
            self.stop()
            raise

    def log_tail(self, i: int, lines: int = 20) -> str:
        try:
            with open(self.logs[i].name, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()
            with contextlib.suppress(OSError):
                os.unlink(log.name)
        self.processes, self.logs = [], []


def _watch(i: int, p: subprocess.Popen, ready: queue.Queue) -> None:
    """Wait for the stage's ready line, then keep draining its stdout so it never blocks on a full pipe."""
    announced = False
    assert p.stdout is not None
    for line in p.stdout:
        if not announced and line.startswith(READY_PREFIX):
            ready.put((i, json.loads(line[len(READY_PREFIX) :])))
            announced = True
    if not announced:
        ready.put((i, None))


COORDINATOR_READY = "layerline coordinator for "  # printed by `layerline coordinator` once it listens


class _Child:
    """A `layerline ...` command as a child process; `start()` waits for the line it prints once it listens."""

    what = "the process"
    ready_prefix = ""

    def __init__(self, startup_timeout: float, env: dict[str, str] | None) -> None:
        self.startup_timeout, self.env = startup_timeout, env
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="layerline-child-", suffix=".log", delete=False)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _launch(self, args: Sequence[str]) -> str:
        """Run `layerline ARGS`; the rest of its ready line."""
        env = dict(os.environ, **(self.env or {}), **{PARENT_ENV: str(os.getpid())})
        cmd = [sys.executable, "-m", "layerline.cli", *args]
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL, text=True, env=env
        )
        ready: queue.Queue[str | None] = queue.Queue()

        def watch() -> None:
            assert self.process is not None and self.process.stdout is not None
            announced = False
            for line in self.process.stdout:
                if not announced and line.startswith(self.ready_prefix):
                    ready.put(line.strip()[len(self.ready_prefix) :])
                    announced = True
            if not announced:
                ready.put(None)

        threading.Thread(target=watch, daemon=True).start()
        try:
            rest = ready.get(timeout=self.startup_timeout)
        except queue.Empty:
            rest = None
        if rest is None:
            self.stop()
            with open(self.log.name, errors="replace") as f:
                raise LayerlineError(f"{self.what} did not start:\n{f.read()[-2000:]}")
        return rest

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-chars:]

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


class LocalCoordinator(_Child):
    """`layerline coordinator` as a child process on 127.0.0.1 (port 0); `address` once it listens."""

    what = "the coordinator"
    ready_prefix = COORDINATOR_READY

    def __init__(
        self,
        model: str,
        *,
        heartbeat: float = 2.0,
        settle: float = 4.0,
        expect: int = 0,
        startup_timeout: float = 60.0,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
        objective: str = "latency",
    ) -> None:
        super().__init__(startup_timeout, env)
        self.args = ["--heartbeat", str(heartbeat), "--settle", str(settle), "--expect", str(expect)]
        self.args += ["--objective", objective, *extra_args]
        self.model = model
        self.address = ""
        self.metrics = ""  # host:port of its Prometheus metrics, when started with --metrics-port

    def start(self) -> str:
        rest = self._launch(["coordinator", "--model", self.model, "--port", "0", *self.args])
        self.address = re.search(r"listening on (\S+)", rest).group(1)  # type: ignore[union-attr]
        metrics = re.search(r"metrics on http://(\S+)/metrics", rest)
        self.metrics = metrics.group(1) if metrics else ""
        return self.address


API_READY = "layerline api on "  # printed by `layerline api` once it listens


class LocalApi(_Child):
    """`layerline api` as a child process on 127.0.0.1 (port 0) over a route or a coordinator; `url` once it
    listens (http://127.0.0.1:PORT)."""

    what = "the API server"
    ready_prefix = API_READY

    def __init__(
        self,
        *,
        route: Sequence[str] = (),
        coordinator: str = "",
        startup_timeout: float = 60.0,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(startup_timeout, env)
        self.args = ["--route", ",".join(route)] if route else ["--coordinator", coordinator]
        self.args += list(extra_args)
        self.url = ""

    def start(self) -> str:
        rest = self._launch(["api", "--port", "0", *self.args])
        self.url = rest.split(" ", 1)[0]
        return self.url
