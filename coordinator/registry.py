"""The coordinator's state: registered stages, their heartbeats, the plan in force and the route clients get.
Plain bookkeeping with an injected clock, no gRPC (the servicer in `service.py` wraps it).

Rules (the coordinator is never on the token path, and its state is soft):
- A stage registers with its measured capacity and what it serves now, and heartbeats every `heartbeat_s`; one
  that misses `miss_limit` heartbeats is dropped. A stage registering again from the same address replaces its old
  entry.
- Plans optimise the registry's `objective` (placement.py: "latency", one session's time per token around the
  ring, single-node first; or "throughput", the bottleneck of pipelined sessions). Plans change only when
  membership does: a stage of the plan dropped (a new plan is made at once), or a stage joined and a new plan would
  be at least `min_gain` better by the objective. A new plan gets the next version;
  each stage learns its new range from its next heartbeat.
- The first plan waits `settle_s` after the first registration (or for `expected_stages`), so that stages starting
  together are placed together. After a coordinator restart the stages register again with the ranges they serve:
  when those form a whole chain it is adopted as the plan as it is, so running sessions are not disturbed; until
  then (for up to `miss_limit` heartbeats) nothing is planned.
- Stages the plan leaves out become replicas: each copies a span of the plan that fits its memory (the span with
  the fewest copies, then the slowest). When a stage of the plan is dropped and a ready replica serves its span,
  the replica takes its place (nothing is loaded; a fresh plan follows only if it is `min_gain` faster); without
  one, the coordinator re-plans.
- Capacity is refined under load: a stage heartbeats how many one-row decode steps it computed and how long they
  took (wall time, so a CPU quota's throttling and other processes on the box show). Over windows of at least
  `observe_steps` steps the coordinator compares that with what the stage's measured capacity predicts for what it
  serves, and keeps the ratio (its load factor, smoothed, at least 1: slower than it measured alone is real, faster
  is a lightly loaded stage that a plan must not count on) on the measured figures. Planning,
  predictions and routes use the measured figures times the factor. At most every `refine_s` seconds, when a
  fresh plan from the refined figures is at least `min_gain` better than the plan in force (also judged by the
  refined figures), it is installed like a plan for a join.
- Links: each stage measures its links to the others (the coordinator names them in its heartbeat answers) and
  heartbeats them; plans weigh each hop's latency and the hidden state's bytes over its bandwidth, and choose the
  chain's order. New link figures are a refinement like the load factor (at most every `refine_s`).
- Measured pace: a chain's first stage heartbeats its server-loop rounds (one token of one session back at the
  first stage) and its prompts (first chunk in to first token back) with the time they took; the coordinator keeps
  the rate of the last window of each, which status shows next to the prediction.
- The route is the fastest chain of ready stages by what they serve now (the plan's, once its stages have loaded
  their ranges; until then the chain they still serve), each stage's predicted time weighted by the sessions it
  already has, so that new sessions spread over replica chains - the coordinator never sends clients to a stage
  that is still loading.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

from layerline.config import ModelConfig
from layerline.coordinator.placement import (
    OBJECTIVES,
    Link,
    ModelShape,
    Network,
    PlacementError,
    Plan,
    StageCapacity,
    WeightBytes,
    assign_replicas,
    chain_plan,
    place,
    stage_cost,
)
from layerline.errors import AbortedError, BadInputError, FailedPreconditionError, NotFoundError


@dataclass
class StageEntry:
    id: str
    address: str
    capacity: StageCapacity  # name = id
    info: dict[str, object]  # device, dtype, threads, version... as reported (for status)
    serving: tuple[int, int]  # layers served now; (0, 0) = none
    ready: bool
    last_seen: float
    open_sessions: int = 0
    kv_bytes_used: int = 0
    kv_blocks: tuple[int, int, int] = (0, 0, 0)  # the paged KV cache's blocks: total, used, cached
    weight_bytes: int = 0  # from its heartbeats: weights held ...
    resident_bytes: int = 0  # ... and its process's resident memory
    device_memory: tuple[int, int] = (0, 0)  # ... and what it holds on its device, of the device's total
    assignment: tuple[int, int] = (0, 0)
    assigned_version: int = 0
    replica: bool = False  # its assignment copies a plan stage's span (it is not in the plan's chain)
    measured: StageCapacity | None = None  # as the stage measured itself; `capacity` = measured x load_factor
    load_factor: float = 1.0  # observed / predicted decode time per step under load (1: not observed yet)
    observed: tuple[int, float] | None = None  # the decode counters (steps, seconds) of the last observation
    factor_seen: bool = False  # load_factor comes from an observation
    links: dict[str, Link] = field(default_factory=dict)  # to other stages, by their address, as it measured them
    pace: tuple[int, float, int, float] = (0, 0.0, 0, 0.0)  # its last pace counters (rounds, s, prompt tokens, s)
    decode_rate: float = 0.0  # tokens/s of one session at this first stage, over the last window (0: none) ...
    prefill_rate: float = 0.0  # ... and prompt tokens/s ...
    paced_at: tuple[float, float] = (-math.inf, -math.inf)  # ... measured then (registry clock)

    @property
    def held(self) -> tuple[int, int]:
        """The span it holds or is loading: its assignment, else what it serves (after a coordinator restart)."""
        return self.assignment if self.assignment != (0, 0) else self.serving


@dataclass
class RouteChoice:
    stage_ids: list[str]
    addresses: list[str]
    boundaries: list[int]
    plan_version: int


@dataclass
class Registry:
    model: ModelShape
    fingerprint: str
    heartbeat_s: float = 2.0
    miss_limit: int = 3
    min_gain: float = 0.05
    settle_s: float = 4.0  # the first plan waits this long after the first registration (others may be on the way)
    expected_stages: int = 0  # ... or until this many have registered (0: unknown)
    clock: Callable[[], float] = time.monotonic
    stages: dict[str, StageEntry] = field(default_factory=dict)
    plan: Plan | None = None
    plan_version: int = 0
    problem: str = ""  # why there is no plan (no stages, not enough memory)
    settle_until: float | None = None  # no plan before this (see settle_s)
    observe_steps: int = 32  # decode steps a load-factor observation needs at least
    refine_s: float = 30.0  # seconds between re-plans from refined capacities, at least (0: never refine)
    last_refined: float = 0.0
    objective: str = "latency"  # what plans optimise (placement.OBJECTIVES)
    pace_rounds: int = 8  # server-loop rounds a measured decode rate needs at least

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    # ---- membership ----------------------------------------------------------------------------------------------

    def register(
        self,
        address: str,
        fingerprint: str,
        capacity: StageCapacity,
        serving: tuple[int, int] = (0, 0),
        **info: object,
    ) -> StageEntry:
        if not address or ":" not in address:
            raise BadInputError(f"the stage's address must be host:port, got {address!r}")
        if fingerprint != self.fingerprint:
            raise FailedPreconditionError(
                f"the stage at {address} serves another model (fingerprint {fingerprint or 'none'}) than this "
                f"coordinator ({self.fingerprint}): start it with the same checkpoint"
            )
        _check_capacity(capacity)
        L = self.model.num_layers
        if serving != (0, 0) and not 0 <= serving[0] < serving[1] <= L:
            raise BadInputError(f"serving range {serving[0]}:{serving[1]} is not within the model's {L} layers")
        self.expire()
        for old in [s.id for s in self.stages.values() if s.address == address]:
            del self.stages[old]  # the same stage, restarted
        sid = secrets.token_hex(8)
        measured = StageCapacity(**{**capacity.__dict__, "name": sid})
        entry = StageEntry(
            id=sid,
            address=address,
            capacity=measured,
            measured=measured,
            info=info,
            serving=serving,
            ready=serving != (0, 0),
            last_seen=self.clock(),
        )
        self.stages[sid] = entry
        if self.plan is None:
            if self._adopt():
                return entry
            now = self.clock()
            if self.settle_until is None:
                # stages that already serve layers say the coordinator restarted: give the rest of the running
                # chain time to register again before planning afresh
                wait = self.heartbeat_s * self.miss_limit if serving != (0, 0) else self.settle_s
                self.settle_until = now + wait
            if now < self.settle_until and not (self.expected_stages and len(self.stages) >= self.expected_stages):
                self.problem = "waiting for more stages to register"
                return entry
        self._replan(joined=True)
        return entry

    def heartbeat(
        self,
        stage_id: str,
        serving: tuple[int, int],
        ready: bool,
        open_sessions: int = 0,
        kv_bytes_used: int = 0,
        decode_steps: int = 0,
        decode_seconds: float = 0.0,
        weight_bytes: int = 0,
        resident_bytes: int = 0,
        device_memory: tuple[int, int] = (0, 0),
        kv_blocks: tuple[int, int, int] = (0, 0, 0),
        links: dict[str, Link] | None = None,
        pace: tuple[int, float, int, float] = (0, 0.0, 0, 0.0),
    ) -> StageEntry:
        self.expire()
        entry = self.stages.get(stage_id)
        if entry is None:
            raise NotFoundError(f"stage {stage_id!r} is not registered here (the coordinator restarted?): register")
        L = self.model.num_layers
        if serving != (0, 0) and not 0 <= serving[0] < serving[1] <= L:
            raise BadInputError(f"serving range {serving[0]}:{serving[1]} is not within the model's {L} layers")
        if not (decode_steps >= 0 and math.isfinite(decode_seconds) and decode_seconds >= 0):
            raise BadInputError("decode_steps and decode_seconds must be non-negative counters")
        if min(weight_bytes, resident_bytes, kv_bytes_used, *device_memory, *kv_blocks) < 0:
            raise BadInputError("memory figures must not be negative")
        if not all(math.isfinite(x) and x >= 0 for x in pace):
            raise BadInputError("pace counters must be finite and non-negative")
        for address, link in (links or {}).items():
            if not (0 <= link.rtt_s < 600 and 0 <= link.bytes_per_s < 1e15):  # also NaN
                raise BadInputError(f"link to {address}: rtt_s and bytes_per_s must be finite and non-negative")
        if serving != entry.serving:
            entry.observed = None  # other layers: observe afresh
        entry.serving, entry.ready = serving, ready and serving != (0, 0)
        entry.open_sessions, entry.kv_bytes_used = open_sessions, kv_bytes_used
        entry.weight_bytes, entry.resident_bytes = weight_bytes, resident_bytes
        entry.device_memory, entry.kv_blocks = device_memory, kv_blocks
        entry.last_seen = self.clock()
        self._pace(entry, pace)
        moved = links is not None and _links_moved(entry.links, links)
        if links is not None:
            entry.links = dict(links)
        if self._observe(entry, decode_steps, decode_seconds) or moved:
            self._refine()
        return entry

    def _pace(self, entry: StageEntry, pace: tuple[int, float, int, float]) -> None:
        """The rates of the window since the last heartbeat that brought enough rounds (or a prompt)."""
        rounds, spent, tokens, prefill = pace
        last = entry.pace
        if rounds < last[0] or tokens < last[2]:  # a restarted stage
            entry.pace = pace
            return
        n, s = rounds - last[0], spent - last[1]
        t, p = tokens - last[2], prefill - last[3]
        now = self.clock()
        if n >= self.pace_rounds and s > 0:
            entry.decode_rate, entry.paced_at = n / s, (now, entry.paced_at[1])
            entry.pace = (rounds, spent, *entry.pace[2:])
        if t > 0 and p > 0:
            entry.prefill_rate, entry.paced_at = t / p, (entry.paced_at[0], now)
            entry.pace = (*entry.pace[:2], tokens, prefill)

    def peers(self, stage_id: str) -> list[str]:
        """The addresses a stage should measure its links to: every other stage."""
        return sorted(s.address for s in self.stages.values() if s.id != stage_id)

    def network(self) -> Network:
        """The links the stages measured, by stage id."""
        ids = {s.address: s.id for s in self.stages.values()}
        links = {
            (s.id, ids[address]): link
            for s in self.stages.values()
            for address, link in s.links.items()
            if address in ids and ids[address] != s.id
        }
        return Network(links, self.model.hidden_size)

    def _observe(self, entry: StageEntry, steps: int, seconds: float) -> bool:
        """Fold a heartbeat's decode counters into the stage's load factor; True when it changed."""
        last = entry.observed
        if last is None or steps < last[0] or not entry.ready:  # first sight, a restarted stage, or loading
            entry.observed = (steps, seconds)
            return False
        n, spent = steps - last[0], seconds - last[1]
        if n < self.observe_steps:
            return False
        entry.observed = (steps, seconds)
        a, b = entry.serving
        L = self.model.num_layers
        predicted = stage_cost(entry.measured, b - a, a == 0, b == L) if entry.measured is not None else 0.0
        if predicted <= 0 or spent <= 0:
            return False
        # never below 1: capacity is measured flat out, which is what the bottleneck stage of a full pipeline sees; a
        # stage that idles part of the time can look faster than that (a CPU quota's unused budget, a turbo clock)
        # and would be overloaded by a plan trusting it; slower than measured is real (another job on its box)
        ratio = min(max((spent / n) / predicted, 1.0), 4.0)
        entry.load_factor = 0.5 * entry.load_factor + 0.5 * ratio if entry.factor_seen else ratio
        entry.factor_seen = True
        m = entry.measured
        entry.capacity = replace(
            m,
            decode_s_per_layer=m.decode_s_per_layer * entry.load_factor,
            head_decode_s=m.head_decode_s * entry.load_factor,
            fixed_s=m.fixed_s * entry.load_factor,
            prefill_s_per_layer=m.prefill_s_per_layer * entry.load_factor,
        )
        return True

    def _refine(self) -> None:
        """Install a fresh plan when the refined capacities make it `min_gain` faster (at most every refine_s)."""
        now = self.clock()
        if self.plan is None or self.refine_s <= 0 or now - self.last_refined < self.refine_s:
            return
        if not all(a.name in self.stages for a in self.plan.assignments):
            return  # a dead stage's replacement is under way elsewhere
        try:
            new = self.dry_run()
        except PlacementError:
            return
        if new.ranges() != self.plan.ranges() and new.score() < self.score() * (1 - self.min_gain):
            self.last_refined = now
            self._install(new)

    def current(self) -> Plan | None:
        """The plan in force with its predicted figures by the refined capacities and the links now (None without
        a plan, or while a stage of it is gone)."""
        if self.plan is None or not all(a.name in self.stages for a in self.plan.assignments):
            return None
        chain = [(self.stages[a.name].capacity, a.start, a.end) for a in self.plan.assignments]
        return chain_plan(self.model, chain, self.network(), self.objective)

    def score(self) -> float:
        """What the objective minimises, for the plan in force now (inf: no whole plan)."""
        plan = self.current()
        return plan.score() if plan is not None else math.inf

    def measured(self) -> tuple[float, float]:
        """(decode tokens/s of one session, prefill tokens/s) as last measured at a first stage of the plan's
        chain or of a replica chain (0: none yet)."""
        if self.plan is None:
            return 0.0, 0.0
        span = (self.plan.assignments[0].start, self.plan.assignments[0].end)
        firsts = [s for s in self.stages.values() if s.id == self.plan.assignments[0].name or s.serving == span]
        if not firsts:
            return 0.0, 0.0
        decode = max(firsts, key=lambda s: s.paced_at[0])
        prefill = max(firsts, key=lambda s: s.paced_at[1])
        return decode.decode_rate, prefill.prefill_rate

    def bottleneck(self) -> float:
        """The plan in force's slowest stage per token, by the refined capacities (0 without a plan)."""
        if self.plan is None:
            return 0.0
        L = self.model.num_layers
        costs = [
            stage_cost(self.stages[a.name].capacity, a.layers, a.start == 0, a.end == L)
            for a in self.plan.assignments
            if a.name in self.stages
        ]
        return max(costs, default=0.0)

    def leave(self, stage_id: str) -> bool:
        """A stage leaving on purpose: dropped now, as if it had missed its heartbeats (a replica stands in or the
        plan is made again). False when it was not registered."""
        if stage_id not in self.stages:
            self.expire()
            return False
        self._drop([stage_id])
        return True

    def expire(self) -> list[str]:
        """Drop the stages that missed too many heartbeats (re-planning if the plan used them)."""
        limit = self.heartbeat_s * self.miss_limit
        now = self.clock()
        gone = [sid for sid, s in self.stages.items() if now - s.last_seen > limit]
        self._drop(gone)
        return gone

    def _drop(self, gone: list[str]) -> None:
        now = self.clock()
        for sid in gone:
            del self.stages[sid]
        if gone and self.plan is not None and any(a.name in gone for a in self.plan.assignments):
            if not self._promote_replicas():
                self._replan(joined=False)
        elif (
            self.plan is None and self.stages and (gone or (self.settle_until is not None and now >= self.settle_until))
        ):
            self._replan(joined=False)

    # ---- planning ------------------------------------------------------------------------------------------------

    def dry_run(self) -> Plan:
        """What would be assigned now (PlacementError when nothing fits)."""
        return place(self.model, [s.capacity for s in self._ordered()], self.network(), self.objective)

    def _ordered(self) -> list[StageEntry]:
        return sorted(self.stages.values(), key=lambda s: s.address)

    def _replan(self, joined: bool) -> None:
        try:
            new = self.dry_run()
        except PlacementError as e:
            self.problem = str(e)
            if self.plan is not None and all(a.name in self.stages for a in self.plan.assignments):
                return  # the plan in force still runs; the newcomer simply is not needed
            self.plan = None
            return
        self.problem = ""
        intact = self.plan is not None and all(a.name in self.stages for a in self.plan.assignments)
        if intact and joined and new.score() > self.score() * (1 - self.min_gain):
            self._assign_standby()
            return
        if intact and new.ranges() == self.plan.ranges():  # type: ignore[union-attr]
            return
        self._install(new)

    def _install(self, plan: Plan) -> None:
        before = {s.id: s.held for s in self.stages.values()}
        self.plan = plan
        self.plan_version += 1
        for s in self.stages.values():
            s.assignment, s.assigned_version, s.replica = (0, 0), self.plan_version, False
        for a in plan.assignments:
            self.stages[a.name].assignment = (a.start, a.end)
        self._assign_replicas(before)

    def _assign_standby(self) -> None:
        """A stage joined but the plan stays: it (and any stage without a span) becomes a replica where it fits."""
        for s in self.stages.values():
            if s.assigned_version == 0:
                s.assigned_version = self.plan_version
        self._assign_replicas({s.id: s.assignment for s in self.stages.values()})

    def _assign_replicas(self, held: dict[str, tuple[int, int]]) -> None:
        """Stages outside the plan's chain copy a span of it (`placement.assign_replicas`): failover without a
        reload, and another chain for routes."""
        in_plan = {a.name for a in self.plan.assignments}  # type: ignore[union-attr]
        spare = [s for s in self._ordered() if s.id not in in_plan]
        for sid, span in assign_replicas(self.model, self.plan, [s.capacity for s in spare], held).items():  # type: ignore[arg-type]
            entry = self.stages[sid]
            entry.assignment, entry.replica = span, True
        for s in spare:
            if not s.replica:
                s.assignment = (0, 0)  # standby: its memory holds no span of this plan

    def _promote_replicas(self) -> bool:
        """Stages of the plan are gone: where a ready replica serves the same span, it takes the dead stage's place
        (nothing is loaded, routes go on at once). Then, as for a join, a fresh plan replaces that only if it is at
        least `min_gain` faster. False when some span has no ready replica (the caller re-plans)."""
        plan = self.plan
        assert plan is not None
        L = self.model.num_layers
        used: set[str] = set()
        chain = []
        for a in plan.assignments:
            if a.name in self.stages:
                chain.append((self.stages[a.name].capacity, a.start, a.end))
                continue
            costs = {
                s.id: stage_cost(s.capacity, a.end - a.start, a.start == 0, a.end == L)
                for s in self.stages.values()
                if s.replica and s.ready and s.serving == (a.start, a.end) and s.id not in used
            }
            if not costs:
                return False
            stand_in = min(costs, key=costs.__getitem__)
            used.add(stand_in)
            chain.append((self.stages[stand_in].capacity, a.start, a.end))
        used |= {s.name for s, _, _ in chain}
        promoted = replace(
            chain_plan(self.model, chain, self.network(), self.objective),
            left_out={s.id: "replica" for s in self.stages.values() if s.id not in used},
        )
        self._install(promoted)
        self._replan(joined=True)  # a better plan without the dead stages, if one is worth the reload
        return True

    def _adopt(self) -> bool:
        """No plan yet (a fresh or restarted coordinator): take the chain the stages already serve, if whole."""
        chain = self._fastest_chain(lambda s: s.serving != (0, 0))
        if chain is None:
            return False
        served = [(self.stages[sid].capacity, *self.stages[sid].serving) for sid in chain]
        plan = replace(
            chain_plan(self.model, served, self.network(), self.objective),
            left_out={s.id: "not in the adopted chain" for s in self.stages.values() if s.id not in chain},
        )
        self.problem = ""
        self._install(plan)
        return True

    # ---- routes --------------------------------------------------------------------------------------------------

    def route(self, exclude: Collection[str] = ()) -> RouteChoice:
        """The fastest chain of ready stages, by what they serve now, avoiding the stages at the `exclude`
        addresses (a client found them dead or stalled before their heartbeats stopped)."""
        self.expire()
        chain = self._fastest_chain(lambda s: s.ready and s.address not in exclude)
        if chain is None:
            transient = False  # ABORTED (ask again in a moment) rather than FAILED_PRECONDITION
            if not self.stages:
                why = "no stages have registered yet"
            elif self.problem:
                why = self.problem
            elif self.plan is None:
                why = "no plan yet"
            else:
                missing = self._uncovered(lambda s: s.ready and s.address not in exclude)
                names = ", ".join(f"{a}:{b}" for a, b in missing) or "none"
                loading = self._uncovered(lambda s: s.address not in exclude, lambda s: s.assignment)
                if not missing:  # every layer is served, but the ranges do not chain yet: a re-plan is under way
                    why, transient = "the stages are still loading their layers", True
                elif not loading and not exclude:
                    why, transient = f"the stages are still loading their layers ({names} not served yet)", True
                else:
                    why = f"no ready stage serves layers {names}"
                    if exclude:
                        why += f" (avoiding {', '.join(sorted(exclude))}, found dead or stalled)"
            error = AbortedError if transient else FailedPreconditionError
            raise error(f"no complete chain of ready stages: {why}")
        entries = [self.stages[sid] for sid in chain]
        return RouteChoice(
            chain,
            [s.address for s in entries],
            [entries[0].serving[0]] + [s.serving[1] for s in entries],
            self.plan_version,
        )

    def _uncovered(
        self, usable: Callable[[StageEntry], bool], span: Callable[[StageEntry], tuple[int, int]] | None = None
    ) -> list[tuple[int, int]]:
        """Layer ranges that no usable stage serves (or, with `span`, is meant to)."""
        covered = [False] * self.model.num_layers
        for s in self.stages.values():
            if usable(s):
                for i in range(*(span(s) if span else s.serving)):
                    covered[i] = True
        out: list[tuple[int, int]] = []
        for i, c in enumerate(covered):
            if c:
                continue
            if out and out[-1][1] == i:
                out[-1] = (out[-1][0], i + 1)
            else:
                out.append((i, i + 1))
        return out

    def _fastest_chain(self, usable: Callable[[StageEntry], bool]) -> list[str] | None:
        """Stages whose served ranges chain 0..L, with the smallest predicted time per token given the sessions each
        already has (None: no chain). With replicas, new sessions spread over the chains as they fill up."""
        L = self.model.num_layers
        best: dict[int, tuple[float, list[str]]] = {0: (0.0, [])}
        candidates = sorted((s for s in self.stages.values() if usable(s)), key=lambda s: s.serving)
        for boundary in range(L):
            if boundary not in best:
                continue
            cost, path = best[boundary]
            for s in candidates:
                a, b = s.serving
                if a != boundary or s.id in path:
                    continue
                # a stage busy with k sessions serves a new one's tokens about k + 1 times slower (one step each)
                total = cost + stage_cost(s.capacity, b - a, a == 0, b == L) * (1 + s.open_sessions)
                if b not in best or total < best[b][0]:
                    best[b] = (total, path + [s.id])
        return best[L][1] if L in best else None


