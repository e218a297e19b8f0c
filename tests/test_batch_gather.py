"""How a stage's compute thread gathers decode steps of different sessions into one pass: what waits in its queue
now, and the steps a previous stage announced with `Step.burst` (the rest of the batch it computed in one pass,
sent as separate messages), for a bounded time."""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import torch

from layerline.stage_server.scheduler import Scheduler
from layerline.v1 import stage_pb2


def _item(model: object, burst: int = 0, width: int = 1) -> SimpleNamespace:
    session = SimpleNamespace(closed=False, model=model)
    step = stage_pb2.Step(sample=True, burst=burst)
    return SimpleNamespace(step=step, session=session, x=torch.zeros(1, width), targets=None)


def _gatherer(batch_wait: float, max_batch: int = 16) -> SimpleNamespace:
    return SimpleNamespace(
        _inbox=queue.SimpleQueue(),
        config=SimpleNamespace(batch_wait=batch_wait, max_batch=max_batch),
        batchable=Scheduler.batchable,
    )


def _later(q: queue.SimpleQueue, items: list, every: float) -> threading.Thread:
    def run() -> None:
        for it in items:
            time.sleep(every)
            q.put(it)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_announced_steps_are_waited_for_and_join_the_batch():
    model = object()
    g = _gatherer(batch_wait=5.0)
    first, second, third = _item(model, burst=2), _item(model, burst=1), _item(model, burst=0)
    feeder = _later(g._inbox, [second, third], every=0.03)
    batch, pending = [first], []
    began = time.perf_counter()
    Scheduler.gather(g, batch, pending)
    took = time.perf_counter() - began
    feeder.join(5)
    assert batch == [first, second, third] and pending == []
    assert 0.04 < took < 1.0  # waited for the two on their way, and no longer than that


def test_a_step_that_never_comes_costs_at_most_the_wait():
    g = _gatherer(batch_wait=0.05)
    batch, pending = [_item(object(), burst=3)], []
    began = time.perf_counter()
    Scheduler.gather(g, batch, pending)
    assert len(batch) == 1 and pending == []
    assert 0.04 < time.perf_counter() - began < 1.0


def test_without_a_burst_only_what_waits_now_joins():
    model = object()
    g = _gatherer(batch_wait=5.0)
    waiting = _item(model)
    g._inbox.put(waiting)
    feeder = _later(g._inbox, [_item(model)], every=0.2)
    batch, pending = [_item(model)], []
    Scheduler.gather(g, batch, pending)
    assert batch[1:] == [waiting]  # a wait would have taken the step fed 0.2 s later too
    feeder.join(5)


def test_a_step_that_cannot_join_ends_the_batch_and_keeps_its_place():
    model = object()
    g = _gatherer(batch_wait=5.0, max_batch=8)
    prefill, after = _item(model, width=5), _item(model)
    g._inbox.put(prefill)
    g._inbox.put(after)
    batch, pending = [_item(model, burst=2)], []
    Scheduler.gather(g, batch, pending)
    assert len(batch) == 1 and pending == [prefill]  # `after` stays queued behind the prefill
    assert g._inbox.get_nowait() is after


def test_bursts_count_the_steps_that_follow_to_the_same_stage():
    def done(address: str) -> tuple[SimpleNamespace, tuple]:
        out = stage_pb2.Step()
        return SimpleNamespace(session=SimpleNamespace(next_address=address), follow=None), (out, None)

    pairs = [done("a:1"), done("b:2"), done("a:1"), done("a:1")]
    failed = (SimpleNamespace(session=SimpleNamespace(next_address="a:1"), follow=None), (None, ValueError("bad")))
    pairs.insert(1, failed)
    batch, results = [p[0] for p in pairs], [p[1] for p in pairs]
    Scheduler.mark_bursts(batch, results)
    bursts = [out.burst for out, error in results if error is None]
    assert bursts == [2, 0, 1, 0]
    # the last stage of a generation loop: the loop's next steps go to the first stage
    follows = [stage_pb2.Step() for _ in range(3)]
    batch = [SimpleNamespace(session=None, follow=f, follow_address="first:1") for f in follows]
    Scheduler.mark_bursts(batch, [(stage_pb2.Result(), None)] * 3)
    assert [f.burst for f in follows] == [2, 1, 0]
