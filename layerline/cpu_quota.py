"""A cgroup v1 CPU quota for processes started from here: how the benchmarks and tests make one local stage slower
than another on a single machine (needs root and the cgroup v1 cpu controller)."""

from __future__ import annotations

import os
import time

CGROUP_ROOT = "/sys/fs/cgroup/cpu"
PERIOD_US = 10_000  # 10 ms: a stage cannot bank a long idle spell and then run a whole step unthrottled


def available() -> bool:
    """Whether this process may make cpu groups (root, cgroup v1 cpu controller mounted)."""
    return os.access(CGROUP_ROOT, os.W_OK) and os.path.exists(os.path.join(CGROUP_ROOT, "cpu.cfs_quota_us"))


class CpuQuota:
    """A cpu group of its own, limited to `cores` CPUs; processes join it through `prefix()`."""

    def __init__(self, cores: float, tag: str = "layerline") -> None:
        self.path = os.path.join(CGROUP_ROOT, f"{tag}-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(self.path)
        self._write("cpu.cfs_period_us", PERIOD_US)
        self.set(cores)

    def __enter__(self) -> CpuQuota:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _write(self, name: str, value: int) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(value))

    def set(self, cores: float | None) -> None:
        """Limit the group to `cores` CPUs (None: no limit)."""
        self._write("cpu.cfs_quota_us", -1 if cores is None else int(cores * PERIOD_US))

    def prefix(self) -> list[str]:
        """Argv put in front of a command: the process joins this group before it execs the command."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"]

    def remove(self, timeout: float = 10.0) -> None:
        """Delete the group (it must be empty: waits for its processes to be gone)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
