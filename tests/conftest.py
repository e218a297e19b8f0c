"""Shared fixtures: tiny checkpoints built once per session, and a guard that fails any test after which a bare
`client` / `coordinator` / `stage_server` / `protos` module has been imported (code must import `layerline.*`)."""

from __future__ import annotations

import sys

import pytest

from tiny_models import TinySpec, save_hf

BARE_NAMES = ("client", "coordinator", "stage_server", "protos")


@pytest.fixture(autouse=True)
def no_bare_package_imports():
    yield
    bare = [name for name in BARE_NAMES if name in sys.modules]
    assert not bare, f"bare top-level modules were imported: {bare}; import them as layerline.<name>"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(spec) -> (folder, transformers model); each spec is written once per session."""
    made: dict[str, tuple[str, object]] = {}

    def make(spec: TinySpec):
        key = repr(spec)
        if key not in made:
            folder = str(tmp_path_factory.mktemp(spec.name))
            made[key] = (folder, save_hf(spec, folder))
        return made[key]

    return make


@pytest.fixture(scope="module")
def stage_cluster():
    """stage_cluster(model_path, ranges, *extra_stage_args) -> route: stage servers in subprocesses on 127.0.0.1
    port 0, one torch thread each, shared within a test module and always stopped at its end."""
    from layerline.local_cluster import LocalCluster

    clusters: dict[tuple, LocalCluster] = {}

    def make(model: str, ranges, *extra: str) -> list[str]:
        key = (model, tuple(ranges), extra)
        if key not in clusters:
            c = LocalCluster(model, ranges, threads=1, extra_args=extra, startup_timeout=120)
            c.start()
            clusters[key] = c
        return list(clusters[key].route)

    yield make
    for c in clusters.values():
        c.stop()


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from layerline.model_source import resolve_model

    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_path):
    """transformers' own model from the same GGUF file (the oracle), loaded once per test session."""
    import os

    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path)
    ).eval()


@pytest.fixture
def netbed():
    """netbed(links) -> NetBed: test hosts with real links (tests/netbed.py), torn down after the test."""
    from netbed import NetBed

    why = NetBed.unavailable()
    if why:
        pytest.skip(f"no test hosts here: {why}")
    beds = []

    def make(links):
        bed = NetBed(links)
        beds.append(bed)
        bed.start()
        return bed

    yield make
    for bed in beds:
        bed.close()
