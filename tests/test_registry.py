"""The coordinator's registry (coordinator/registry.py) with a fake clock: registration and model checks, plans on
join and leave, heartbeat expiry, adoption of the running chain after a coordinator restart, and routes that only
use ready stages."""

from __future__ import annotations

import pytest

from layerline.config import ModelConfig
from layerline.coordinator.placement import Link, ModelShape, StageCapacity
from layerline.coordinator.registry import Registry, model_shape
from layerline.errors import AbortedError, BadInputError, FailedPreconditionError, NotFoundError

MODEL = ModelShape(num_layers=12, layer_params=1000, embed_params=2000, head_params=2000)
GB = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def cap(per_layer: float = 1e-3, memory: int = GB, head: float = 0.0) -> StageCapacity:
    return StageCapacity("", decode_s_per_layer=per_layer, head_decode_s=head, memory_bytes=memory)


def registry(clock: Clock | None = None, settle_s: float = 0.0, expected: int = 0) -> Registry:
    """Plans for pipelined sessions (the throughput objective): the chain mechanics below need chains."""
    return Registry(
        MODEL,
        "fp",
        heartbeat_s=1.0,
        miss_limit=3,
        settle_s=settle_s,
        expected_stages=expected,
        clock=clock or Clock(),
        objective="throughput",
    )


def load(reg: Registry) -> None:
    """Every stage loads its assignment and says so."""
    for s in list(reg.stages.values()):
        reg.heartbeat(s.id, s.assignment, ready=s.assignment != (0, 0))


def test_stages_are_placed_by_capacity_and_the_route_waits_until_they_are_ready():
    reg = registry()
    with pytest.raises(FailedPreconditionError, match="no stages have registered"):
        reg.route()
    fast = reg.register("10.0.0.1:7000", "fp", cap(1e-3))
    slow = reg.register("10.0.0.2:7000", "fp", cap(2e-3))
    assert reg.plan_version >= 1
    assert {fast.assignment, slow.assignment} == {(0, 8), (8, 12)}
    assert fast.assignment[1] - fast.assignment[0] == 8  # twice as fast: twice the layers
    with pytest.raises(AbortedError, match="still loading"):
        reg.route()
    load(reg)
    route = reg.route()
    assert route.boundaries[0] == 0 and route.boundaries[-1] == 12 and len(route.addresses) == 2
    assert route.plan_version == reg.plan_version


def test_model_mismatch_bad_reports_and_unknown_heartbeats_are_refused():
    reg = registry()
    with pytest.raises(FailedPreconditionError, match="another model"):
        reg.register("h:1", "other", cap())
    with pytest.raises(BadInputError, match="host:port"):
        reg.register("nohost", "fp", cap())
    with pytest.raises(BadInputError, match="decode_s_per_layer"):
        reg.register("h:1", "fp", cap(per_layer=float("nan")))
    with pytest.raises(BadInputError, match="serving range"):
        reg.register("h:1", "fp", cap(), serving=(4, 40))
    with pytest.raises(NotFoundError, match="register"):
        reg.heartbeat("nope", (0, 0), False)


def test_a_stage_that_misses_heartbeats_is_dropped_and_the_plan_follows():
    clock = Clock()
    reg = registry(clock)
    a = reg.register("h:1", "fp", cap(1e-3))
    b = reg.register("h:2", "fp", cap(1e-3))
    load(reg)
    version = reg.plan_version
    assert len(reg.route().addresses) == 2
    for _ in range(5):  # a keeps beating, b has died
        clock.now += 1.0
        reg.heartbeat(a.id, a.serving, True)
    assert b.id not in reg.stages and reg.plan_version == version + 1
    assert a.assignment == (0, 12)
    with pytest.raises(AbortedError):  # a still serves 0:6 until it has loaded 0:12: ask again in a moment
        reg.route()
    load(reg)
    assert reg.route().addresses == ["h:1"]


