"""Sessions on one stage: unguessable ids, the KV cache each holds, the stage's KV memory budget, and expiry.

`SessionTable` is plain bookkeeping, usable and tested without a network: it admits a session only if its KV
cache fits what is left of the budget (refusing with a message saying how much was asked and how much is free),
frees the cache the moment a session is closed, and names the sessions idle for longer than the TTL. Each session
belongs to the client key it was opened with (`owner`): a lookup with another key is refused, and a client holds at
most `max_per_owner` sessions. What a session's steps do is the servicer's business (`service.py`).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from layerline.errors import NotFoundError, PermissionDeniedError, ResourceExhaustedError
from layerline.kv_cache import KVCache
from layerline.paged_kv import PagedCache
from layerline.sampling import SamplingParams
from layerline.speculate import AdaptiveK
from layerline.stage_server.pace import Track
from layerline.v1 import stage_pb2

if TYPE_CHECKING:
    from layerline.draft import DraftState
    from layerline.model import StageModel
    from layerline.stage_server.admission import WorkItem


@dataclass
class Sampler:
    """The last stage's sampling state for one session: settings, the generation's seed and how many sampling steps
    it took (`draw_generator`), and the token history per row."""

    params: SamplingParams
    seed: int
    history: list[list[int]]
    draws: int = 0


@dataclass
class LoopState:
    """The last stage's generation loop for one session (see `Loop` in stage.proto)."""

    address: str  # the first stage
    first_id: str  # the session's id there
    stop_ids: frozenset[int]
    remaining: dict[int, int]  # tokens each running row may still sample
    seq: int  # the seq of the step that started the loop, carried by all its steps and results
    halted: bool = False  # set by Halt: the step travelling the ring ends the loop when it is back
    speculate: str = ""  # "ngram": each step fed back carries prompt lookup proposals (one-row sessions); "stage":
    # it asks the first stage's draft model for them (Step.propose)
    k: AdaptiveK = field(default_factory=AdaptiveK)  # proposals per step


@dataclass
class Session:
    id: str
    rows: int
    max_length: int
    cache: KVCache | PagedCache
    kv_bytes: int  # reserved at open (a paged cache reserves nothing: its blocks are the pool's figures)
    next_address: str  # where steps go next ("" at the last stage)
    next_session_id: str
    wire_dtype: torch.dtype
    last_used: float
    sampler: Sampler | None = None  # last stage only
    results: asyncio.Queue[stage_pb2.Result | None] | None = None  # last stage only: Result messages for the subscriber
    # the reply queue of the Push stream this session's steps last came from
    reply_to: asyncio.Queue[stage_pb2.PushReply] | None = None
    closed: bool = False
    close_reason: str = ""
    subscribed: bool = False
    loop: LoopState | None = None  # last stage only: the running generation loop
    parked: WorkItem | None = None  # last stage only: the loop's next step, held back while the subscriber is behind
    model: StageModel | None = None  # the StageModel this session computes with (the stage's layers when it was opened)
    owner: str = ""  # the client key it was opened with: every call and step of the session must carry it
    pace: Track = field(default_factory=Track)  # first stage: its rounds and prompts (pace.py)
    # first stage with a draft model (drafting.py): the one row's tokens as far as known, and the draft's state
    seen: list[int] | None = None
    draft: DraftState | None = None


def new_session_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits


class SessionTable:
    def __init__(
        self,
        budget_bytes: int,
        ttl: float,
        max_sessions: int,
        clock: Callable[[], float] = time.monotonic,
        max_per_owner: int = 0,
    ):
        self.budget_bytes = budget_bytes
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.max_per_owner = max_per_owner  # 0: no limit per client
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._per_owner: collections.Counter[str] = collections.Counter()
        self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def open(
        self,
        rows: int,
        max_length: int,
        kv_bytes: int,
        make_cache: Callable[[], KVCache | PagedCache],
        owner: str = "",
        **fields: Any,
    ) -> Session:
        """Admit a session of client `owner` whose cache takes `kv_bytes`, or raise ResourceExhaustedError saying
        why not."""
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhaustedError(f"this stage already holds its maximum of {self.max_sessions} sessions")
        if self.max_per_owner and self._per_owner[owner] >= self.max_per_owner:
            raise ResourceExhaustedError(
                f"this client already holds {self._per_owner[owner]} sessions on this stage, the most one client may "
                "(--max-sessions-per-client): close some first"
            )
        if kv_bytes > self.free_bytes:
            raise ResourceExhaustedError(
                f"the session needs {kv_bytes} bytes of KV cache (rows={rows}, max_length={max_length}) but only "
                f"{self.free_bytes} of {self.budget_bytes} bytes are free on this stage"
            )
        session = Session(
            id=new_session_id(),
            rows=rows,
            max_length=max_length,
            cache=make_cache(),
            kv_bytes=kv_bytes,
            last_used=self.clock(),
            owner=owner,
            **fields,
        )
        self._sessions[session.id] = session
        self._per_owner[owner] += 1
        self.used_bytes += kv_bytes
        return session

    def get(self, session_id: str, key: str = "") -> Session:
        """The open session with this id (its idle timer restarts); NotFoundError if there is none,
        PermissionDeniedError if `key` is not the one it was opened with."""
        session = self._sessions.get(session_id)
        shown = session_id if len(session_id) <= 40 else session_id[:40] + "..."
        if session is None:
            raise NotFoundError(f"session {shown!r} not found on this stage (never opened, closed or expired)")
        if not owns(session, key):
            raise PermissionDeniedError(f"session {shown!r} was opened by another client (client_key does not match)")
        session.last_used = self.clock()
        return session

    def owned_by(self, owner: str) -> int:
        """Sessions client `owner` holds here."""
        return self._per_owner[owner]

    def peek(self, session_id: str) -> Session | None:
        """The open session with this id, without counting it as a use."""
        return self._sessions.get(session_id)

    def find(self, predicate: Callable[[Session], bool]) -> Session | None:
        return next((s for s in self._sessions.values() if predicate(s)), None)

    def close(self, session_id: str, reason: str = "closed") -> Session | None:
        """Forget the session and give its cache memory back at once; None if there was no such session."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return None
        session.closed = True
        session.close_reason = reason
        self._per_owner[session.owner] -= 1
        if not self._per_owner[session.owner]:
            del self._per_owner[session.owner]
        self.used_bytes -= session.kv_bytes
        session.cache.close()  # a paged cache's blocks go back to the pool (once a step computing on it is over)
        session.cache = None  # type: ignore[assignment]  # the tensors go with the last reference
        return session

    def expired(self) -> list[str]:
        now = self.clock()
        return [sid for sid, s in self._sessions.items() if now - s.last_used > self.ttl]

    def all(self) -> list[Session]:
        return list(self._sessions.values())


def owns(session: Session, key: str) -> bool:
    """Whether `key` is the client key `session` was opened with (constant time)."""
    return hmac.compare_digest(session.owner.encode(), key.encode())
