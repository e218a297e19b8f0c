"""Placement (coordinator/placement.py) against brute force on many random small cases, plus its properties: every
layer placed exactly once in order, memory respected, stages left out with a reason, clear refusals."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from layerline.coordinator.placement import (
    PREFILL_CHUNK,
    STEP_BYTES,
    Link,
    ModelShape,
    Network,
    PlacementError,
    StageCapacity,
    WeightBytes,
    assign_replicas,
    chain_plan,
    fits,
    place,
    stage_cost,
)


def pipelined(model: ModelShape, stages: list[StageCapacity], network=None):
    """The throughput objective: the smallest bottleneck."""
    return place(model, stages, network, objective="throughput")


def compositions(total: int, parts: int):
    """Every way to write `total` as `parts` positive integers, in order."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def brute_force(model: ModelShape, stages: list[StageCapacity]) -> float | None:
    """The smallest bottleneck over every chain of distinct stages and every contiguous split (None: nothing fits)."""
    best = None
    for k in range(1, len(stages) + 1):
        for chain in itertools.permutations(stages, k):
            for counts in compositions(model.num_layers, k):
                if k > model.num_layers:
                    continue
                roles = [(i == 0, i == k - 1) for i in range(k)]
                if not all(fits(model, s, n, f, la) for s, n, (f, la) in zip(chain, counts, roles, strict=True)):
                    continue
                cost = max(stage_cost(s, n, f, la) for s, n, (f, la) in zip(chain, counts, roles, strict=True))
                best = cost if best is None else min(best, cost)
    return best


def random_case(rng: random.Random) -> tuple[ModelShape, list[StageCapacity]]:
    layers = rng.randint(1, 7)
    # a quantized form whose layers differ in size (a Q4_K_M file's Q6_K layers), for stages that report it
    stored = WeightBytes(
        tuple(rng.choice([60, 90, 300]) for _ in range(layers)), rng.choice([0, 80]), rng.choice([0, 90])
    )
    model = ModelShape(
        num_layers=layers,
        layer_params=rng.choice([10, 100, 250]),
        embed_params=rng.choice([0, 50, 400]),
        head_params=rng.choice([0, 50, 400]),
        tied=rng.random() < 0.5,
        quantized={"stored": stored},
    )
    stages = []
    for i in range(rng.randint(1, 4)):
        stages.append(
            StageCapacity(
                name=f"s{i}",
                decode_s_per_layer=rng.choice([0.5, 1.0, 1.0, 2.0, 3.0]) * rng.uniform(0.9, 1.1),
                head_decode_s=rng.choice([0.0, 0.5, 4.0]),
                memory_bytes=rng.randint(0, 3000),
                kv_bytes=rng.choice([0, 100]),
                bytes_per_param=rng.choice([1.0, 2.0, 4.0]),
                send_s=rng.choice([0.0, 0.0, 0.3, 2.0]),
                fixed_s=rng.choice([0.0, 0.0, 0.2]),
                weights=rng.choice(["", "", "stored"]),
            )
        )
    return model, stages


def check_plan(model: ModelShape, stages: list[StageCapacity], plan) -> None:
    by_name = {s.name: s for s in stages}
    start = 0
    for i, a in enumerate(plan.assignments):
        assert a.start == start and a.end > a.start, plan  # contiguous, in order, never empty
        start = a.end
        first, last = i == 0, i == len(plan.assignments) - 1
        s = by_name[a.name]
        assert fits(model, s, a.layers, first, last), (a, s)  # memory respected
        assert math.isclose(a.decode_s, stage_cost(s, a.layers, first, last))
    assert start == model.num_layers  # every layer exactly once
    names = [a.name for a in plan.assignments]
    assert len(set(names)) == len(names)
    assert set(names) | set(plan.left_out) == set(by_name) and not set(names) & set(plan.left_out)