def test_a_joining_stage_replans_only_for_a_real_gain_and_a_restarted_stage_replaces_itself():
    reg = registry()
    reg.register("h:1", "fp", cap(1e-3))
    reg.register("h:2", "fp", cap(1e-3))
    load(reg)
    version = reg.plan_version
    crawler = reg.register("h:3", "fp", cap(1.0))  # far too slow to help: a replica of a span, not in the chain
    assert reg.plan_version == version and crawler.assigned_version == version
    assert crawler.replica and crawler.assignment in {(0, 6), (6, 12)}
    assert crawler.id not in {a.name for a in reg.plan.assignments}
    reg.register("h:4", "fp", cap(1e-3))  # a third equal stage: bottleneck 6 -> 4 layers
    assert reg.plan_version == version + 1
    chain = {a.name for a in reg.plan.assignments}
    assert sorted(s.assignment[1] - s.assignment[0] for s in reg.stages.values() if s.id in chain) == [4, 4, 4]
    assert crawler.id not in chain and crawler.replica and crawler.assignment[1] - crawler.assignment[0] == 4
    # the same address registering again is the same stage restarted: one entry, not two
    before = len(reg.stages)
    reg.register("h:4", "fp", cap(1e-3))
    assert len(reg.stages) == before


def test_after_a_coordinator_restart_the_running_chain_is_adopted_as_it_is():
    clock = Clock()
    reg = registry(clock)
    # stages that serve an uneven but complete chain (what an earlier coordinator planned) register again
    reg.register("h:1", "fp", cap(1e-3), serving=(0, 3))
    assert reg.plan is None  # not a whole chain yet: wait for the rest of it
    clock.now += 1.5
    reg.register("h:2", "fp", cap(1e-3), serving=(3, 12))
    assert reg.plan is not None and reg.plan.ranges()[0][1:] == (0, 3)
    route = reg.route()
    assert route.boundaries == [0, 3, 12]  # nothing moved: running sessions undisturbed
    # a lone survivor of a chain whose other stage never comes back is planned afresh after the wait
    clock2 = Clock()
    lone = registry(clock2)
    entry = lone.register("h:1", "fp", cap(1e-3), serving=(0, 3))
    assert lone.plan is None
    for _ in range(2):
        clock2.now += 1.75
        lone.heartbeat(entry.id, (0, 3), True)
    assert lone.plan is not None and entry.assignment == (0, 12)


def test_the_first_plan_waits_for_stages_starting_together():
    clock = Clock()
    reg = registry(clock, settle_s=2.0)
    a = reg.register("h:1", "fp", cap())
    assert reg.plan is None and a.assignment == (0, 0)
    clock.now += 1.0
    reg.register("h:2", "fp", cap())
    assert reg.plan is None
    clock.now += 1.5
    reg.expire()
    assert reg.plan is not None and len(reg.plan.assignments) == 2  # both placed at once, no churn
    counted = registry(Clock(), settle_s=60.0, expected=2)
    counted.register("h:1", "fp", cap())
    assert counted.plan is None
    counted.register("h:2", "fp", cap())
    assert counted.plan is not None and len(counted.plan.assignments) == 2


def test_not_enough_memory_is_reported_and_the_route_says_why():
    reg = registry()
    reg.register("h:1", "fp", cap(memory=1000))
    assert reg.plan is None and "does not fit" in reg.problem
    with pytest.raises(FailedPreconditionError, match="does not fit"):
        reg.route()


def test_model_shape_counts_the_parameters_of_a_real_config():
    config = ModelConfig.from_hf_dict(
        {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
        }
    )
    shape = model_shape(config)
    # SmolLM2-135M: 30 layers of q,o 576x576, k,v 192x576, three 1536x576 MLP matrices and two norms
    assert shape.layer_params == 2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576 + 2 * 576
    assert shape.embed_params == 49152 * 576 and shape.tied
    total = shape.num_layers * shape.layer_params + shape.extra_params(True, True)
    assert abs(total - 134_515_008) < 1000  # the published parameter count


def two_layer_registry(clock: Clock) -> Registry:
    """A 2-layer model: two stages make the whole chain, a third can only be a replica."""
    return Registry(
        ModelShape(num_layers=2, layer_params=1000, embed_params=2000, head_params=2000),
        "fp",
        heartbeat_s=1.0,
        miss_limit=3,
        settle_s=0.0,
        clock=clock,
        objective="throughput",
    )


