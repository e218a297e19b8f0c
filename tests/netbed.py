"""Test hosts with real links: Linux network namespaces made here, one per host, each joined to a bridge (in a
namespace of its own, the "switch") by a veth pair, with a private address of a test range that exists inside
these namespaces only. A link's rate is the kernel's (`tc` tbf on both ends of the host's veth); its delay, jitter
and loss come from a delaying relay (tests/fault_proxy.py) run inside the host's namespace in front of the port
its server listens on, since this kernel's `tc` has no netem. Everything is torn down on close, also after a
failure; nothing is sent to any address outside these namespaces.

    with NetBed([Link(delay=0.01, rate_mbit=100)] * 3) as bed:
        bed.hosts[0].ip                           # "10.213.<n>.2"
        p = bed.popen(1, ["python", "-m", ...])   # a process on host 1
        addr = bed.relay(1, 7001)                 # host 1's link in front of 127.0.0.1:7001 there: "ip:7000"

Needs root and `ip` / `tc` (iproute2); `NetBed.unavailable()` says why not. Tests use the `netbed` fixture
(conftest.py), benchmarks this class.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

RELAY_PORT = 7000  # where a host's link relay listens (the namespace is the test's own: no port is taken there)
SERVER_PORT = 7001  # where a server behind the relay listens, on the host's own loopback
STAGE_READY = "LAYERLINE_STAGE_READY "
PROXY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_proxy.py")


@dataclass(frozen=True)
class Link:
    """One host's link to the switch: what every connection into the host's relay goes through."""

    delay: float = 0.0  # one-way seconds, each direction
    jitter: float = 0.0  # up to this much more per chunk
    loss: float = 0.0  # probability of a lost segment's stall per chunk
    rate_mbit: float = 0.0  # both directions; 0 = the veth's own speed


@dataclass
class Host:
    index: int
    namespace: str
    ip: str
    link: Link
    processes: list[subprocess.Popen] = field(default_factory=list)


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")


class NetBed:
    def __init__(self, links: Sequence[Link]) -> None:
        self.links = list(links)
        self.tag = secrets.token_hex(3)  # names of this bed's namespaces and interfaces (<= 15 characters)
        self.subnet = f"10.213.{secrets.randbelow(250) + 1}"
        self.switch = f"llsw{self.tag}"
        self.hosts: list[Host] = []
        self._made: list[str] = []

    @staticmethod
    def unavailable() -> str:
        """Why a bed cannot be built here ("" when it can)."""
        if sys.platform != "linux":
            return "network namespaces need Linux"
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                return f"`{tool}` (iproute2) is not installed"
        return ""

    def __enter__(self) -> NetBed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        why = self.unavailable()
        if why:
            raise RuntimeError(why)
        try:
            self._namespace(self.switch)
            _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, link in enumerate(self.links):
                ns = f"llh{i}{self.tag}"
                self._namespace(ns)
                # the host's end (eth0, in its namespace) and the switch's end (p<i>, on the bridge)
                _run(
                    "ip",
                    "link",
                    "add",
                    "eth0",
                    "netns",
                    ns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    f"p{i}",
                    "netns",
                    self.switch,
                )
                ip = f"{self.subnet}.{i + 2}"
                _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
                _run("ip", "-n", ns, "link", "set", "eth0", "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
                if link.rate_mbit > 0:  # egress of both ends: the host's sending and its receiving
                    for where, dev in ((ns, "eth0"), (self.switch, f"p{i}")):
                        _run(*self._rate(where, dev, link.rate_mbit))
                self.hosts.append(Host(i, ns, ip, link))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _rate(namespace: str, dev: str, mbit: float) -> list[str]:
        # a bucket of ~2 ms at the rate (at least 32 KiB, as tbf needs to pass a full-size TSO segment)
        burst = max(32 * 1024, int(mbit * 1e6 / 8 * 0.002))
        return ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                "rate", f"{mbit}mbit", "burst", str(burst), "latency", "100ms"]  # fmt: skip

    def _namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(name)

    def command(self, host: int, argv: Sequence[str]) -> list[str]:
        """`argv` run inside host `host`'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host].namespace, *argv]

    def popen(self, host: int, argv: Sequence[str], **kw) -> subprocess.Popen:
        """A process on host `host`, stopped at close."""
        # a stage started here exits with this process (layerline.local_cluster.die_with_parent)
        kw.setdefault("env", dict(os.environ, LAYERLINE_PARENT_PID=str(os.getpid())))
        p = subprocess.Popen(self.command(host, argv), **kw)
        self.hosts[host].processes.append(p)
        return p

    def relay(self, host: int, target: int | str, port: int = RELAY_PORT) -> str:
        """Host `host`'s link in front of `target` (a port of the host's own loopback, or host:port elsewhere in
        the bed): returns the address others reach it at."""
        h = self.hosts[host]
        listen = f"{h.ip}:{port}"
        link = h.link
        target = f"127.0.0.1:{target}" if isinstance(target, int) else target
        p = self.popen(
            host,
            [sys.executable, PROXY, "--listen", listen, "--target", target,
             "--delay", str(link.delay), "--jitter", str(link.jitter), "--loss", str(link.loss)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        line = _readline(p, 20.0)
        if not line.startswith("FAULT_PROXY_READY "):
            raise RuntimeError(f"the relay on host {host} did not start: {line!r}")
        return listen

    def stage(self, host: int, model: str, layers: str | None, *extra: str, timeout: float = 120.0) -> str:
        """A stage server on host `host` serving `layers` ("A:B") of `model` (None: what the coordinator in
        `extra`, `--coordinator HOST:PORT`, assigns), behind the host's link; returns the address it advertises
        (the relay's)."""
        address = f"{self.hosts[host].ip}:{RELAY_PORT}"
        span = ["--layers", layers] if layers is not None else []
        argv = [sys.executable, "-m", "layerline.cli", "stage", "--model", model, *span,
                "--host", "127.0.0.1", "--port", str(SERVER_PORT), "--advertise", address, "--threads", "1", *extra]  # fmt: skip
        p = self.popen(host, argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        line = _readline(p, timeout, STAGE_READY)
        if not line:
            raise RuntimeError(f"the stage on host {host} did not start (exit {p.poll()})")
        threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()  # type: ignore[union-attr]
        return self.relay(host, SERVER_PORT)

    def close(self) -> None:
        for h in self.hosts:
            for p in h.processes:
                if p.poll() is None:
                    p.terminate()
            for p in h.processes:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            h.processes = []
        for name in reversed(self._made):  # a namespace's veth ends go with it
            with contextlib.suppress(Exception):
                _run("ip", "netns", "del", name)
        self._made = []


def _readline(p: subprocess.Popen, timeout: float, prefix: str = "") -> str:
    """The process's first line of output that starts with `prefix`, or "" when none came within `timeout`."""
    out: list[str] = []

    def read() -> None:
        for line in p.stdout:  # type: ignore[union-attr]
            if line.startswith(prefix):
                out.append(line)
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else ""
