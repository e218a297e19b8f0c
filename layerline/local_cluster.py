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


class LocalCluster:
    def __init__(
        self,
        model: str,
        ranges: Sequence[tuple[int, int]],
        *,
        dtype: str = "float32",
        threads: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 180.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model, self.ranges, self.dtype = model, list(ranges), dtype
        cores = os.cpu_count() or 1
        self.threads = threads or max(1, cores // max(1, len(self.ranges)))
        self.extra_args, self.startup_timeout = list(extra_args), startup_timeout
        self.env = env
        self.processes: list[subprocess.Popen] = []
        self.logs: list[tempfile._TemporaryFileWrapper] = []
        self.route: list[str] = []

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def command(self, start: int, end: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "layerline.cli",
            "stage",
            "--model",
            self.model,
            "--layers",
            f"{start}:{end}",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dtype",
            self.dtype,
            "--threads",
            str(self.threads),
            *self.extra_args,
        ]

    def start(self) -> list[str]:
        ready: queue.Queue[tuple[int, dict | None]] = queue.Queue()
        env = dict(os.environ, **(self.env or {}), **{PARENT_ENV: str(os.getpid())})
        try:
            for i, (a, b) in enumerate(self.ranges):
                log = tempfile.NamedTemporaryFile(prefix=f"layerline-stage{i}-", suffix=".log", delete=False)
                self.logs.append(log)
                p = subprocess.Popen(
                    self.command(a, b),
                    stdout=subprocess.PIPE,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    env=env,
                )
                self.processes.append(p)
                threading.Thread(target=_watch, args=(i, p, ready), daemon=True).start()
            addresses: list[str | None] = [None] * len(self.ranges)
            deadline = time.monotonic() + self.startup_timeout
            while any(a is None for a in addresses):
                try:
                    i, info = ready.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise LayerlineError(f"stage servers did not start within {self.startup_timeout:g} s") from None
                if info is None:
                    raise LayerlineError(
                        f"stage {self.ranges[i][0]}:{self.ranges[i][1]} failed to start:\n{self.log_tail(i)}"
                    )
                addresses[i] = info["address"]
            self.route = [a for a in addresses if a is not None]
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