def test_spare_stages_become_replicas_and_take_over_a_dead_stage_without_a_reload():
    clock = Clock()
    reg = two_layer_registry(clock)
    a = reg.register("h:1", "fp", cap(1e-3))
    b = reg.register("h:2", "fp", cap(1.5e-3))  # the slower span: the one worth a spare
    version = reg.plan_version
    spare = reg.register("h:3", "fp", cap(1.5e-3))  # 2 layers on 2 stages: a third cannot shorten the chain
    assert reg.plan_version == version and spare.replica and spare.assignment == b.assignment
    assert not a.replica and not b.replica
    load(reg)
    # a new session goes to the chain whose stages have the fewest sessions: the replica takes the next one
    assert reg.route().stage_ids[0] == a.id and len(reg.route().stage_ids) == 2
    reg.heartbeat(b.id, b.serving, True, open_sessions=3)
    assert reg.route().stage_ids == [a.id, spare.id]
    reg.heartbeat(spare.id, spare.serving, True, open_sessions=5)
    assert reg.route().stage_ids == [a.id, b.id]
    reg.heartbeat(spare.id, spare.serving, True, open_sessions=0)
    # b dies: its replica steps in, nothing is reloaded, the route goes on at once
    for _ in range(4):
        clock.now += 1.0
        for s in (a, spare):
            reg.heartbeat(s.id, s.serving, True)
    assert b.id not in reg.stages and reg.plan_version > version
    assert [x[0] for x in reg.plan.ranges()] == [a.id, spare.id] and spare.assignment == spare.serving
    assert not spare.replica and reg.route().stage_ids == [a.id, spare.id]
    # a stage whose memory holds no span stays on standby
    tiny = reg.register("h:4", "fp", cap(1e-3, memory=1000))
    assert tiny.assignment == (0, 0) and not tiny.replica


def test_without_a_ready_replica_a_dead_stage_means_a_new_plan():
    clock = Clock()
    reg = registry(clock)
    a = reg.register("h:1", "fp", cap(1e-3))
    b = reg.register("h:2", "fp", cap(1e-3))
    crawler = reg.register("h:3", "fp", cap(1.0))  # a replica, but still loading when b dies
    assert crawler.replica
    for _ in range(4):
        clock.now += 1.0
        reg.heartbeat(a.id, a.serving, True)
        reg.heartbeat(crawler.id, (0, 0), False)
    assert b.id not in reg.stages
    assert a.assignment == (0, 12) and not a.replica  # the crawler would slow the chain down: a takes all
    assert crawler.replica and crawler.assignment == (0, 12)


def test_a_route_can_avoid_stages_a_client_found_dead_and_says_which_layers_are_missing():
    shape = ModelShape(num_layers=2, layer_params=1000, embed_params=2000, head_params=2000)
    reg = Registry(shape, "fp", heartbeat_s=1.0, miss_limit=3, settle_s=0.0, clock=Clock(), objective="throughput")
    a = reg.register("h:1", "fp", cap(1e-3))
    b = reg.register("h:2", "fp", cap(1.5e-3))
    spare = reg.register("h:3", "fp", cap(1.5e-3))  # 2 layers on 2 stages: the third is a replica
    load(reg)
    assert len(reg.route().addresses) == 2 and spare.replica
    twin = next(s for s in (a, b) if s.serving == spare.serving)
    # the client saw the twin die before its heartbeats stopped: the replica stands in at once
    other = reg.route(exclude={twin.address})
    assert twin.address not in other.addresses and spare.address in other.addresses
    # without a stand-in for a span, the refusal names the layers nobody else serves
    lo, hi = next(s for s in (a, b) if s is not twin).serving
    with pytest.raises(FailedPreconditionError, match=rf"no ready stage serves layers {lo}:{hi} \(avoiding "):
        reg.route(exclude={s.address for s in (a, b) if s is not twin})


