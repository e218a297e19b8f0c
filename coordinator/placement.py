"""Placement: which stage serves which contiguous range of a model's layers. Pure functions, no gRPC.

The problem. L layers go, in order, to a chain of stages picked from the available ones, within every stage's
memory: the weights of its layers (in its own dtype), the embedding at the first stage, the final norm and LM head at
the last, plus the KV budget it keeps. A stage's time per token is what it was measured to take: `fixed + layers *
per_layer + (LM head, at the last stage) + (its send to the next stage)`, the send being the measured link's one-way
latency plus one token's hidden state over its bandwidth (`Network`). With the server loop a token of one session
costs the whole ring: every stage's time plus the sampled token's way from the last stage back to the first.

Two objectives:
- "latency" (the default): the fastest decoding of one session, i.e. the shortest ring. A model that fits one stage
  is served by one stage unless the network costs less than a faster stage saves (single-node first: the others
  become replicas, each another chain for more sessions); a model that must be split goes to the fewest, fastest
  stages, in the order of the cheapest links. Ties go to fewer stages, then to the smaller bottleneck.
- "throughput": pipelined sessions, whose rate is that of the chain's slowest stage: the smallest bottleneck, then
  the shortest ring.

The method. Without links a stage's cost depends only on how many layers it holds and on whether it is the first or
the last, so the order of the middle stages does not change the bottleneck and every pair (first stage, last stage)
is tried: for one pair the optimal bottleneck B is found by binary search over the candidate values (each stage's
cost for each layer count), B being feasible when the layers each stage can take without exceeding B (and its
memory) add up to L; layers then go first to the stages with the cheapest time per layer (keeping the total short).
Exact against brute force on random small cases (tests/test_placement.py). With links, and for the latency
objective, the order matters: every ordered chain of up to `SEARCH_STAGES` stages is tried (the same binary search
for a bottleneck; for the ring, layers to the cheapest time per layer); with more stages, every single stage and the
pair method's chain. A stage that gets no layer is left out of the chain, with the reason.

Each plan carries its predicted figures (`Plan.decode_tokens_per_s`, `Plan.prefill_tokens_per_s`) and those of the
alternatives it was chosen over (an even split over all stages, the best single stage, the other objective's plan).

Replicas (`assign_replicas`): stages left out of the chain copy spans of it that fit their memory, for failover and
for a second chain (the registry decides when they take over).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from layerline.errors import LayerlineError

GiB = 1 << 30
OBJECTIVES = ("latency", "throughput")
SEARCH_STAGES = 5  # up to this many stages every ordered chain is tried (5 stages: 325 chains)
PREFILL_TOKENS = 1024  # the prompt the prefill prediction is for ...
PREFILL_CHUNK = 512  # ... sent in chunks of this many tokens (the client's default)
STEP_BYTES = 200  # a step's own bytes besides the hidden state (ids, positions, framing)


@dataclass(frozen=True)
class Link:
    """One direction of a link between two stages, as measured by the sending one."""

    rtt_s: float  # round trip of a small message
    bytes_per_s: float = 0.0  # payload bandwidth (0: not measured, not limiting)

    def send_s(self, nbytes: float) -> float:
        """One-way time of a message of `nbytes`: half the round trip plus its bytes over the bandwidth."""
        return self.rtt_s / 2 + (nbytes / self.bytes_per_s if self.bytes_per_s > 0 else 0.0)


@dataclass(frozen=True)
class Network:
    """The measured links between stages (by stage name, sender first) and the model's hidden size. A link nobody
    measured costs nothing (as on one machine); stages send `StageCapacity.wire_bytes` per element."""

    links: Mapping[tuple[str, str], Link] = field(default_factory=dict)
    hidden_size: int = 0

    def send_s(self, stage: StageCapacity, to: str, tokens: int = 1) -> float:
        link = self.links.get((stage.name, to))
        if link is None:
            return stage.send_s
        return link.send_s(tokens * self.hidden_size * stage.wire_bytes + STEP_BYTES)

    def link_figures(self, stage: StageCapacity, to: str) -> tuple[float, float]:
        """(one-way latency, seconds per byte) of the stage's link to `to`."""
        link = self.links.get((stage.name, to))
        if link is None:
            return stage.send_s, 0.0
        return link.rtt_s / 2, (1 / link.bytes_per_s if link.bytes_per_s > 0 else 0.0)

    def back_s(self, last: str, first: str) -> float:
        """The sampled token's way from the last stage back to the first (server loop)."""
        link = self.links.get((last, first))
        return 0.0 if link is None or last == first else link.send_s(STEP_BYTES)


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
    hidden_size: int = 0  # elements of one token's hidden state (what a stage sends on per token)

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
    wire_bytes: int = 4  # bytes per element of the hidden states it sends

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
    send_s: float = 0.0  # of decode_s: one token's hidden state to the next stage (the last stage: 0)
    link_s: float = 0.0  # its link to the next stage: one-way latency ...
    link_s_per_byte: float = 0.0  # ... and seconds per byte (0: bandwidth not limiting) ...
    token_bytes: int = 0  # ... for the hidden state of one token

    def chunk_send_s(self, tokens: int) -> float:
        """The hidden states of a prompt chunk of `tokens` to the next stage (0 at the last stage)."""
        if not self.send_s:
            return 0.0
        return self.link_s + (tokens * self.token_bytes + STEP_BYTES) * self.link_s_per_byte

    back_s: float = 0.0  # the last stage: the sampled token back to the first (server loop)

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
class Alternative:
    """A plan the chosen one was preferred to (plan None: not possible, `note` says why)."""

    label: str
    plan: Plan | None
    note: str = ""


