"""Fuzzing every RPC of the stage and the coordinator (hypothesis): thousands of random and malformed messages -
fields drawn from each message's protobuf descriptor (out-of-range numbers, NaN, wrong enums, garbage tensors,
real and made-up session ids), plus undecodable bytes - while a good session generates alongside. Every call is
answered with a status within its deadline (no hang), no server process dies, and the good session gets
transformers' tokens throughout."""

from __future__ import annotations

import math
import struct
import threading
import time

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerline.client import Client
from layerline.local_cluster import LocalCluster, LocalCoordinator
from layerline.v1 import coordinator_pb2, coordinator_pb2_grpc, stage_pb2, stage_pb2_grpc, tensor_pb2
from tiny_models import VOCAB, TinySpec, hf_greedy

SPEC = TinySpec("llama", layers=2, hidden=64, kv_heads=2)
PROMPT = [17, 101, 5, 250, 33, 42, 7, 199]
FUZZ_KEY = "fuzz-client-key-0123456789"  # the real sessions' client key: the fuzzer sometimes sends it
EXAMPLES = 300  # per RPC
DEADLINE = 10.0  # seconds any fuzzed call may take

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same messages every run (CI)
    database=None,
    suppress_health_check=list(HealthCheck),
)

INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
}


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Mostly small numbers (the interesting edge cases: 0, -1, just past a limit), sometimes anything."""
    small = st.integers(max(lo, -5), min(hi, 70000))
    return st.one_of(small, small, st.integers(lo, hi), st.sampled_from([v for v in (lo, hi, 0, 1) if lo <= v <= hi]))


class Pools:
    """Values worth aiming at: live session ids, addresses on this machine (nothing outside it is ever dialled)."""

    def __init__(self) -> None:
        self.session_ids: list[str] = ["", "x", "0" * 32]
        self.addresses: list[str] = ["", "127.0.0.1:1", "127.0.0.1:0", "[::1]:2", "not an address"]


POOLS = Pools()


def plausible_tensor() -> st.SearchStrategy[tensor_pb2.Tensor]:
    """Well-formed tensors of the shapes steps carry, with random contents (token ids in and out of range,
    positions with gaps, hidden states with NaN)."""

    @st.composite
    def build(draw) -> tensor_pb2.Tensor:
        b, t = draw(st.integers(1, 3)), draw(st.integers(1, 6))
        kind = draw(st.sampled_from(["int64", "hidden"]))
        if kind == "int64":
            vals = draw(st.lists(st.integers(-3, VOCAB + 3), min_size=b * t, max_size=b * t))
            return tensor_pb2.Tensor(dtype=tensor_pb2.INT64, shape=[b, t], data=struct.pack(f"<{b * t}q", *vals))
        h = draw(st.sampled_from([SPEC.hidden, SPEC.hidden + 1]))
        vals = draw(
            st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=b * t * h, max_size=b * t * h)
        )
        return tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[b, t, h], data=struct.pack(f"<{b * t * h}f", *vals))

    return build()


def messages(cls, depth: int = 0) -> st.SearchStrategy:
    """Random instances of the protobuf message class `cls`, field by field from its descriptor."""
    if cls is tensor_pb2.Tensor:
        return st.one_of(plausible_tensor(), _generic(cls, depth))
    return _generic(cls, depth)


def _field_values(f, depth: int) -> st.SearchStrategy:
    name = f.name
    if f.type == FD.TYPE_MESSAGE:
        if depth >= 3:
            return st.none()
        return messages(f.message_type._concrete_class, depth + 1)
    if f.type == FD.TYPE_STRING:
        if name == "client_key":
            return st.one_of(st.sampled_from([FUZZ_KEY, "", "short"]), st.text(max_size=300))
        if "session" in name or name == "stage_id":
            return st.one_of(st.sampled_from(POOLS.session_ids), st.text(max_size=40))
        if "address" in name or name == "exclude":
            return st.sampled_from(POOLS.addresses)
        return st.text(max_size=60)
    if f.type == FD.TYPE_BYTES:
        return st.binary(max_size=512)
    if f.type == FD.TYPE_BOOL:
        return st.booleans()
    if f.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.one_of(
            st.sampled_from([0.0, -1.0, 1.0, math.nan, math.inf, -math.inf, 1e30]),
            st.floats(width=32 if f.type == FD.TYPE_FLOAT else 64),
        )
    if f.type == FD.TYPE_ENUM:
        return st.integers(-1, 8)
    lo, hi = INT_RANGES[f.type]
    return ints(lo, hi)


def _repeated(f) -> bool:
    return f.is_repeated if hasattr(f, "is_repeated") else f.label == FD.LABEL_REPEATED


def _generic(cls, depth: int) -> st.SearchStrategy:
    @st.composite
    def build(draw):
        msg = cls()
        for f in cls.DESCRIPTOR.fields:
            if not draw(st.booleans()):
                continue  # left unset
            values = _field_values(f, depth)
            if _repeated(f):
                items = [v for v in draw(st.lists(values, max_size=4)) if v is not None]
                field = getattr(msg, f.name)
                if f.type == FD.TYPE_MESSAGE:
                    for v in items:
                        field.add().CopyFrom(v)
                else:
                    field.extend(items)
                continue
            v = draw(values)
            if v is None:
                continue
            if f.type == FD.TYPE_MESSAGE:
                getattr(msg, f.name).CopyFrom(v)
            else:
                setattr(msg, f.name, v)
        return msg

    return build()


def expect_status(call) -> None:
    """A fuzzed call either succeeds or fails with a status - never a hang past DEADLINE."""
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {DEADLINE} s"
        assert e.code() != grpc.StatusCode.UNAVAILABLE, f"the server went away: {e.details()}"


@pytest.fixture(scope="module")
def fuzz_cluster(tiny_checkpoint):
    folder, ref = tiny_checkpoint(SPEC)
    stages = LocalCluster(folder, [(0, 1), (1, 2)], threads=1, extra_args=["--kv-cache-bytes", "64MiB"])
    with stages, LocalCoordinator(folder) as coordinator:
        yield folder, ref, stages, coordinator


@pytest.fixture(scope="module")
def good_session(fuzz_cluster):
    """A session generating again and again while the fuzzing runs; yields the list of outcomes so far."""
    _, ref, stages, _ = fuzz_cluster
    expected = hf_greedy(ref, PROMPT, 8)
    outcomes: list[bool] = []
    stop = threading.Event()

    def run() -> None:
        with Client(stages.route) as client:
            while not stop.is_set():
                got = client.generate(PROMPT, max_new_tokens=8, stop_token_ids=[], stream=False).token_ids
                outcomes.append(got == expected)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield outcomes
    stop.set()
    t.join(30)
    assert not t.is_alive()


@pytest.fixture(scope="module")
def stubs(fuzz_cluster):
    _, _, stages, coordinator = fuzz_cluster
    channels = [grpc.insecure_channel(a) for a in [*stages.route, coordinator.address]]
    first = stage_pb2_grpc.StageStub(channels[0])
    last = stage_pb2_grpc.StageStub(channels[1])
    # real sessions to aim at, on both stages (the first stage's sending on to the last stage's)
    for _ in range(2):
        tail = last.OpenSession(stage_pb2.OpenSessionRequest(max_length=16, client_key=FUZZ_KEY)).session_id
        head = first.OpenSession(
            stage_pb2.OpenSessionRequest(
                max_length=16, next_address=stages.route[1], next_session_id=tail, client_key=FUZZ_KEY
            )
        ).session_id
        POOLS.session_ids += [tail, head]
    POOLS.addresses.extend(stages.route)
    yield [first, last], coordinator_pb2_grpc.CoordinatorStub(channels[2]), channels
    for ch in channels:
        ch.close()


STAGE_UNARY = [
    ("Info", stage_pb2.InfoRequest),
    ("OpenSession", stage_pb2.OpenSessionRequest),
    ("CloseSession", stage_pb2.CloseSessionRequest),
    ("GetTokenizer", stage_pb2.TokenizerRequest),
    ("Halt", stage_pb2.HaltRequest),
]
COORDINATOR_UNARY = [
    ("Register", coordinator_pb2.RegisterRequest),
    ("Heartbeat", coordinator_pb2.HeartbeatRequest),
    ("Leave", coordinator_pb2.LeaveRequest),
    ("GetRoute", coordinator_pb2.RouteRequest),
    ("Status", coordinator_pb2.StatusRequest),
    ("Plan", coordinator_pb2.PlanRequest),
    ("GetModel", coordinator_pb2.ModelRequest),
]


@pytest.mark.parametrize("rpc, cls", STAGE_UNARY, ids=[r for r, _ in STAGE_UNARY])
def test_stage_unary_rpcs_answer_every_message(stubs, good_session, rpc, cls):
    stage_stubs, _, _ = stubs

    @FUZZ
    @given(msg=messages(cls), which=st.integers(0, 1))
    def run(msg, which):
        expect_status(lambda: getattr(stage_stubs[which], rpc)(msg, timeout=DEADLINE))

    run()


def test_stage_push_streams_answer_every_step(stubs, good_session):
    stage_stubs, _, _ = stubs

    @FUZZ
    @given(steps=st.lists(messages(stage_pb2.Step), min_size=1, max_size=4), which=st.integers(0, 1))
    def run(steps, which):
        def call():
            replies = stage_stubs[which].Push(iter(steps), timeout=DEADLINE)
            for _ in replies:  # the stream ends when the server has answered what came in
                pass

        expect_status(call)

    run()


def test_stage_subscribe_answers_every_request(stubs, good_session):
    stage_stubs, _, _ = stubs

    @FUZZ
    @given(msg=messages(stage_pb2.SubscribeRequest), which=st.integers(0, 1))
    def run(msg, which):
        def call():
            # a live session's stream stays open for results: reading it for a moment (0.2 s) is enough
            for _ in stage_stubs[which].Subscribe(msg, timeout=0.2):
                pass

        try:
            call()
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.UNAVAILABLE, e.details()

    run()


@pytest.mark.parametrize("rpc, cls", COORDINATOR_UNARY, ids=[r for r, _ in COORDINATOR_UNARY])
def test_coordinator_rpcs_answer_every_message(stubs, good_session, rpc, cls):
    _, coordinator, _ = stubs

    @FUZZ
    @given(msg=messages(cls))
    def run(msg):
        expect_status(lambda: getattr(coordinator, rpc)(msg, timeout=DEADLINE))

    run()


def test_coordinator_fetch_weights_answers_every_request(stubs, good_session):
    _, coordinator, _ = stubs

    @FUZZ
    @given(msg=messages(coordinator_pb2.FetchRequest))
    def run(msg):
        def call():
            for _ in coordinator.FetchWeights(msg, timeout=DEADLINE):
                pass

        expect_status(call)

    run()


def test_undecodable_bytes_get_a_status(stubs, good_session, fuzz_cluster):
    _, _, channels = stubs
    methods = [f"/layerline.v1.Stage/{r}" for r, _ in STAGE_UNARY] + [
        f"/layerline.v1.Coordinator/{r}" for r, _ in COORDINATOR_UNARY
    ]

    @FUZZ
    @given(data=st.binary(min_size=1, max_size=256), method=st.sampled_from(methods), which=st.integers(0, 1))
    def run(data, method, which):
        channel = channels[2] if "Coordinator" in method else channels[which]
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        expect_status(lambda: call(data, timeout=DEADLINE))

    run()


def test_after_the_fuzzing_everyone_still_serves(stubs, good_session, fuzz_cluster):
    """Runs last in this module: the servers are alive and the good session never got a wrong token."""
    _, _, stages, coordinator = fuzz_cluster
    stage_stubs, coordinator_stub, _ = stubs
    time.sleep(0.5)
    assert all(p.poll() is None for p in stages.processes)
    assert coordinator.process is not None and coordinator.process.poll() is None
    for stub in stage_stubs:
        stub.Info(stage_pb2.InfoRequest(), timeout=DEADLINE)
    coordinator_stub.Status(coordinator_pb2.StatusRequest(), timeout=DEADLINE)
    assert len(good_session) >= 3 and all(good_session), good_session


def test_drain_answers_every_message_and_a_drained_stage_exits_cleanly(tiny_checkpoint):
    """Drain takes its stage out of service, so it is fuzzed on a stage of its own: a session held open keeps the
    stage draining (for up to an hour) while random DrainRequests come in; every one is answered (a reply, or
    INVALID_ARGUMENT for a wait that is not in (0, 3600]), no new session is let in, and once the session is closed
    the stage exits 0."""
    folder, _ = tiny_checkpoint(SPEC)
    with LocalCluster(folder, [(0, SPEC.layers)], threads=1) as one, grpc.insecure_channel(one.route[0]) as ch:
        stub = stage_pb2_grpc.StageStub(ch)
        held = stub.OpenSession(stage_pb2.OpenSessionRequest(max_length=16, client_key=FUZZ_KEY), timeout=DEADLINE)
        for bad in (math.nan, -1.0, math.inf, 3601.0):
            with pytest.raises(grpc.RpcError) as e:
                stub.Drain(stage_pb2.DrainRequest(wait_seconds=bad), timeout=DEADLINE)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        first = stub.Drain(stage_pb2.DrainRequest(wait_seconds=3600), timeout=DEADLINE)
        assert first.open_sessions == 1 and first.stage == f"layers 0:{SPEC.layers}"
        outcomes: set[str] = set()

        @FUZZ
        @given(msg=messages(stage_pb2.DrainRequest))
        def run(msg):
            try:
                reply = stub.Drain(msg, timeout=DEADLINE)
                assert reply.stage == first.stage
                outcomes.add("accepted")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
                outcomes.add("invalid")

        run()
        assert outcomes == {"accepted", "invalid"}
        with pytest.raises(grpc.RpcError) as e:
            stub.OpenSession(stage_pb2.OpenSessionRequest(max_length=16, client_key=FUZZ_KEY), timeout=DEADLINE)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
        close = stage_pb2.CloseSessionRequest(session_id=held.session_id, client_key=FUZZ_KEY)
        assert stub.CloseSession(close, timeout=DEADLINE).closed
        assert one.processes[0].wait(timeout=30) == 0