def test_a_stage_that_leaves_is_dropped_at_once_and_its_replica_stands_in():
    reg = two_layer_registry(Clock())
    a = reg.register("h:1", "fp", cap(1e-3))
    b = reg.register("h:2", "fp", cap(1.5e-3))
    spare = reg.register("h:3", "fp", cap(1.5e-3))
    load(reg)
    assert spare.replica and reg.route().stage_ids == [a.id, b.id]
    assert reg.leave(b.id)  # no heartbeat missed: it says it goes
    assert b.id not in reg.stages and not spare.replica
    assert reg.route().stage_ids == [a.id, spare.id]
    assert not reg.leave(b.id) and not reg.leave("never-registered")
    assert reg.leave(spare.id)  # no replica left for its span: a new plan over what remains
    assert list(reg.stages) == [a.id] and a.assignment == (0, 2)


def test_capacity_is_refined_under_load_and_the_plan_follows():
    clock = Clock()
    reg = registry(clock)
    reg.refine_s = 10.0
    a = reg.register("h:1", "fp", cap(1e-3))
    b = reg.register("h:2", "fp", cap(1e-3))
    load(reg)
    assert {a.assignment, b.assignment} == {(0, 6), (6, 12)}
    counters = {a.id: [0, 0.0], b.id: [0, 0.0]}

    def tick(steps: dict, per_step: dict) -> None:
        """A second passes; each stage heartbeats its decode counters after `steps` more steps."""
        clock.now += 1.0
        for e in (a, b):
            c = counters[e.id]
            c[0] += steps.get(e.id, 0)
            c[1] += steps.get(e.id, 0) * per_step.get(e.id, 0.0)
            reg.heartbeat(e.id, e.serving, True, decode_steps=c[0], decode_seconds=c[1])

    predicted = 6 * 1e-3  # six layers at 1 ms each (no head or fixed cost in cap())
    tick({}, {})  # the counters as they start
    tick({a.id: 20, b.id: 20}, {a.id: predicted, b.id: 2 * predicted})
    assert a.load_factor == b.load_factor == 1.0  # too few steps to tell
    version = reg.plan_version
    for _ in range(10):  # b runs twice as slow as it measured (another job on its box), a as measured
        tick({a.id: 40, b.id: 40}, {a.id: predicted, b.id: 2 * predicted})
    assert a.load_factor == pytest.approx(1.0) and b.load_factor == pytest.approx(2.0)
    assert b.capacity.decode_s_per_layer == pytest.approx(2e-3) and b.measured.decode_s_per_layer == 1e-3
    # the plan follows (once: re-plans wait refine_s): the slower stage gets a third of the layers
    assert reg.plan_version == version + 1
    assert (a.assignment[1] - a.assignment[0], b.assignment[1] - b.assignment[0]) == (8, 4)
    assert reg.bottleneck() == pytest.approx(8e-3)
    clock.now += 1.0
    for e in (a, b):  # both load their new layers
        reg.heartbeat(e.id, e.assignment, True, decode_steps=counters[e.id][0], decode_seconds=counters[e.id][1])
    # on its new layers b is observed afresh; as predicted now: nothing moves; a observed faster than it measured
    # (a lightly loaded stage) is not counted on: its factor stays 1
    version = reg.plan_version
    for _ in range(12):
        tick({a.id: 40, b.id: 40}, {a.id: 5e-3, b.id: 8e-3})
    assert reg.plan_version == version and a.load_factor == pytest.approx(1.0)
    assert b.load_factor == pytest.approx(2.0)
    with pytest.raises(BadInputError):
        reg.heartbeat(a.id, a.serving, True, decode_steps=-1)
    with pytest.raises(BadInputError):
        reg.heartbeat(a.id, a.serving, True, decode_steps=50, decode_seconds=float("nan"))


