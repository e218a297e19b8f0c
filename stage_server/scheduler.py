"""The scheduler: when and where an admitted step is computed, and how steps of different sessions share a forward
pass. Two threads meet here. On the event loop: `submit` (a step of an idle stage that takes less than
`inline_compute_s` is computed right there; any other goes into the compute thread's queue), the slots that bound
the steps in flight (`take_slot` / `release`: flow control up the chain), and the dispatch of what the compute
thread hands back. On the compute thread (`_run`): steps in arrival order, decode steps of different sessions that
wait together (and those a previous stage announced with `Step.burst`) gathered into one pass, and each step of a
pass told how many more go to the same next stage (`mark_bursts`). The counters are written by the thread that
computed the pass and read by Info and the metrics."""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import Callable

from prometheus_client import Histogram

from layerline.model import StageModel
from layerline.stage_server.admission import WorkItem
from layerline.stage_server.compute import StepCompute
from layerline.stage_server.config import StageConfig
from layerline.stage_server.sessions import Session
from layerline.v1 import stage_pb2

INLINE_POSITIONS = 8  # a step of at most this many positions may be computed inline (see submit)
INLINE_ALONE_S = 0.05  # ... when no other session has stepped here for this long

Dispatch = Callable[[WorkItem, "stage_pb2.Step | stage_pb2.Result | None", "Exception | None"], None]


