"""Test hosts with real links (tests/netbed.py): each link really delays and rate-limits what crosses it (lower
bounds only, which no machine speed can break), nothing leaves the bed's namespaces, the bed is gone after close,
and a pipeline whose stages and client sit on different hosts gives transformers' tokens, with and without
speculative decoding."""

from __future__ import annotations

import json
import subprocess
import sys

from netbed import Link

from tiny_models import TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=4, kv_heads=2)

ECHO = """
import socket
s = socket.socket()
s.bind(("127.0.0.1", 7001))
s.listen()
c, _ = s.accept()
while d := c.recv(1 << 16):
    c.sendall(d)
"""

PROBE = """
import json, socket, sys, time
host, port = sys.argv[1].split(":")
for _ in range(50):
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        break
    except OSError:
        time.sleep(0.1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(5):
    t = time.perf_counter(); s.sendall(b"x" * 64); s.recv(64); rtts.append(time.perf_counter() - t)
blob = b"y" * int(sys.argv[2])
t = time.perf_counter(); s.sendall(blob); got = 0
while got < len(blob):
    got += len(s.recv(1 << 20))
bulk = time.perf_counter() - t
try:
    socket.create_connection(("192.0.2.1", 80), timeout=2)  # TEST-NET-1: must not even be routable from here
    outside = "connected"
except OSError as e:
    outside = type(e).__name__ + ":" + str(e.errno)
print(json.dumps({"rtts": rtts, "bulk": bulk, "outside": outside}))
"""

CLIENT = """
import json, sys
from layerline.client import Client, ClientConfig
route, prompt, server_loop = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1"
out = {}
with Client(route, config=ClientConfig(server_loop=server_loop)) as c:
    out["plain"] = c.generate(prompt, max_new_tokens=24, stop_token_ids=[], stream=False).token_ids
    out["ngram"] = c.generate(prompt, max_new_tokens=24, stop_token_ids=[], stream=False, speculate="ngram").token_ids
print(json.dumps(out))
"""


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_links_delay_and_rate_limit_and_nothing_leaves_the_bed(netbed):
    delay, mbit, size = 0.02, 20.0, 1_000_000
    bed = netbed([Link(), Link(delay=delay, rate_mbit=mbit)])
    bed.popen(1, [sys.executable, "-c", ECHO])
    address = bed.relay(1, 7001)
    done = subprocess.run(
        bed.command(0, [sys.executable, "-c", PROBE, address, str(size)]), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert min(got["rtts"]) >= 2 * delay  # the relay's delay, each way
    assert got["bulk"] >= 0.9 * size * 8 / (mbit * 1e6)  # the kernel's rate limit, one way at least
    assert got["outside"].startswith("OSError:101"), got  # ENETUNREACH: no route out of the bed
    names = {h.namespace for h in bed.hosts} | {bed.switch}
    assert names <= namespaces()
    bed.close()
    assert not names & namespaces()


def test_a_pipeline_across_test_hosts_gives_transformers_tokens(netbed, tiny_checkpoint):
    folder, ref = tiny_checkpoint(SPEC)
    bed = netbed([Link(delay=0.005, rate_mbit=50)] * 3)  # the client on host 0, a stage on each of hosts 1 and 2
    route = [bed.stage(1, folder, "0:2"), bed.stage(2, folder, "2:4")]
    phrase = list(range(40, 49))
    prompt = phrase + [7, 8, 9] + phrase[:4]
    want = hf_greedy(ref, prompt, 24)
    for server_loop in ("1", "0"):
        done = subprocess.run(
            bed.command(0, [sys.executable, "-c", CLIENT, json.dumps(route), json.dumps(prompt), server_loop]),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        got = json.loads(done.stdout.strip().splitlines()[-1])
        assert got["plain"] == want and got["ngram"] == want, (server_loop, got, want)