def test_random_cases_match_brute_force():
    rng = random.Random(1234)
    feasible = 0
    for _ in range(600):
        model, stages = random_case(rng)
        expected = brute_force(model, stages)
        if expected is None:
            with pytest.raises(PlacementError, match="does not fit"):
                pipelined(model, stages)
            continue
        plan = pipelined(model, stages)
        check_plan(model, stages, plan)
        assert math.isclose(plan.bottleneck_s, expected, rel_tol=1e-9), (model, stages, plan, expected)
        feasible += 1
    assert feasible > 300  # the generator makes mostly placeable cases: the comparison means something


def test_half_speed_stage_gets_about_half_the_layers():
    model = ModelShape(num_layers=30, layer_params=3_500_000, embed_params=28_000_000, head_params=28_000_000)
    fast = StageCapacity("fast", decode_s_per_layer=1.0e-3, head_decode_s=0.0, memory_bytes=8 << 30)
    slow = StageCapacity("slow", decode_s_per_layer=2.0e-3, head_decode_s=0.0, memory_bytes=8 << 30)
    plan = pipelined(model, [fast, slow])
    layers = {a.name: a.layers for a in plan.assignments}
    assert layers == {"fast": 20, "slow": 10}
    assert math.isclose(plan.bottleneck_s, 20e-3)
    # the LM head's cost moves layers away from the last stage
    with_head = pipelined(model, [fast, StageCapacity("slow", 2.0e-3, 8e-3, 8 << 30)])
    assert with_head.assignments[-1].name == "fast" or with_head.bottleneck_s <= plan.bottleneck_s + 8e-3


def test_memory_caps_a_fast_stage_and_small_stages_are_left_out():
    model = ModelShape(num_layers=10, layer_params=100, embed_params=100, head_params=100)
    fast_small = StageCapacity("fast", 1.0, 0.0, memory_bytes=4 * 400, bytes_per_param=4.0)  # 4 layers or 3 + head
    slow_big = StageCapacity("slow", 3.0, 0.0, memory_bytes=10_000, bytes_per_param=4.0)
    tiny = StageCapacity("tiny", 0.1, 0.0, memory_bytes=300, bytes_per_param=4.0)  # not even one layer
    plan = pipelined(model, [tiny, fast_small, slow_big])
    check_plan(model, [tiny, fast_small, slow_big], plan)
    assert plan.left_out == {"tiny": "its memory holds no layer"}
    # only two stages hold layers, so the fast one is first or last: 3 layers and the embedding (or head) fill it
    assert dict((a.name, a.layers) for a in plan.assignments) == {"fast": 3, "slow": 7}


def test_refusals_say_what_is_missing():
    model = ModelShape(num_layers=8, layer_params=1 << 20, embed_params=1 << 20, head_params=1 << 20)
    small = [StageCapacity(f"s{i}", 1.0, 0.0, memory_bytes=4 << 20) for i in range(2)]  # 10 MiB needed, 8 MiB free
    with pytest.raises(PlacementError, match=r"need 0\.04 GiB .* about 0\.03 GiB more is needed"):
        pipelined(model, small)
    with pytest.raises(PlacementError, match="no stages"):
        pipelined(model, [])
    with pytest.raises(PlacementError, match="distinct"):
        pipelined(model, [small[0], small[0]])


def test_plan_describes_itself():
    model = ModelShape(num_layers=4, layer_params=10, embed_params=10, head_params=10)
    plan = pipelined(model, [StageCapacity("a:1", 1e-3, 1e-3, 1000), StageCapacity("b:2", 1e-3, 1e-3, 1000)])
    text = plan.describe()
    assert "a:1: layers 0:" in text and "bottleneck" in text
    assert plan.ranges()[0][1] == 0 and plan.ranges()[-1][2] == 4


