"""The package layout: one `layerline` namespace mapped from the top-level folders, nothing imported bare."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = r"""
import importlib, pkgutil, sys
import layerline
names = ["layerline"]
for sub in ("layerline", "layerline.stage_server", "layerline.coordinator", "layerline.client", "layerline.v1"):
    mod = importlib.import_module(sub)
    names += [m.name for m in pkgutil.walk_packages(mod.__path__, sub + ".")]
for n in names:
    importlib.import_module(n)
bare = [n for n in ("client", "coordinator", "stage_server", "protos") if n in sys.modules]
print("BARE", bare)
print("TRANSFORMERS", "transformers" in sys.modules)
import layerline.client, layerline.coordinator, layerline.stage_server, layerline.v1
print("FILES", layerline.client.__file__, layerline.coordinator.__file__, layerline.stage_server.__file__, layerline.v1.__file__)
"""


def test_subpackages_map_to_top_level_folders_and_nothing_is_imported_bare():
    # run from the repository root, where a bare `import client` would find the folder as a namespace package
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["BARE"] == "[]"
    assert lines["TRANSFORMERS"] == "False", "transformers is a test dependency only"
    files = lines["FILES"].split()
    assert files[0] == os.path.join(ROOT, "client", "__init__.py")
    assert files[1] == os.path.join(ROOT, "coordinator", "__init__.py")
    assert files[2] == os.path.join(ROOT, "stage_server", "__init__.py")
    assert files[3] == os.path.join(ROOT, "protos", "layerline", "v1", "__init__.py")


def test_no_bare_imports_in_source():
    bad = []
    for folder in ("layerline", "stage_server", "coordinator", "client", "bench", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py") or f.endswith("_pb2.py") or f.endswith("_pb2_grpc.py"):
                    continue
                path = os.path.join(dirpath, f)
                for i, line in enumerate(open(path, encoding="utf-8"), 1):
                    s = line.strip()
                    for name in ("client", "coordinator", "stage_server", "protos"):
                        if (
                            s.startswith(f"import {name}")
                            or s.startswith(f"from {name} ")
                            or s.startswith(f"from {name}.")
                        ):
                            bad.append(f"{path}:{i}: {s}")
    assert not bad, "\n".join(bad)
