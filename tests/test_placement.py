"""Placement (coordinator/placement.py) against brute force on many random small cases, plus its properties: every
layer placed exactly once in order, memory respected, stages left out with a reason, clear refusals."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from layerline.coordinator.placement import (
    ModelShape,
    PlacementError,
    StageCapacity,
    WeightBytes,
    assign_replicas,
    fits,
    place,
    stage_cost,
)


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
                place(model, stages)
            continue
        plan = place(model, stages)
        check_plan(model, stages, plan)
        assert math.isclose(plan.bottleneck_s, expected, rel_tol=1e-9), (model, stages, plan, expected)
        feasible += 1
    assert feasible > 300  # the generator makes mostly placeable cases: the comparison means something


def test_half_speed_stage_gets_about_half_the_layers():
    model = ModelShape(num_layers=30, layer_params=3_500_000, embed_params=28_000_000, head_params=28_000_000)
    fast = StageCapacity("fast", decode_s_per_layer=1.0e-3, head_decode_s=0.0, memory_bytes=8 << 30)
    slow = StageCapacity("slow", decode_s_per_layer=2.0e-3, head_decode_s=0.0, memory_bytes=8 << 30)
    plan = place(model, [fast, slow])
    layers = {a.name: a.layers for a in plan.assignments}
    assert layers == {"fast": 20, "slow": 10}
    assert math.isclose(plan.bottleneck_s, 20e-3)
    # the LM head's cost moves layers away from the last stage
    with_head = place(model, [fast, StageCapacity("slow", 2.0e-3, 8e-3, 8 << 30)])
    assert with_head.assignments[-1].name == "fast" or with_head.bottleneck_s <= plan.bottleneck_s + 8e-3


def test_memory_caps_a_fast_stage_and_small_stages_are_left_out():
    model = ModelShape(num_layers=10, layer_params=100, embed_params=100, head_params=100)
    fast_small = StageCapacity("fast", 1.0, 0.0, memory_bytes=4 * 400, bytes_per_param=4.0)  # 4 layers or 3 + head
    slow_big = StageCapacity("slow", 3.0, 0.0, memory_bytes=10_000, bytes_per_param=4.0)
    tiny = StageCapacity("tiny", 0.1, 0.0, memory_bytes=300, bytes_per_param=4.0)  # not even one layer
    plan = place(model, [tiny, fast_small, slow_big])
    check_plan(model, [tiny, fast_small, slow_big], plan)
    assert plan.left_out == {"tiny": "its memory holds no layer"}
    # only two stages hold layers, so the fast one is first or last: 3 layers and the embedding (or head) fill it
    assert dict((a.name, a.layers) for a in plan.assignments) == {"fast": 3, "slow": 7}


def test_refusals_say_what_is_missing():
    model = ModelShape(num_layers=8, layer_params=1 << 20, embed_params=1 << 20, head_params=1 << 20)
    small = [StageCapacity(f"s{i}", 1.0, 0.0, memory_bytes=4 << 20) for i in range(2)]  # 10 MiB needed, 8 MiB free
    with pytest.raises(PlacementError, match=r"need 0\.04 GiB .* about 0\.03 GiB more is needed"):
        place(model, small)
    with pytest.raises(PlacementError, match="no stages"):
        place(model, [])
    with pytest.raises(PlacementError, match="distinct"):
        place(model, [small[0], small[0]])


def test_plan_describes_itself():
    model = ModelShape(num_layers=4, layer_params=10, embed_params=10, head_params=10)
    plan = place(model, [StageCapacity("a:1", 1e-3, 1e-3, 1000), StageCapacity("b:2", 1e-3, 1e-3, 1000)])
    text = plan.describe()
    assert "a:1: layers 0:" in text and "bottleneck" in text
    assert plan.ranges()[0][1] == 0 and plan.ranges()[-1][2] == 4


def test_replicas_copy_spans_that_fit_fewest_copies_first_and_keep_what_they_hold():
    model = ModelShape(num_layers=6, layer_params=1000, embed_params=3000, head_params=3000)
    plan = place(model, [StageCapacity("a", 1e-3, 0.0, 10**6), StageCapacity("b", 2e-3, 0.0, 10**6)])
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
        place(model, [floats])
    plan = place(model, [blocks])
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
    plan = place(model, [fast, slow])
    a, b = plan.assignments
    assert (a.layers, b.layers) == (9, 3)
    # paged: whole blocks of its 9 layers, less the null block; contiguous: positions of its 3 layers
    assert a.kv_positions == (kv // (9 * per * 16) - 1) * 16 == 160
    assert b.kv_positions == kv // (3 * per) == 533
    assert "KV for 160 positions (10 blocks of 16)" in plan.describe()
    assert "KV for 533 positions (reserved per session)" in plan.describe()
    unknown = place(model, [StageCapacity("x", 1e-3, 0.0, 8 << 30)])
    assert unknown.assignments[0].kv_positions == 0 and "KV" not in unknown.describe()
