"""The dashboard in a real browser: headless Chromium (Debian's, driven by playwright) loads the page `layerline api`
serves over a coordinator-placed cluster (all in subprocesses on 127.0.0.1) and finds every stage on the bar of
layer ranges with the range the coordinator assigned it, and in the table; the charts of the last minutes have a
series per stage (and the cluster's), and a generation by an SDK client (not through the API) shows up in the
table's tokens/s and moves the charts. A screenshot is written to build/test-artifacts/dashboard.png."""

from __future__ import annotations

import os
import shutil
import threading
import time

import grpc
import pytest

from layerline.client import Client
from layerline.local_cluster import LocalApi, LocalCluster, LocalCoordinator
from layerline.v1 import coordinator_pb2 as pb
from layerline.v1 import coordinator_pb2_grpc
from tiny_models import TinySpec

SPEC = TinySpec("llama", layers=6, kv_heads=2)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "test-artifacts")
FLAGS = [  # as this machine needs them: no sandbox as root, no background connections to a closed network
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not os.path.exists(CHROMIUM):
    # scripts/setup.sh --test installs Debian's chromium; CI (.ci/run) sets LAYERLINE_REQUIRE_BROWSER, so a missing
    # browser fails there instead of being skipped
    if os.environ.get("LAYERLINE_REQUIRE_BROWSER"):
        raise RuntimeError(f"no chromium at {CHROMIUM}: install Debian's chromium package")
    pytestmark = pytest.mark.skip(reason="no chromium (install Debian's chromium package)")


def status(address: str) -> pb.ClusterStatus:
    with grpc.insecure_channel(address) as channel:
        return coordinator_pb2_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=10)


def wait_for_chain(address: str, timeout: float = 90.0) -> pb.ClusterStatus:
    deadline = time.monotonic() + timeout
    while True:
        st = status(address)
        if len(st.route.addresses) == 2 and all(s.ready for s in st.stages):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def test_the_dashboard_shows_the_stages_and_their_layer_ranges(tiny_checkpoint, tmp_path):
    from playwright.sync_api import sync_playwright

    folder, _ = tiny_checkpoint(SPEC)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    # a plan that stays while the page is read (no refinement from measured links or load)
    with LocalCoordinator(
        folder, heartbeat=0.5, settle=30, expect=2, objective="throughput", extra_args=["--refine", "0"]
    ) as coordinator:
        with LocalCluster(folder, [None, None], coordinator=coordinator.address, threads=1, env=env):
            st = wait_for_chain(coordinator.address)
            ranges = {s.report.address: f"{s.serving_start}:{s.serving_end}" for s in st.stages}
            with LocalApi(coordinator=coordinator.address) as api, sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 720})
                    page.goto(api.url + "/", timeout=30_000)
                    page.wait_for_selector("body[data-loaded=true]", timeout=15_000)
                    segments = page.locator(".segment")
                    seen = {
                        segments.nth(i).get_attribute("data-stage-address"): segments.nth(i).get_attribute("data-range")
                        for i in range(segments.count())
                    }
                    assert seen == ranges
                    for address, span in ranges.items():
                        row = page.locator(f'#stages tbody tr[data-stage-address="{address}"]')
                        assert row.count() == 1
                        assert row.locator("td.range").inner_text() == span
                        assert "ready" in row.inner_text()
                    # the bar is drawn to scale: widths in proportion to the layer counts
                    widths = {
                        segments.nth(i).get_attribute("data-stage-address"): segments.nth(i).bounding_box()["width"]
                        for i in range(segments.count())
                    }
                    counts = {a: int(r.split(":")[1]) - int(r.split(":")[0]) for a, r in ranges.items()}
                    total_w, total_n = sum(widths.values()), sum(counts.values())
                    for a in ranges:
                        assert abs(widths[a] / total_w - counts[a] / total_n) < 0.05, (widths, counts)
                    assert "plan v" in page.inner_text("#summary") and SPEC.layers == int(
                        page.inner_text("#axis span:last-child")
                    )
                    # the charts: tokens/s (the cluster's and each stage's), time per step, sessions, KV used
                    charts = page.locator("svg.chart")
                    assert charts.count() == 4
                    for i in range(4):
                        series = {p.get_attribute("data-series") for p in charts.nth(i).locator("path").all()}
                        expect = set(ranges) | ({"cluster"} if i == 0 else set())
                        assert series == expect, (charts.nth(i).get_attribute("id"), series)
                    cluster_path = '#chart-tokens path[data-series="cluster"]'
                    # live: a generation running now shows up as tokens/s on the stages and in the charts
                    done = threading.Event()

                    def generate() -> None:
                        with Client(coordinator=coordinator.address) as client:
                            while not done.is_set():
                                client.generate([17, 101, 5], max_new_tokens=64, stop_token_ids=[], stream=False)

                    worker = threading.Thread(target=generate, daemon=True)
                    worker.start()
                    try:
                        column = [h.inner_text() for h in page.locator("#stages thead th").all()].index("tokens/s")
                        page.wait_for_function(
                            f"""() => [...document.querySelectorAll('#stages tbody tr')].every(
                                   tr => parseFloat(tr.children[{column}].textContent) > 0)""",
                            timeout=20_000,
                        )
                        page.wait_for_function(
                            f"""() => parseFloat(document.querySelector('{cluster_path}').dataset.last) > 0""",
                            timeout=20_000,
                        )
                        page.wait_for_function(  # each stage's time per step is drawn
                            """() => [...document.querySelectorAll('#chart-step path')].every(
                                   p => parseFloat(p.dataset.last) > 0)""",
                            timeout=20_000,
                        )
                        drawn = page.locator(cluster_path).get_attribute("d")
                        page.wait_for_function(  # the next second's point: the chart moves
                            f"""(before) => document.querySelector('{cluster_path}').getAttribute('d') !== before""",
                            arg=drawn,
                            timeout=20_000,
                        )
                    finally:
                        done.set()
                        worker.join(30)
                    os.makedirs(ARTIFACTS, exist_ok=True)
                    shot = os.path.join(ARTIFACTS, "dashboard.png")
                    page.screenshot(path=shot, full_page=True)
                    assert os.path.getsize(shot) > 10_000
                finally:
                    browser.close()
