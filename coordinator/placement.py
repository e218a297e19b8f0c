"""Placement: which stage serves which contiguous range of a model's layers. Pure functions, no gRPC.

The problem. L layers go, in order, to a chain of stages picked from the available ones. A stage's time per token is
what it was measured to take: `fixed + layers * per_layer + (LM head, at the last stage) + (its send to the next
stage)`.
Pipelined, the chain runs at the pace of its slowest stage, so the plan minimises that bottleneck, subject to every
stage's memory: the weights of its layers (in its own dtype), the embedding at the first stage, the final norm and
LM head at the last, plus the KV budget it keeps. Among plans with the optimal bottleneck it prefers a short total
time per token (one token's latency through the chain).

The method. A stage's cost depends only on how many layers it holds and on whether it is the first or the last, so
the order of the middle stages does not change the bottleneck and every pair (first stage, last stage) is tried.
For one pair the optimal bottleneck B is found by binary search over the candidate values (each stage's cost for
each layer count): B is feasible when the layers each stage can take without exceeding B (and its memory) add up to
L. Given B, layers go first to the stages with the cheapest time per layer (keeping the total short), and the pair
with the smallest B, then the smallest total, wins. A stage that gets no layer is left out of the chain, with the
reason.

Exact against brute force on random small cases (tests/test_placement.py).

Replicas (`assign_replicas`): stages left out of the chain copy spans of it that fit their memory, for failover and
for a second chain (the registry decides when they take over).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from layerline.errors import LayerlineError

GiB = 1 << 30


class PlacementError(LayerlineError):
    """The model cannot be placed on the stages given (not enough memory, or no stage at all)."""


@dataclass(frozen=True)
class WeightBytes:
    """A model's weight bytes in one quantized form (what the checkpoint's blocks, or --quantize's, take)."""

    layers: tuple[int, ...]  # each layer's
    embed: int  # token embedding (first stage)
    head: int  # final norm + LM head (last stage; the embedding again when tied)

    @property
    def layer_max(self) -> int:
        return max(self.layers, default=0)

    def extra(self, first: bool, last: bool, tied: bool) -> int:
        """Embedding and head bytes of a stage in that role (a tied table held once by a stage of both)."""
        return (
            (self.embed if first else 0) + (self.head if last else 0) - (self.embed if first and last and tied else 0)
        )

    def for_range(self, start: int, end: int, num_layers: int, tied: bool) -> int:
        return sum(self.layers[start:end]) + self.extra(start == 0, end == num_layers, tied)


@dataclass(frozen=True)
class ModelShape:
    """What placement needs to know of a model: its layers and the parameter counts that take memory."""

    num_layers: int
    layer_params: int  # parameters of one transformer layer
    embed_params: int  # token embedding (first stage)
    head_params: int  # final norm + LM head (last stage; the embedding matrix again when tied)
    tied: bool = False  # tied embeddings: a stage that is first and last keeps one copy for both roles
    # bytes by weight format for the quantized ones ("stored", "int8", "int4": layerline.quant); a stage in one of
    # these is counted by them, a stage of float weights by its parameters times its bytes per parameter
    quantized: dict[str, WeightBytes] = field(default_factory=dict)

    def extra_params(self, first: bool, last: bool) -> int:
        """Parameters besides the layers for a stage in that role."""
        extra = (self.embed_params if first else 0) + (self.head_params if last else 0)
        return extra - (self.embed_params if first and last and self.tied else 0)


