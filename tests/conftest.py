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
