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


def test_the_client_sdk_and_the_cli_parser_load_no_torch():
    code = (
        "import sys, layerline.client, layerline.cli; layerline.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout  # the client's docstring's rule: a client host needs no torch


FOLDERS = {"layerline": "layerline", "stage_server": "layerline.stage_server", "coordinator": "layerline.coordinator"}
FOLDERS |= {"client": "layerline.client"}


def _imports() -> dict[str, set[str]]:
    """Each project module and the project modules it imports anywhere (inside functions too), except under
    `if TYPE_CHECKING:`."""
    import ast

    modules: dict[str, str] = {}
    for folder, package in FOLDERS.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))[:-3].replace(
                        os.sep, "."
                    )
                    name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                    modules[name] = os.path.join(dirpath, f)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(open(path).read())
        hidden = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body
            for n in ast.walk(child)
        }
        found = set()
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("layerline"):
                for alias in node.names:  # `from layerline.client import batch` names a module
                    found.add(
                        f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                    )
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("layerline")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    assert "layerline.client.aio" in graph and "layerline.stage_server.agent" in graph

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return False

    # a package's __init__ only re-exports its modules: the walk leaves packages out
    packages = set(FOLDERS.values())
    graph = {a: {b for b in bs if b not in packages} for a, bs in graph.items() if a not in packages}
    circles = sorted((a, b) for a in graph for b in graph[a] if reaches(b, a))
    assert circles == [], circles
    # the coordinator does not need the stage server's code
    assert not any(m.startswith("layerline.stage_server") for m in graph["layerline.coordinator.service"])