def test_latency_objective_serves_a_model_that_fits_one_stage_from_one_and_keeps_the_others_as_replicas():
    reg = Registry(MODEL, "fp", heartbeat_s=1.0, settle_s=0.0, clock=Clock())  # the default objective
    a = reg.register("h:1", "fp", cap(1e-3))
    b = reg.register("h:2", "fp", cap(1e-3))
    assert [x.name for x in reg.plan.assignments] == [a.id] and a.assignment == (0, 12)
    assert b.replica and b.assignment == (0, 12)  # a second chain for sessions, and failover
    assert reg.peers(a.id) == ["h:2"] and reg.peers(b.id) == ["h:1"]
    current = reg.current()
    assert current is not None and current.ranges() == [(a.id, 0, 12)]
    assert reg.score() == pytest.approx(12e-3)
    labels = [alt.label for alt in reg.dry_run().alternatives]
    assert labels == ["most tokens/s of pipelined sessions = even split over all 2 stages"]
    with pytest.raises(ValueError, match="objective"):
        Registry(MODEL, "fp", objective="fastest")


def test_links_enter_the_plan_by_the_next_refinement_and_pick_the_chain_order():
    """Memory forces three stages; the stages' link reports show one slow link: the next refinement orders the
    chain around it (and not before refine_s has passed since the last)."""
    clock = Clock()
    small = 4 * 1000 * 5 + 4 * 2000  # 5 layers with the embedding or the head, never the whole model
    reg = Registry(MODEL, "fp", heartbeat_s=1.0, settle_s=0.0, clock=clock, expected_stages=3, refine_s=10.0)
    stages = [reg.register(f"h:{i}", "fp", cap(1e-3, memory=small)) for i in (1, 2, 3)]
    load(reg)
    assert len(reg.plan.assignments) == 3
    version = reg.plan_version
    order = [x.name for x in reg.plan.assignments]
    address = {s.id: s.address for s in stages}
    # the first stage's link to the second is 20x slower than every other
    slow = (address[order[0]], address[order[1]])
    for s in stages:
        links = {p: Link(rtt_s=40e-3 if (s.address, p) == slow else 2e-3, bytes_per_s=12.5e6) for p in reg.peers(s.id)}
        reg.heartbeat(s.id, s.serving, True, links=links)
    assert reg.plan_version == version + 1  # new links are a refinement (the first one may come at once)
    new = [address[x.name] for x in reg.plan.assignments]
    hops = list(zip(new, new[1:] + new[:1], strict=True))
    assert slow not in hops
    assert reg.network().links[(order[0], order[1])].rtt_s == 40e-3
    # figures that move again wait for refine_s
    clock.now += 1.0
    for s in stages:
        reg.heartbeat(s.id, s.assignment, True, links={p: Link(2e-3, 12.5e6) for p in reg.peers(s.id)})
    assert reg.plan_version == version + 1
    with pytest.raises(BadInputError, match="link to h:2"):
        reg.heartbeat(stages[0].id, stages[0].serving, True, links={"h:2": Link(float("nan"), 0.0)})


def test_measured_pace_comes_from_the_first_stage_by_windows():
    reg = registry()
    a = reg.register("h:1", "fp", cap(1e-3))
    b = reg.register("h:2", "fp", cap(2e-3))
    load(reg)
    first = reg.plan.assignments[0].name
    other = b.id if first == a.id else a.id
    assert reg.measured() == (0.0, 0.0)
    serving = reg.stages[first].serving
    reg.heartbeat(first, serving, True, pace=(4, 0.1, 512, 0.5))  # 4 rounds: fewer than a window needs
    assert reg.measured() == (0.0, 512 / 0.5)
    reg.heartbeat(first, serving, True, pace=(20, 0.5, 512, 0.5))
    assert reg.measured() == (pytest.approx(20 / 0.5), 512 / 0.5)
    reg.heartbeat(first, serving, True, pace=(30, 1.0, 1512, 2.5))  # the last window's rates
    assert reg.measured() == (pytest.approx(10 / 0.5), pytest.approx(1000 / 2.0))
    reg.heartbeat(other, reg.stages[other].serving, True, pace=(99, 0.1, 0, 0.0))  # not the first: not shown
    assert reg.measured()[0] == pytest.approx(20.0)
    with pytest.raises(BadInputError, match="pace"):
        reg.heartbeat(first, serving, True, pace=(1, -1.0, 0, 0.0))