@dataclass(frozen=True)
class StageCapacity:
    """One stage as measured on its own device and dtype. Times are seconds per token (decode, batch 1)."""

    name: str  # e.g. its address
    decode_s_per_layer: float
    head_decode_s: float  # final norm + LM head + sampling, paid by the last stage
    memory_bytes: int  # memory it can give the model: weights and KV cache
    kv_bytes: int = 0  # of which it keeps this much for KV caches
    bytes_per_param: float = 4.0  # of its float weights
    weights: str = ""  # its weight format (layerline.quant; "": float weights of bytes_per_param)
    send_s: float = 0.0  # sending one token's hidden state to the next stage (0 = not measured / negligible)
    fixed_s: float = 0.0  # per step whatever its layer count (embedding, rotary tables, the server's own work)
    prefill_s_per_layer: float = 0.0  # per prompt token, for the prefill prediction (not used to place)
    kv_block_size: int = 0  # positions per KV block (0: contiguous, reserved per session)
    kv_bytes_per_layer_position: int = 0  # K and V of one position of one layer (0: not reported)

    def kv_positions(self, layers: int) -> int:
        """Positions of all sessions together its KV budget holds with `layers` layers (whole blocks, less the
        null block, when paged; 0: not known)."""
        per_position = layers * self.kv_bytes_per_layer_position
        if not per_position:
            return 0
        if not self.kv_block_size:
            return self.kv_bytes // per_position
        return max(0, self.kv_bytes // (per_position * self.kv_block_size) - 1) * self.kv_block_size

    def weight_room(self) -> float:
        return self.memory_bytes - self.kv_bytes


@dataclass(frozen=True)
class Assignment:
    name: str
    start: int  # layers [start, end)
    end: int
    decode_s: float  # predicted time per decoded token on this stage (layers, head, send)
    prefill_s_per_token: float
    weight_bytes: int  # weights it loads (layers + embedding / head where it holds them)
    kv_positions: int = 0  # positions (all sessions together) its KV budget holds for these layers; 0: unknown
    kv_block_size: int = 0

    @property
    def layers(self) -> int:
        return self.end - self.start

    def kv_note(self) -> str:
        if not self.kv_positions:
            return ""
        if self.kv_block_size:
            blocks = self.kv_positions // self.kv_block_size
            return f", KV for {self.kv_positions} positions ({blocks} blocks of {self.kv_block_size})"
        return f", KV for {self.kv_positions} positions (reserved per session)"


@dataclass(frozen=True)
class Plan:
    assignments: tuple[Assignment, ...]  # the chain, first stage first
    left_out: dict[str, str] = field(default_factory=dict)  # name -> why it holds no layers

    @property
    def bottleneck_s(self) -> float:
        return max(a.decode_s for a in self.assignments)

    @property
    def total_s(self) -> float:
        return sum(a.decode_s for a in self.assignments)

    def ranges(self) -> list[tuple[str, int, int]]:
        return [(a.name, a.start, a.end) for a in self.assignments]

    def describe(self) -> str:
        lines = [
            f"{a.name}: layers {a.start}:{a.end} ({a.layers}), predicted {1e3 * a.decode_s:.2f} ms/token decode, "
            f"{a.weight_bytes / GiB:.2f} GiB of weights{a.kv_note()}"
            for a in self.assignments
        ]
        lines += [f"{name}: left out ({why})" for name, why in self.left_out.items()]
        lines.append(
            f"bottleneck {1e3 * self.bottleneck_s:.2f} ms/token (at most {1 / self.bottleneck_s:.1f} tokens/s "
            f"pipelined), one token through the chain {1e3 * self.total_s:.2f} ms"
        )
        return "\n".join(lines)


def stage_cost(stage: StageCapacity, layers: int, first: bool, last: bool) -> float:
    """Predicted decode seconds per token of `stage` holding `layers` layers."""
    extra = (stage.head_decode_s if last else 0.0) + (0.0 if last else stage.send_s)
    return stage.fixed_s + layers * stage.decode_s_per_layer + extra


def _bytes(model: ModelShape, stage: StageCapacity, first: bool, last: bool) -> tuple[float, float]:
    """(bytes a layer takes on this stage (the largest layer, for a model whose layers differ), bytes of its
    embedding / head in that role)."""
    q = model.quantized.get(stage.weights)
    if q is not None:
        return float(q.layer_max), float(q.extra(first, last, model.tied))
    return model.layer_params * stage.bytes_per_param, model.extra_params(first, last) * stage.bytes_per_param


def weight_bytes(
    model: ModelShape, stage: StageCapacity, layers: int, first: bool, last: bool, start: int | None = None
) -> int:
    """The stage's weight bytes for `layers` layers in that role: exact for layers start.. when `start` is
    given, else counting each layer as the largest (what placement must allow for)."""
    per_layer, extra = _bytes(model, stage, first, last)
    q = model.quantized.get(stage.weights)
    if q is not None and start is not None:
        return int(sum(q.layers[start : start + layers]) + extra)
    return int(math.ceil(layers * per_layer + extra))


def fits(model: ModelShape, stage: StageCapacity, layers: int, first: bool, last: bool) -> bool:
    return weight_bytes(model, stage, layers, first, last) <= stage.weight_room()


def max_layers(model: ModelShape, stage: StageCapacity, first: bool, last: bool) -> int:
    """Most layers the stage's memory holds in that role (-1: not even the embedding / head fit)."""
    per_layer, extra = _bytes(model, stage, first, last)
    room = stage.weight_room() - extra
    if room < 0:
        return -1
    n = min(model.num_layers, int(room // per_layer) if per_layer else model.num_layers)
    while n >= 0 and not fits(model, stage, n, first, last):  # rounding of the ceil above
        n -= 1
    return n


def _cap(model: ModelShape, stage: StageCapacity, first: bool, last: bool, bound: float, mem_cap: int) -> int:
    """Layers the stage can take in its role without its cost exceeding `bound`."""
    fixed = stage_cost(stage, 0, first, last)
    if fixed > bound:
        return -1
    per = stage.decode_s_per_layer
    n = mem_cap if per <= 0 else min(mem_cap, int((bound - fixed) / per + 1e-9))
    while n > 0 and stage_cost(stage, n, first, last) > bound:  # float rounding
        n -= 1
    return n


def _solve_pair(model: ModelShape, stages: Sequence[StageCapacity], fi: int, li: int) -> tuple[float, list[int]] | None:
    """Optimal bottleneck and per-stage layer counts with stage `fi` first and stage `li` last (None: infeasible)."""
    L = model.num_layers
    roles = [(i == fi, i == li) for i in range(len(stages))]
    mem = [max_layers(model, s, f, la) for s, (f, la) in zip(stages, roles, strict=True)]
    if mem[fi] < 1 or mem[li] < 1:
        return None
    if fi == li:  # one stage holds everything
        if mem[fi] < L:
            return None
        return stage_cost(stages[fi], L, True, True), [L if i == fi else 0 for i in range(len(stages))]
    if L < 2:
        return None
    candidates = sorted(
        {
            stage_cost(s, n, f, la)
            for i, (s, (f, la)) in enumerate(zip(stages, roles, strict=True))
            for n in range(1 if i in (fi, li) else 0, max(mem[i], 0) + 1)
        }
    )

    def caps(bound: float) -> list[int] | None:
        out = []
        for i, (s, (f, la)) in enumerate(zip(stages, roles, strict=True)):
            c = _cap(model, s, f, la, bound, mem[i]) if mem[i] >= 0 else -1
            if i in (fi, li) and c < 1:
                return None
            out.append(max(c, 0))
        return out if sum(out) >= L else None

    lo, hi = 0, len(candidates) - 1
    if hi < 0 or caps(candidates[hi]) is None:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if caps(candidates[mid]) is not None:
            hi = mid
        else:
            lo = mid + 1
    bound = candidates[lo]
    cap = caps(bound)
    assert cap is not None
    # the first and last stages hold at least one layer; the rest go to the cheapest time per layer first
    counts = [1 if i in (fi, li) else 0 for i in range(len(stages))]
    left = L - sum(counts)
    for i in sorted(range(len(stages)), key=lambda i: (stages[i].decode_s_per_layer, i)):
        take = min(cap[i] - counts[i], left)
        counts[i] += take
        left -= take
    assert left == 0
    return bound, counts


def place(model: ModelShape, stages: Sequence[StageCapacity]) -> Plan:
    """The plan with the smallest bottleneck (then the shortest chain time); PlacementError when nothing fits."""
    if model.num_layers <= 0:
        raise PlacementError(f"the model has no layers ({model.num_layers})")
    if not stages:
        raise PlacementError("no stages to place the model on yet")
    if len({s.name for s in stages}) != len(stages):
        raise PlacementError("stage names must be distinct")
    best: tuple[float, float, int, int, list[int]] | None = None
    for fi in range(len(stages)):
        for li in range(len(stages)):
            solved = _solve_pair(model, stages, fi, li)
            if solved is None:
                continue
            bound, counts = solved
            total = sum(
                stage_cost(s, n, i == fi, i == li) for i, (s, n) in enumerate(zip(stages, counts, strict=True)) if n
            )
            key = (bound, total, fi, li, counts)
            if best is None or key[:2] < best[:2]:
                best = key
    if best is None:
        raise PlacementError(_not_enough_memory(model, stages))
    _, _, fi, li, counts = best
    order = [fi] + [i for i in range(len(stages)) if i not in (fi, li) and counts[i]] + ([li] if li != fi else [])
    assignments, start = [], 0
    for i in order:
        s, n, first, last = stages[i], counts[i], i == fi, i == li
        assignments.append(
            Assignment(
                name=s.name,
                start=start,
                end=start + n,
                decode_s=stage_cost(s, n, first, last),
                prefill_s_per_token=n * s.prefill_s_per_layer,
                weight_bytes=weight_bytes(model, s, n, first, last, start),
                kv_positions=s.kv_positions(n),
                kv_block_size=s.kv_block_size,
            )
        )
        start += n
    left_out = {}
    for i, s in enumerate(stages):
        if i in order:
            continue
        if max_layers(model, s, False, False) < 1:
            left_out[s.name] = "its memory holds no layer"
        else:
            left_out[s.name] = "not needed: any layer on it would slow the chain down"
    return Plan(tuple(assignments), left_out)


def _not_enough_memory(model: ModelShape, stages: Sequence[StageCapacity]) -> str:
    """How far the stages' memory is from holding the model, in words."""
    room = sum(max(0.0, s.weight_room()) for s in stages)
    whole = [weight_bytes(model, s, model.num_layers, True, True, 0) for s in stages]  # by each stage's format
    need, need_min = max(whole), min(whole)
    missing = max(need_min - room, 0.0)
    return (
        f"the model does not fit the {len(stages)} stage(s): its weights need {need_min / GiB:.2f} GiB"
        + (f" to {need / GiB:.2f} GiB" if need != need_min else "")
        + f" (with embedding and LM head) and the stages have {room / GiB:.2f} GiB free after their KV budgets; "
        + (
            f"about {missing / GiB:.2f} GiB more is needed"
            if missing > 0
            else "no split fits the embedding and LM head with whole layers: more memory on one stage is needed"
        )
    )


def assign_replicas(
    model: ModelShape, plan: Plan, spare: Sequence[StageCapacity], held: dict[str, tuple[int, int]] | None = None
) -> dict[str, tuple[int, int]]:
    """Spans of the plan for the stages it leaves out: copies of plan stages' ranges, for failover (a replica takes
    over its span without loading anything) and for throughput (another chain for routes to use).

    A spare stage that already holds one of the plan's spans (`held`) keeps it (no reload). The others, fastest
    first, each copy the span they can hold in memory (in that span's role) that has the fewest copies so far, then
    the one whose plan stage is slowest (the bottleneck is the span most worth a spare). A stage that can hold no
    span gets none."""
    L = model.num_layers
    cost = {(a.start, a.end): a.decode_s for a in plan.assignments}
    copies = dict.fromkeys(cost, 0)
    out: dict[str, tuple[int, int]] = {}

    def holds(s: StageCapacity, span: tuple[int, int]) -> bool:
        return fits(model, s, span[1] - span[0], span[0] == 0, span[1] == L)

    rest = []
    for s in spare:
        span = (held or {}).get(s.name)
        if span in copies and holds(s, span):
            out[s.name] = span
            copies[span] += 1
        else:
            rest.append(s)
    for s in sorted(rest, key=lambda s: (s.decode_s_per_layer, s.name)):
        fitting = [span for span in cost if holds(s, span)]
        if fitting:
            pick = min(fitting, key=lambda span: (copies[span], -cost[span], span))
            copies[pick] += 1
            out[s.name] = pick
    return out
