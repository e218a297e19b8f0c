"""Regenerates the committed protobuf/gRPC code: protos/layerline/v1/*.proto -> *_pb2.py, *_pb2_grpc.py, *.pyi.

.venv/bin/python scripts/gen_protos.py [--out DIR]   (DIR defaults to protos/; tests compare a fresh run)
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(out: str) -> list[str]:
    from grpc_tools import protoc

    protos = sorted(glob.glob(os.path.join(ROOT, "protos", "layerline", "v1", "*.proto")))
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    os.makedirs(os.path.join(out, "layerline", "v1"), exist_ok=True)
    args = [
        "protoc",
        f"-I{os.path.join(ROOT, 'protos')}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(glob.glob(os.path.join(out, "layerline", "v1", "*_pb2*.py*")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "protos"))
    for path in generate(ap.parse_args().out):
        print(os.path.relpath(path, ROOT), file=sys.stderr)


if __name__ == "__main__":
    main()