def model_shape(config: ModelConfig, stored: dict[str, str] | None = None) -> ModelShape:
    """Parameter counts of one layer, the embedding and the head, from the tensors a checkpoint must hold, and the
    bytes of the quantized weight formats (`stored`: the checkpoint's own tensor types, for a GGUF file)."""
    from layerline.model import expected_tensors  # torch, only here
    from layerline.quant import from_name
    from layerline.quant.layout import model_bytes

    def count(tensors: dict[str, tuple[int, ...]]) -> int:
        total = 0
        for shape in tensors.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    layer = count({k: v for k, v in expected_tensors(config, 0, 1).items() if k.startswith("model.layers.")})
    embed = config.vocab_size * config.hidden_size
    head = config.hidden_size + config.vocab_size * config.hidden_size  # final norm + LM head (tied: a copy)
    quantized = {
        name: WeightBytes(*model_bytes(config, from_name(name), stored)) for name in ("stored", "int8", "int4")
    }
    return ModelShape(
        config.num_layers,
        layer,
        embed,
        head,
        tied=config.tie_word_embeddings,
        quantized=quantized,
        hidden_size=config.hidden_size,
    )


def _links_moved(old: dict[str, Link], new: dict[str, Link]) -> bool:
    """New links, or a round trip (by more than a fifth and a millisecond: a fast link's noise is no news) or a
    bandwidth (by more than a fifth) that changed: worth a look at the plan."""
    if set(old) != set(new):
        return True

    def far(a: float, b: float, floor: float = 0.0) -> bool:
        return abs(a - b) > max(0.2 * max(a, b), floor)

    return any(far(old[k].rtt_s, new[k].rtt_s, 1e-3) or far(old[k].bytes_per_s, new[k].bytes_per_s) for k in new)


def _check_capacity(c: StageCapacity) -> None:
    numbers = {
        "decode_s_per_layer": c.decode_s_per_layer,
        "head_decode_s": c.head_decode_s,
        "send_s": c.send_s,
        "prefill_s_per_layer": c.prefill_s_per_layer,
        "bytes_per_param": c.bytes_per_param,
    }
    for name, value in numbers.items():
        if not (value >= 0 and value < 1e6):  # also rejects NaN
            raise BadInputError(f"capacity: {name} must be a finite non-negative number, got {value}")
    if c.decode_s_per_layer <= 0 or c.bytes_per_param <= 0:
        raise BadInputError("capacity: decode_s_per_layer and bytes_per_param must be positive (measured)")
    if c.memory_bytes < 0 or c.kv_bytes < 0:
        raise BadInputError("capacity: memory figures must not be negative")