class Scheduler:
    def __init__(
        self,
        config: StageConfig,
        compute: StepCompute,
        dispatch: Dispatch,
        current_model: Callable[[], StageModel | None],
        pass_seconds: Histogram,
    ) -> None:
        self.config, self.compute, self.dispatch = config, compute, dispatch
        self.current_model = current_model  # the layers new sessions get (a decode step on them refines capacity)
        self.pass_seconds = pass_seconds
        # steps travel loop -> compute thread through a plain thread-safe queue and come back with one
        # call_soon_threadsafe: the cheapest hand-off there is (an executor adds futures and callbacks per step)
        self._inbox: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="layerline-compute", daemon=True)
        self._slots: asyncio.Semaphore | None = None  # steps admitted and not yet sent on (flow control)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.in_flight = 0
        self.peak_in_flight = 0  # the most steps admitted and not yet passed on, at once
        self._queued = 0  # steps handed to the compute thread whose results were not dispatched yet
        self._decode_pass: float | None = None  # seconds per decode step here, lately (None: none computed yet)
        self.inline_steps = 0  # steps computed on the event loop (see submit)
        self.decode_steps = 0  # one-row decode steps computed alone, and their compute (wall) seconds
        self.decode_seconds = 0.0
        self._last_session: Session | None = None  # the session of the latest step submitted, and since when
        self._switched = 0.0
        self.compute_seconds = 0.0  # time computing steps
        self.steps_computed = 0
        self.tokens_computed = 0  # token positions computed (rows x tokens of every step)
        self.batched_steps = 0  # of which ran in a forward pass shared with other sessions' steps

    def start(self) -> None:
        """On the event loop the dispatches will run on."""
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.config.max_queued_steps)
        self._thread.start()

    async def close(self) -> None:
        """The compute thread ends after the steps queued before this; joined."""
        self._inbox.put(None)
        await asyncio.to_thread(self._thread.join)

    def submit(self, item: WorkItem) -> None:
        """Hand an admitted step to the compute thread; or, when the stage is idle and the step is a decode step that
        takes less than `inline_compute_s` here (a small model, a fast device), compute it on the event loop right
        away: the two thread hand-offs (queue in, callback back) would cost more than the step, and with nothing
        else queued there is nothing for the loop to overlap with it meanwhile. Not while other sessions step too
        (their steps are better batched together on the compute thread). Steps of a session stay in order: a step
        is only computed inline when no earlier step is queued, computing or waiting to be dispatched."""
        limit = self.config.inline_compute_s
        now = time.monotonic()
        previous = self._last_session
        if item.session is not previous:
            if previous is not None and not previous.closed:  # another open session steps here too
                self._switched = now
            self._last_session = item.session
        if (
            limit > 0
            and self._queued == 0
            and now - self._switched > INLINE_ALONE_S
            and self._decode_pass is not None
            and self._decode_pass < limit
            and item.positions.numel() <= INLINE_POSITIONS
            and not item.step.burst
            and not item.step.propose  # a draft's proposals first (drafting.py): not on the event loop
        ):
            began = time.perf_counter()
            out, error = self.compute.one(item)
            self.account([item], time.perf_counter() - began)
            self.inline_steps += 1
            self.dispatch(item, out, error)
            return
        self._queued += 1
        self._inbox.put(item)

    def account(self, batch: list[WorkItem], took: float) -> None:
        """Bookkeeping of one forward pass (compute thread, or the loop for a step computed inline)."""
        self.compute_seconds += took
        self.pass_seconds.observe(took)
        self.steps_computed += len(batch)
        positions = sum(it.positions.numel() for it in batch)
        self.tokens_computed += positions
        if len(batch) == 1 and positions == 1 and batch[0].session.model is self.current_model():
            # a one-row decode step on the layers served now, as capacity is measured: the coordinator refines its
            # figures for this stage from these
            self.decode_steps += 1
            self.decode_seconds += took
        if positions <= INLINE_POSITIONS * len(batch):  # decode steps: what deciding to compute inline needs
            per_step = took / len(batch)
            self._decode_pass = per_step if self._decode_pass is None else 0.8 * self._decode_pass + 0.2 * per_step

    def _dispatch_queued(self, item: WorkItem, out, error) -> None:
        self._queued -= 1
        self.dispatch(item, out, error)

    async def take_slot(self) -> None:
        await self._slots.acquire()
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        self._slots.release()

    def _run(self) -> None:
        """Steps in arrival order. Decode steps of different sessions that are waiting at the same time run as one
        batched forward pass (`StageModel.forward_many`); everything else, one step at a time."""
        pending: list[WorkItem] = []
        while True:
            item = pending.pop(0) if pending else self._inbox.get()
            if item is None:
                return
            batch = [item]
            if self.config.max_batch > 1 and self.batchable(item):
                self.gather(batch, pending)
            began = time.perf_counter()
            results = self.compute.batch(batch) if len(batch) > 1 else [self.compute.one(item)]
            self.account(batch, time.perf_counter() - began)
            if len(batch) > 1:
                self.batched_steps += len(batch)
                self.mark_bursts(batch, results)
            for it, (out, error) in zip(batch, results, strict=True):
                self._loop.call_soon_threadsafe(self._dispatch_queued, it, out, error)

    def gather(self, batch: list[WorkItem], pending: list[WorkItem]) -> None:
        """Add to `batch` the batchable steps waiting now, and those announced by `Step.burst` that are on their
        way (for up to `batch_wait` seconds): the steps one pass computed reach the next stage as separate messages
        a fraction of a millisecond apart, and a stage that took the first alone would split the group. A step that
        cannot join goes to `pending` (it runs after the batch: order is kept)."""
        expect, deadline = batch[0].step.burst, None
        while len(batch) < self.config.max_batch:
            try:
                if expect <= 0 or self.config.batch_wait <= 0:
                    nxt = self._inbox.get_nowait()
                else:
                    if deadline is None:
                        deadline = time.perf_counter() + self.config.batch_wait
                    nxt = self._inbox.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                return
            if nxt is None or not self.batchable(nxt, batch):
                pending.append(nxt)
                return
            batch.append(nxt)
            expect = nxt.step.burst if nxt.step.burst else expect - 1

    @staticmethod
    def mark_bursts(batch: list[WorkItem], results: list[tuple]) -> None:
        """Compute thread, after a pass: tell each step this pass sends on how many more go to the same stage right
        after it (`Step.burst`), so that the receiver can batch them again."""
        outgoing = []
        for it, (out, error) in zip(batch, results, strict=True):
            if error is not None or out is None:
                continue
            if isinstance(out, stage_pb2.Step):
                outgoing.append((it.session.next_address, out))
            elif it.follow is not None:
                outgoing.append((it.follow_address, it.follow))
        left = collections.Counter(address for address, _ in outgoing)
        for address, step in outgoing:
            left[address] -= 1
            step.burst = left[address]

    @staticmethod
    def batchable(item: WorkItem, batch: list[WorkItem] | None = None) -> bool:
        """A one-token step that may share a forward pass with the `batch` so far: same model, same kind of output,
        another session, nothing to truncate first."""
        step = item.step
        if item.session.closed or item.x.shape[1] != 1 or step.HasField("truncate") or item.targets is not None:
            return False
        if not batch:
            return True
        head = batch[0]
        return (
            item.session.model is head.session.model
            and step.sample == head.step.sample
            and all(item.session is not b.session for b in batch)
        )
