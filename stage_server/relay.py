"""Relays, on the event loop: what happens to a computed step. It goes on to the next stage over a shared stream
(`downstream.py`), or at the last stage its Result goes to the session's subscriber, and a generation loop's next
step goes back to the first stage (here again, for a one-stage route). Failures travel the other way: a step's
error is answered to the stream it came on, a later stage's refusal is relayed to whoever sent the session's
steps, a broken stream to a later stage fails every session that used it. The per-step metrics (latency, errors
by code) are kept here, where each step ends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from prometheus_client import Counter, Histogram

from layerline.errors import LayerlineError, NotFoundError, UnavailableError
from layerline.grpc_status import code_from_int, status_of
from layerline.stage_server.admission import WorkItem
from layerline.stage_server.config import StageConfig
from layerline.stage_server.downstream import Downstream
from layerline.stage_server.scheduler import Scheduler
from layerline.stage_server.sessions import Session, SessionTable, owns
from layerline.v1 import stage_pb2

logger = logging.getLogger(__name__)

SHUTDOWN = "the stage shut down"


class Relay:
    def __init__(
        self,
        config: StageConfig,
        sessions: SessionTable,
        scheduler: Scheduler,
        admit: Callable[[stage_pb2.Step, asyncio.Queue], WorkItem],
        close: Callable[[str, str], bool],
        label: Callable[[], str],
        step_latency: Histogram,
        step_errors: Counter,
    ) -> None:
        self.config, self.sessions, self.scheduler = config, sessions, scheduler
        self.admit, self.close_session, self.label = (
            admit,
            close,
            label,
        )  # the service's: a looped step, a session, its name
        self.step_latency, self.step_errors = step_latency, step_errors
        self.downstreams: dict[str, Downstream] = {}
        self.steps_done = 0
        self.peak_results = 0  # the most results one subscriber has been behind

    async def close_links(self) -> None:
        for d in self.downstreams.values():
            await d.close()

    def forget(self, session: Session) -> None:
        """A closed session's id at the next stage is no longer sent to."""
        if session.next_address in self.downstreams:
            self.downstreams[session.next_address].forget(session.next_session_id)

    def dispatch(self, item: WorkItem, out: stage_pb2.Step | stage_pb2.Result | None, error: Exception | None) -> None:
        """On the event loop, in step order: hand a computed step on (or its failure back)."""
        if error is None and item.session.closed:  # closed while the step waited or ran: its sender must hear of it
            error = closed_error(item.session)
        if error is not None:
            if not isinstance(error, LayerlineError):
                logger.error(
                    "step %d of session %s failed",
                    item.step.seq,
                    item.session.id[:8],
                    exc_info=error,
                    extra={"session": item.session.id[:8], "stage": self.label()},
                )
            item.replies.put_nowait(self.reply(item.step.session_id, item.step.seq, error, key=item.step.client_key))
        elif out is not None:
            self.steps_done += 1
            self.step_latency.observe(time.perf_counter() - item.admitted)
            if isinstance(out, stage_pb2.Step):
                self.downstream(item.session.next_address).send(out, on_sent=self.scheduler.release)
                return
            if item.session.results.qsize() >= self.config.max_queued_results:
                self.close_session(item.session.id, "its subscriber fell too far behind")
                self.scheduler.release()
                return
            self.peak_results = max(self.peak_results, item.session.results.qsize() + 1)
            if item.follow is not None:
                if item.session.results.qsize() >= self.config.loop_ahead:
                    # the subscriber reads slower than the loop makes tokens: hold the loop's next step back until
                    # it has caught up (Subscribe resumes it), so a slow reader costs no memory and no session
                    item.session.parked = item
                    item.session.results.put_nowait(out)
                else:
                    self.send_follow(item, out)
                    return
            else:
                item.session.results.put_nowait(out)
        self.scheduler.release()

    async def resume(self, session: Session) -> None:
        """A paused loop's subscriber has caught up: its next step goes on (with a slot of its own again)."""
        item, session.parked = session.parked, None
        await self.scheduler.take_slot()
        if session.closed:
            self.scheduler.release()
            return
        self.send_follow(item, None)

    def send_follow(self, item: WorkItem, result: stage_pb2.Result | None) -> None:
        """Last stage, event loop: the loop's next step goes to the first stage (before the result goes to the
        subscriber: the step is on the critical path, the result is not), holding on to the slot of the step that
        produced it. A one-stage route is its own first stage: the step is submitted here again, as a step that
        arrived (computed inline when the stage is idle, else queued for the compute thread), from a callback of its
        own so that the loop serves every other stream and the subscriber between two tokens."""
        follow, session = item.follow, item.session
        if follow.session_id != session.id:
            self.downstream(item.follow_address).send(follow, on_sent=self.scheduler.release)
            publish(session, result)
            return
        try:
            nxt = self.admit(follow, item.replies)
        except LayerlineError as e:
            publish(session, result)
            code, message = status_of(e)
            self.loop_failed(session, code, message, self.label())
            self.scheduler.release()
            return
        asyncio.get_running_loop().call_soon(self.scheduler.submit, nxt)
        publish(session, result)

    def downstream(self, address: str) -> Downstream:
        d = self.downstreams.get(address)
        if d is None:
            d = Downstream(
                address,
                self.config.max_message_bytes,
                self._on_downstream_reply,
                self._on_downstream_failure,
                self.config.security,
            )
            self.downstreams[address] = d
        return d

    def reply(
        self, session_id: str, seq: int, exc: BaseException | None = None, code=None, message: str = "", key: str = ""
    ) -> stage_pb2.PushReply:
        if exc is not None:
            code, message = status_of(exc)
        self.step_errors.labels(code.name).inc()
        return stage_pb2.PushReply(
            session_id=session_id, seq=seq, code=code.value[0], message=message, stage=self.label(), client_key=key
        )

    def _upstream_of(self, next_session_id: str, key: str) -> Session | None:
        """The session that sent the step a later stage answered: the one sending to that id, of the same client
        (another client's session may name the same next id: its steps are refused there, and the refusal is for
        that client only)."""
        return self.sessions.find(lambda s: s.next_session_id == next_session_id and owns(s, key))

    def _looping_to(self, first_id: str, key: str) -> Session | None:
        return self.sessions.find(lambda s: s.loop is not None and s.loop.first_id == first_id and owns(s, key))

    def _on_downstream_reply(self, reply: stage_pb2.PushReply) -> None:
        """A later stage rejected a step: pass it back to whoever sent us the session's steps."""
        session = self._upstream_of(reply.session_id, reply.client_key)
        if session is not None and session.reply_to is not None:
            relayed = stage_pb2.PushReply()
            relayed.CopyFrom(reply)
            relayed.session_id = session.id
            session.reply_to.put_nowait(relayed)
        elif (looping := self._looping_to(reply.session_id, reply.client_key)) is not None:
            self.loop_failed(looping, code_from_int(reply.code), reply.message, reply.stage)

    def _on_downstream_failure(self, next_session_ids: set[str], message: str) -> None:
        """The stream to a later stage broke: every session that sent steps on it hears of it."""
        for s in self.sessions.all():
            if s.next_session_id in next_session_ids and s.reply_to is not None:
                s.reply_to.put_nowait(
                    self.reply(s.id, 0, code=grpc.StatusCode.UNAVAILABLE, message=message, key=s.owner)
                )
            elif s.loop is not None and s.loop.first_id in next_session_ids:
                self.loop_failed(s, grpc.StatusCode.UNAVAILABLE, message, self.label())

    def loop_failed(self, session: Session, code: grpc.StatusCode, message: str, stage: str) -> None:
        """A loop step failed past this stage: the loop ends and the subscriber is told why."""
        loop, session.loop = session.loop, None
        if loop is not None and not session.closed:
            put_latest(
                session.results,
                stage_pb2.Result(seq=loop.seq, done=True, code=code.value[0], message=message, stage=stage),
            )


def publish(session: Session, result: stage_pb2.Result | None) -> None:
    if result is not None:
        session.results.put_nowait(result)


def closed_error(session: Session) -> LayerlineError:
    """What a step or subscriber of a closed session is told: UNAVAILABLE when the stage is shutting down (the
    client may go elsewhere), NOT_FOUND otherwise."""
    if session.close_reason == SHUTDOWN:
        return UnavailableError(f"session closed: {SHUTDOWN}")
    return NotFoundError(f"session closed: {session.close_reason}")


def put_latest(queue: asyncio.Queue, item: object) -> None:
    """Put without waiting, dropping the oldest entry if the queue is full."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)