def test_replicas_copy_spans_that_fit_fewest_copies_first_and_keep_what_they_hold():
    model = ModelShape(num_layers=6, layer_params=1000, embed_params=3000, head_params=3000)
    plan = pipelined(model, [StageCapacity("a", 1e-3, 0.0, 10**6), StageCapacity("b", 2e-3, 0.0, 10**6)])
    (_, a0, a1), (_, b0, b1) = plan.ranges()
    spans = {(a0, a1), (b0, b1)}
    slow_span = max(plan.assignments, key=lambda x: x.decode_s)
    spare = [StageCapacity(f"s{i}", 1e-3, 0.0, 10**6) for i in range(3)]
    got = assign_replicas(model, plan, spare)
    assert set(got.values()) == spans  # three spares over two spans: both covered
    assert sorted(got.values()).count((slow_span.start, slow_span.end)) == 2  # the slower span gets the third
    # what a spare already holds is kept
    held = {"s0": (a0, a1) if got["s0"] != (a0, a1) else (b0, b1)}
    assert assign_replicas(model, plan, spare[:1], held) == held
    # memory: a stage that holds only the middle-free span, or nothing
    small = StageCapacity("small", 1e-3, 0.0, int(4.0 * (model.layer_params * 2 + model.embed_params)))
    for name, (x, y) in assign_replicas(model, plan, [small]).items():
        assert fits(model, small, y - x, x == 0, y == model.num_layers), (name, x, y)
    assert assign_replicas(model, plan, [StageCapacity("none", 1e-3, 0.0, 100)]) == {}


def test_quantized_stages_are_counted_by_the_bytes_of_their_blocks():
    """A stage holding a GGUF file's blocks needs their bytes, not its parameters times 4: the same memory holds
    all 8 layers quantized and only 2 as float32; a plan reports the exact bytes of each range."""
    model = ModelShape(
        8,
        layer_params=100,
        embed_params=40,
        head_params=40,
        quantized={"stored": WeightBytes((25,) * 7 + (35,), 10, 10)},
    )
    floats = StageCapacity("f", decode_s_per_layer=1.0, head_decode_s=0.0, memory_bytes=1000, bytes_per_param=4.0)
    blocks = StageCapacity(
        "q", decode_s_per_layer=1.0, head_decode_s=0.0, memory_bytes=1000, bytes_per_param=4.0, weights="stored"
    )
    with pytest.raises(PlacementError):
        pipelined(model, [floats])
    plan = pipelined(model, [blocks])
    assert plan.ranges() == [("q", 0, 8)] and plan.assignments[0].weight_bytes == 7 * 25 + 35 + 10 + 10
    # each layer is counted as the largest (35) when placing: 9 such layers would not fit 320 bytes, 8 do
    tight = StageCapacity("t", 1.0, 0.0, memory_bytes=35 * 8 + 20, bytes_per_param=4.0, weights="stored")
    assert fits(model, tight, 8, True, True) and not fits(model, tight, 9, True, True)