@dataclass(frozen=True)
class Plan:
    assignments: tuple[Assignment, ...]  # the chain, first stage first
    left_out: dict[str, str] = field(default_factory=dict)  # name -> why it holds no layers
    objective: str = "latency"
    alternatives: tuple[Alternative, ...] = ()

    @property
    def bottleneck_s(self) -> float:
        return max(a.decode_s for a in self.assignments)

    @property
    def total_s(self) -> float:
        return sum(a.decode_s for a in self.assignments)

    @property
    def ring_s(self) -> float:
        """One token of one session with the server loop: every stage, then back to the first."""
        return self.total_s + self.assignments[-1].back_s

    @property
    def decode_tokens_per_s(self) -> float:
        return 1 / self.ring_s if self.ring_s > 0 else math.inf

    def prefill_s(self, tokens: int = PREFILL_TOKENS, chunk: int = PREFILL_CHUNK) -> float:
        """A prompt of `tokens` sent in chunks: the chunks follow each other down the chain, so the first crosses
        every stage and link and the others come at the pace of the slowest stage or link."""
        chunk = max(1, min(chunk, tokens))
        chunks = math.ceil(tokens / chunk)
        per = [chunk * a.prefill_s_per_token for a in self.assignments]
        sends = [a.chunk_send_s(chunk) for a in self.assignments]
        return sum(per) + sum(sends) + (chunks - 1) * max(per + sends) + self.assignments[-1].back_s

    @property
    def prefill_tokens_per_s(self) -> float:
        s = self.prefill_s()
        return PREFILL_TOKENS / s if s > 0 else math.inf

    def score(self) -> float:
        """What the objective minimises."""
        return self.ring_s if self.objective == "latency" else self.bottleneck_s

    def ranges(self) -> list[tuple[str, int, int]]:
        return [(a.name, a.start, a.end) for a in self.assignments]

    def figures(self) -> str:
        return (
            f"decode {_rate(self.decode_tokens_per_s)} tokens/s (one session), prefill "
            f"{_rate(self.prefill_tokens_per_s)} tokens/s ({PREFILL_TOKENS}-token prompt), "
            f"{len(self.assignments)} stage(s)"
        )

    def describe(self) -> str:
        lines = [
            f"{a.name}: layers {a.start}:{a.end} ({a.layers}), predicted {1e3 * a.decode_s:.2f} ms/token decode"
            + (f" (of which {1e3 * a.send_s:.2f} ms sending on)" if a.send_s else "")
            + f", {a.weight_bytes / GiB:.2f} GiB of weights{a.kv_note()}"
            for a in self.assignments
        ]
        lines += [f"{name}: left out ({why})" for name, why in self.left_out.items()]
        lines.append(
            f"bottleneck {1e3 * self.bottleneck_s:.2f} ms/token (at most {1 / self.bottleneck_s:.1f} tokens/s "
            f"pipelined), one token through the chain {1e3 * self.ring_s:.2f} ms"
        )
        lines.append(f"objective {self.objective}: predicted {self.figures()}")
        for alt in self.alternatives:
            if alt.plan is None:
                lines.append(f"rejected {alt.label}: {alt.note}")
            else:
                chain = " -> ".join(f"{a.name} {a.start}:{a.end}" for a in alt.plan.assignments)
                lines.append(f"rejected {alt.label} ({chain}): {alt.plan.figures()}")
        return "\n".join(lines)


