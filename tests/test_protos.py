"""The committed generated protobuf/gRPC code is what `scripts/gen_protos.py` makes from the .proto files today,
and the Stage service it describes has the RPCs the servers and clients rely on."""

from __future__ import annotations

import glob
import os
import runpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "protos", "layerline", "v1")
GENERATED_PATTERNS = ("*_pb2.py", "*_pb2_grpc.py", "*.pyi")


def committed_files() -> dict[str, str]:
    paths = [p for pattern in GENERATED_PATTERNS for p in glob.glob(os.path.join(COMMITTED, pattern))]
    return {os.path.basename(p): p for p in paths}


def test_generated_code_is_fresh(tmp_path):
    generate = runpy.run_path(os.path.join(ROOT, "scripts", "gen_protos.py"))["generate"]
    out = generate(str(tmp_path))
    fresh = {os.path.basename(p): p for p in out}
    for p in out:  # everything it reports lies in the output folder
        assert os.path.dirname(p) == os.path.join(str(tmp_path), "layerline", "v1")
    committed = committed_files()
    assert sorted(fresh) == sorted(committed), "regenerate with scripts/gen_protos.py"
    protos = {os.path.basename(p).removesuffix(".proto") for p in glob.glob(os.path.join(COMMITTED, "*.proto"))}
    assert {name.split("_pb2")[0] for name in fresh} == protos
    stale = []
    for name, path in sorted(fresh.items()):
        with open(path, "rb") as f, open(committed[name], "rb") as g:
            if f.read() != g.read():
                stale.append(name)
    assert not stale, f"stale generated code {stale}: regenerate with scripts/gen_protos.py"


def test_stage_service_methods():
    from layerline.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2

    service = stage_pb2.DESCRIPTOR.services_by_name["Stage"]
    streaming = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert streaming == {
        "Info": (False, False),
        "OpenSession": (False, False),
        "CloseSession": (False, False),
        "Push": (True, True),
        "Subscribe": (False, True),
        "GetTokenizer": (False, False),
        "Halt": (False, False),
        "Drain": (False, False),
        "AttachPrefix": (False, False),
        "Probe": (False, False),
    }
    for name in streaming:
        assert callable(getattr(stage_pb2_grpc.StageServicer, name))
    assert callable(stage_pb2_grpc.add_StageServicer_to_server)
    assert service.methods_by_name["Push"].input_type.name == "Step"
    assert stage_pb2.DESCRIPTOR.dependencies[0].name == tensor_pb2.DESCRIPTOR.name == "layerline/v1/tensor.proto"


def test_coordinator_service_methods():
    from layerline.v1 import coordinator_pb2, coordinator_pb2_grpc

    service = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    unary = {"Register", "Heartbeat", "Leave", "GetRoute", "Status", "Plan", "GetModel"}
    assert {m.name for m in service.methods} == unary | {"FetchWeights"}
    assert not any(m.client_streaming for m in service.methods)
    assert {m.name for m in service.methods if m.server_streaming} == {"FetchWeights"}
    for m in service.methods:
        assert callable(getattr(coordinator_pb2_grpc.CoordinatorServicer, m.name))