def test_the_plan_counts_each_stages_kv_budget_in_blocks_for_the_layers_it_gets():
    model = ModelShape(num_layers=12, layer_params=1000, embed_params=0, head_params=0)
    per = 2 * 2 * 16 * 4  # K and V, 2 heads of 16, float32: one position of one layer
    kv = 100 * 16 * per  # 100 blocks of 16 positions of one layer
    fast = StageCapacity("fast", 1.0e-3, 0.0, 8 << 30, kv_bytes=kv, kv_block_size=16, kv_bytes_per_layer_position=per)
    slow = StageCapacity("slow", 3.0e-3, 0.0, 8 << 30, kv_bytes=kv, kv_block_size=0, kv_bytes_per_layer_position=per)
    plan = pipelined(model, [fast, slow])
    a, b = plan.assignments
    assert (a.layers, b.layers) == (9, 3)
    # paged: whole blocks of its 9 layers, less the null block; contiguous: positions of its 3 layers
    assert a.kv_positions == (kv // (9 * per * 16) - 1) * 16 == 160
    assert b.kv_positions == kv // (3 * per) == 533
    assert "KV for 160 positions (10 blocks of 16)" in plan.describe()
    assert "KV for 533 positions (reserved per session)" in plan.describe()
    unknown = pipelined(model, [StageCapacity("x", 1e-3, 0.0, 8 << 30)])
    assert unknown.assignments[0].kv_positions == 0 and "KV" not in unknown.describe()


def random_network(rng: random.Random, stages: list[StageCapacity]) -> Network:
    """Links between some pairs (each direction on its own), some of them slow; the rest unmeasured."""
    links = {}
    for a, b in itertools.permutations(stages, 2):
        if rng.random() < 0.8:
            links[(a.name, b.name)] = Link(rtt_s=rng.choice([0.0, 0.2, 1.0, 4.0]), bytes_per_s=rng.choice([0, 50, 400]))
    return Network(links, hidden_size=rng.choice([1, 4]))


def brute_force_chains(model: ModelShape, stages: list[StageCapacity], net: Network):
    """(bottleneck, ring) of every ordered chain of distinct stages and every contiguous split that fits."""
    for k in range(1, min(len(stages), model.num_layers) + 1):
        for chain in itertools.permutations(stages, k):
            for counts in compositions(model.num_layers, k):
                roles = [(i == 0, i == k - 1) for i in range(k)]
                if not all(fits(model, s, n, f, la) for s, n, (f, la) in zip(chain, counts, roles, strict=True)):
                    continue
                sends = [net.send_s(s, chain[i + 1].name) if i + 1 < k else 0.0 for i, s in enumerate(chain)]
                costs = [
                    stage_cost(s, n, f, la, send)
                    for s, n, (f, la), send in zip(chain, counts, roles, sends, strict=True)
                ]
                yield max(costs), sum(costs) + net.back_s(chain[-1].name, chain[0].name)


def test_with_links_both_objectives_match_brute_force_over_chain_orders():
    """With measured links a chain's order matters (each stage sends on its own link): the latency objective
    finds the shortest ring (one session's time per token, the way back to the first stage included) and the
    throughput objective the smallest bottleneck, over every ordered chain and split."""
    rng = random.Random(77)
    feasible = 0
    for _ in range(300):
        model, stages = random_case(rng)
        net = random_network(rng, stages)
        options = list(brute_force_chains(model, stages, net))
        if not options:
            with pytest.raises(PlacementError, match="does not fit"):
                place(model, stages, net)
            continue
        feasible += 1
        fastest = place(model, stages, net)  # latency: the default
        assert math.isclose(fastest.ring_s, min(r for _, r in options), rel_tol=1e-9, abs_tol=1e-12)
        busiest = place(model, stages, net, objective="throughput")
        assert math.isclose(busiest.bottleneck_s, min(b for b, _ in options), rel_tol=1e-9, abs_tol=1e-12)
        for plan in (fastest, busiest):
            names = [a.name for a in plan.assignments]
            assert set(names) | set(plan.left_out) == {s.name for s in stages}
            assert plan.assignments[0].start == 0 and plan.assignments[-1].end == model.num_layers
    assert feasible > 150


def test_without_links_the_latency_objective_gives_the_fastest_ring_too():
    rng = random.Random(5)
    for _ in range(300):
        model, stages = random_case(rng)
        options = list(brute_force_chains(model, stages, Network()))
        if options:
            assert math.isclose(place(model, stages).ring_s, min(r for _, r in options), rel_tol=1e-9)


def lan(names: list[str], rtt_s: float, bytes_per_s: float, slow: tuple[str, str] = ("", ""), factor: float = 1.0):
    links = {}
    for a, b in itertools.permutations(names, 2):
        f = factor if {a, b} == set(slow) else 1.0
        links[(a, b)] = Link(rtt_s * f, bytes_per_s / f)
    return links


def test_a_model_that_fits_one_stage_is_served_by_one_and_the_others_are_not_in_the_chain():
    model = ModelShape(num_layers=30, layer_params=1000, embed_params=5000, head_params=5000)
    stages = [StageCapacity(n, 1e-3, 2e-3, 10**6, wire_bytes=2) for n in ("a", "b", "c")]
    net = Network(lan(["a", "b", "c"], rtt_s=2e-3, bytes_per_s=12.5e6), hidden_size=576)
    plan = place(model, stages, net)
    assert plan.ranges() == [("a", 0, 30)]  # equal stages: every hop would only add time
    assert set(plan.left_out) == {"b", "c"}
    assert plan.assignments[0].back_s == 0.0 and plan.assignments[0].send_s == 0.0
    assert math.isclose(plan.ring_s, 30e-3 + 2e-3)
    # the rejected alternatives with their figures: the pipelined plan and the even split over all three
    labels = {alt.label: alt for alt in plan.alternatives}
    # pipelined sessions would split them evenly: one alternative, both names
    even = labels["most tokens/s of pipelined sessions = even split over all 3 stages"].plan
    assert even is not None and [a.layers for a in even.assignments] == [10, 10, 10]
    hop = 1e-3 + (576 * 2 + STEP_BYTES) / 12.5e6
    back = 1e-3 + STEP_BYTES / 12.5e6
    assert math.isclose(even.ring_s, 30e-3 + 2e-3 + 2 * hop + back)
    assert even.decode_tokens_per_s < plan.decode_tokens_per_s
    text = plan.describe()
    assert "objective latency: predicted decode 31.2 tokens/s" in text and "= even split over all 3" in text
    # pipelined sessions: the throughput objective still splits
    assert len(place(model, stages, net, objective="throughput").assignments) == 3
    # a much faster stage is worth its hop: the layers go there whatever the order of the given stages
    fast = StageCapacity("f", 1e-4, 2e-4, 10**6, wire_bytes=2)
    net2 = Network(lan(["a", "b", "c", "f"], 2e-3, 12.5e6), 576)
    assert place(model, [*stages, fast], net2).ranges() == [("f", 0, 30)]


def test_a_split_model_takes_the_fast_links_and_avoids_the_slow_one():
    """Memory forces three stages; one link is 5x slower: the chain's order keeps it off the ring where it can
    (the ring of three stages uses all three links of one direction: a -> b -> c -> a), and the figures say what
    each hop costs."""
    model = ModelShape(num_layers=12, layer_params=1000, embed_params=0, head_params=0)
    stages = [StageCapacity(n, 1e-3, 0.0, 4 * 1000 * 5, bytes_per_param=4.0) for n in ("a", "b", "c")]
    one_way = {("a", "b"): 1e-3, ("b", "c"): 5e-3, ("c", "a"): 1e-3, ("b", "a"): 1e-3, ("c", "b"): 1e-3}
    links = {k: Link(2 * v) for k, v in one_way.items()} | {("a", "c"): Link(2e-3)}
    plan = place(model, stages, Network(links, hidden_size=0))
    order = [a.name for a in plan.assignments]
    hops = list(zip(order, order[1:] + order[:1], strict=True))
    assert ("b", "c") not in hops, order
    assert sum(a.layers for a in plan.assignments) == 12 and len(order) == 3
    assert math.isclose(plan.ring_s, 12e-3 + 3e-3)


def test_prefill_prediction_pipelines_the_chunks():
    model = ModelShape(num_layers=4, layer_params=10, embed_params=0, head_params=0)
    stages = [StageCapacity(n, 1e-3, 0.0, 10**6, prefill_s_per_layer=1e-5, wire_bytes=4) for n in ("a", "b")]
    net = Network({("a", "b"): Link(2e-3, 1e6), ("b", "a"): Link(2e-3, 1e6)}, hidden_size=100)
    plan = chain_plan(model, [(stages[0], 0, 2), (stages[1], 2, 4)], net)
    compute = PREFILL_CHUNK * 2 * 1e-5  # one chunk on one stage
    send = 1e-3 + (PREFILL_CHUNK * 100 * 4 + STEP_BYTES) / 1e6
    back = 1e-3 + STEP_BYTES / 1e6
    # 1024 tokens: two chunks, the second behind the first at the pace of the slowest step (the send here)
    assert math.isclose(plan.prefill_s(), 2 * compute + send + send + back)
    assert math.isclose(plan.prefill_tokens_per_s, 1024 / plan.prefill_s())
    assert math.isclose(plan.prefill_s(100), 100 * 2 * 1e-5 * 2 + 1e-3 + (100 * 400 + STEP_BYTES) / 1e6 + back)


def test_unknown_objective_is_refused():
    model = ModelShape(num_layers=2, layer_params=10, embed_params=0, head_params=0)
    with pytest.raises(PlacementError, match="objective 'speed'"):
        place(model, [StageCapacity("a", 1e-3, 0.0, 10**6)], objective="speed")