def _rate(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def stage_cost(stage: StageCapacity, layers: int, first: bool, last: bool, send_s: float | None = None) -> float:
    """Predicted decode seconds per token of `stage` holding `layers` layers (sending on in `send_s`, by default
    its own `send_s`)."""
    send = stage.send_s if send_s is None else send_s
    extra = stage.head_decode_s if last else send
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


def _cap(
    model: ModelShape,
    stage: StageCapacity,
    first: bool,
    last: bool,
    bound: float,
    mem_cap: int,
    send_s: float | None = None,
) -> int:
    """Layers the stage can take in its role without its cost exceeding `bound`."""
    fixed = stage_cost(stage, 0, first, last, send_s)
    if fixed > bound:
        return -1
    per = stage.decode_s_per_layer
    n = mem_cap if per <= 0 else min(mem_cap, int((bound - fixed) / per + 1e-9))
    while n > 0 and stage_cost(stage, n, first, last, send_s) > bound:  # float rounding
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


def _solve_chain(
    model: ModelShape, stages: Sequence[StageCapacity], chain: Sequence[int], sends: Sequence[float], objective: str
) -> list[int] | None:
    """Layer counts (each at least 1) for the stages `chain` in that order, the j-th sending on in `sends[j]`:
    the smallest bottleneck ("throughput") or the shortest ring ("latency"); None when their memory cannot hold
    the model."""
    L, k = model.num_layers, len(chain)
    if k > L:
        return None
    roles = [(j == 0, j == k - 1) for j in range(k)]
    mem = [max_layers(model, stages[i], *roles[j]) for j, i in enumerate(chain)]
    if min(mem) < 1 or sum(mem) < L:
        return None

    def cost(j: int, n: int) -> float:
        return stage_cost(stages[chain[j]], n, *roles[j], sends[j])

    if objective == "throughput":
        candidates = sorted({cost(j, n) for j in range(k) for n in range(1, mem[j] + 1)})

        def caps(bound: float) -> list[int] | None:
            out = [_cap(model, stages[i], *roles[j], bound, mem[j], sends[j]) for j, i in enumerate(chain)]
            return out if min(out) >= 1 and sum(out) >= L else None

        lo, hi = 0, len(candidates) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if caps(candidates[mid]) is not None:
                hi = mid
            else:
                lo = mid + 1
        cap = caps(candidates[lo])
        assert cap is not None
        mem = cap  # within the bound: then, as for latency, the cheapest time per layer first
    counts, left = [1] * k, L - k
    by_speed = sorted(range(k), key=lambda j: stages[chain[j]].decode_s_per_layer)
    for _, same in itertools.groupby(by_speed, key=lambda j: stages[chain[j]].decode_s_per_layer):
        group = list(same)
        while left and any(counts[j] < mem[j] for j in group):  # equally fast: to the least loaded
            j = min((j for j in group if counts[j] < mem[j]), key=lambda j: (cost(j, counts[j] + 1), j))
            if len(group) == 1:
                take = min(mem[j] - counts[j], left)
                counts[j], left = counts[j] + take, left - take
            else:
                counts[j], left = counts[j] + 1, left - 1
    return counts if left == 0 else None


def _sends(stages: Sequence[StageCapacity], chain: Sequence[int], net: Network) -> list[float]:
    return [
        net.send_s(stages[i], stages[chain[j + 1]].name) if j + 1 < len(chain) else 0.0 for j, i in enumerate(chain)
    ]


def _key(
    stages: Sequence[StageCapacity], chain: Sequence[int], counts: Sequence[int], net: Network, objective: str
) -> tuple:
    k = len(chain)
    sends = _sends(stages, chain, net)
    costs = [
        stage_cost(stages[i], n, j == 0, j == k - 1, sends[j])
        for j, (i, n) in enumerate(zip(chain, counts, strict=True))
    ]
    bottleneck = max(costs)
    ring = sum(costs) + net.back_s(stages[chain[-1]].name, stages[chain[0]].name)
    q = lambda x: round(x, 12)  # noqa: E731 - equal up to float rounding
    if objective == "latency":
        return (q(ring), k, q(bottleneck), tuple(chain))
    return (q(bottleneck), q(ring), k, tuple(chain))


def _search(
    model: ModelShape, stages: Sequence[StageCapacity], net: Network, objective: str
) -> tuple[list[int], list[int]] | None:
    """The best chain (stage indices, first first) and its layer counts for the objective; None: nothing fits."""
    n = len(stages)
    found: list[tuple[tuple, list[int], list[int]]] = []

    def consider(chain: list[int], counts: list[int] | None) -> None:
        if counts is not None:
            found.append((_key(stages, chain, counts, net, objective), chain, counts))

    if (objective == "latency" or net.links) and n <= SEARCH_STAGES:
        for k in range(1, n + 1):
            for chain in itertools.permutations(range(n), k):
                consider(list(chain), _solve_chain(model, stages, chain, _sends(stages, chain, net), objective))
    else:
        # the pair method (exact without links); with links each stage's send taken as its links' mean
        sends = {}
        for s in stages:
            out = [net.send_s(s, t.name) for t in stages if (s.name, t.name) in net.links]
            sends[s.name] = sum(out) / len(out) if out else s.send_s
        flat = [replace(s, send_s=sends[s.name]) for s in stages]
        for fi in range(n):
            for li in range(n):
                solved = _solve_pair(model, flat, fi, li)
                if solved is None:
                    continue
                _, counts = solved
                chain = [fi] + [i for i in range(n) if i not in (fi, li) and counts[i]] + ([li] if li != fi else [])
                consider(chain, [counts[i] for i in chain])
        if objective == "latency":
            for i in range(n):
                consider([i], _solve_chain(model, stages, [i], [0.0], objective))
    if not found:
        return None
    _, chain, counts = min(found, key=lambda f: f[0])
    return chain, counts


def _build(
    model: ModelShape,
    stages: Sequence[StageCapacity],
    chain: Sequence[int],
    counts: Sequence[int],
    net: Network,
    objective: str,
) -> Plan:
    assignments, start, k = [], 0, len(chain)
    for j, (i, n) in enumerate(zip(chain, counts, strict=True)):
        s, first, last = stages[i], j == 0, j == k - 1
        to = stages[chain[j + 1]].name if not last else ""
        send = 0.0 if last else net.send_s(s, to)
        latency, per_byte = (0.0, 0.0) if last else net.link_figures(s, to)
        assignments.append(
            Assignment(
                name=s.name,
                start=start,
                end=start + n,
                decode_s=stage_cost(s, n, first, last, send),
                prefill_s_per_token=n * s.prefill_s_per_layer,
                weight_bytes=weight_bytes(model, s, n, first, last, start),
                kv_positions=s.kv_positions(n),
                kv_block_size=s.kv_block_size,
                send_s=send,
                link_s=latency,
                link_s_per_byte=per_byte,
                token_bytes=net.hidden_size * s.wire_bytes,
                back_s=net.back_s(s.name, stages[chain[0]].name) if last else 0.0,
            )
        )
        start += n
    left_out = {}
    for s in stages:
        if any(a.name == s.name for a in assignments):
            continue
        if max_layers(model, s, False, False) < 1:
            left_out[s.name] = "its memory holds no layer"
        else:
            left_out[s.name] = "not needed: any layer on it would slow the chain down"
    return Plan(tuple(assignments), left_out, objective)


def chain_plan(
    model: ModelShape,
    chain: Sequence[tuple[StageCapacity, int, int]],
    network: Network | None = None,
    objective: str = "latency",
) -> Plan:
    """The predicted figures of a given chain (stage, start, end), first stage first (e.g. the plan in force, by
    the stages' refined capacities and their links now)."""
    stages = [s for s, _, _ in chain]
    return _build(model, stages, range(len(chain)), [b - a for _, a, b in chain], network or Network(), objective)


def _even(model: ModelShape, stages: Sequence[StageCapacity], net: Network, objective: str) -> Alternative:
    n, L = len(stages), model.num_layers
    label = f"even split over all {n} stages"
    if n > L:
        return Alternative(label, None, f"more stages than the model's {L} layers")
    counts = [L // n + (1 if j < L % n else 0) for j in range(n)]
    for j, (s, c) in enumerate(zip(stages, counts, strict=True)):
        if not fits(model, s, c, j == 0, j == n - 1):
            return Alternative(label, None, f"{s.name}'s memory does not hold {c} layers")
    return Alternative(label, _build(model, stages, range(n), counts, net, objective))


def place(
    model: ModelShape,
    stages: Sequence[StageCapacity],
    network: Network | None = None,
    objective: str = "latency",
) -> Plan:
    """The best plan for the objective ("latency": the shortest ring for one session, single-node first;
    "throughput": the smallest bottleneck), with the alternatives it was chosen over; PlacementError when nothing
    fits."""
    if objective not in OBJECTIVES:
        raise PlacementError(f"unknown objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    if model.num_layers <= 0:
        raise PlacementError(f"the model has no layers ({model.num_layers})")
    if not stages:
        raise PlacementError("no stages to place the model on yet")
    if len({s.name for s in stages}) != len(stages):
        raise PlacementError("stage names must be distinct")
    net = network or Network()
    best = _search(model, stages, net, objective)
    if best is None:
        raise PlacementError(_not_enough_memory(model, stages))
    plan = _build(model, stages, *best, net, objective)
    alternatives = []
    other = "throughput" if objective == "latency" else "latency"
    found = _search(model, stages, net, other)
    if found is not None:
        alt = _build(model, stages, *found, net, objective)
        if alt.ranges() != plan.ranges():
            label = "most tokens/s of pipelined sessions" if other == "throughput" else "fastest single session"
            alternatives.append(Alternative(label, alt))
    even = _even(model, stages, net, objective)
    same = [i for i, a in enumerate(alternatives) if even.plan is not None and a.plan.ranges() == even.plan.ranges()]
    if same:  # one alternative under both names
        alternatives[same[0]] = replace(alternatives[same[0]], label=f"{alternatives[same[0]].label} = {even.label}")
    elif even.plan is None or even.plan.ranges() != plan.ranges():
        alternatives.append(even)
    if len(plan.assignments) > 1:
        singles = [
            (alt.ring_s, alt)
            for i in range(len(stages))
            if (c := _solve_chain(model, stages, [i], [0.0], "latency")) is not None
            for alt in [_build(model, stages, [i], c, net, objective)]
        ]
        if singles:
            alternatives.append(Alternative("one stage", min(singles, key=lambda t: t[0])[1]))
        else:
            alternatives.append(Alternative("one stage", None, "no stage's memory holds the whole model"))
    return replace(plan, alternatives=tuple(alternatives))


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
