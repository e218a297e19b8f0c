"""The client SDK's plain types: its configuration, generation options (checked before anything is sent),
what a generation yields and returns, a failover as it is told, and a link to one stage. No torch."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from layerline import speculate
from layerline.client.errors import RPCError
from layerline.grpc_setup import DEFAULT_MAX_MESSAGE_BYTES
from layerline.sampling_params import logprob_problems, sampling_problems
from layerline.security import Security
from layerline.v1 import stage_pb2, stage_pb2_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class ClientConfig:
    step_timeout: float = 120.0  # seconds a step may take to come back before the call fails
    connect_timeout: float = 15.0  # seconds for Info / OpenSession / CloseSession calls
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # largest message sent or received
    prefill_chunk: int = 512  # prompt tokens per step (fewer when the hidden states would not fit a message)
    # "float32", "float16", "bfloat16" or "int8" (a scale per token: a quarter of float32's bytes, for slow links)
    # for hidden states between stages; "" = stage default
    wire_dtype: str = ""
    server_loop: bool = True  # the last stage feeds sampled tokens back to the first (N hops per token); False: the
    # client feeds each token back itself (N + 1 hops; kept for comparison and for stages without loops)
    # a new session (or one moved to another chain) first asks each stage for the longest prefix of its tokens the
    # stage has cached (AttachPrefix) and computes only the rest
    reuse_prefixes: bool = True
    max_in_flight: int = 32  # generations and micro-batches this client runs at once; more wait their turn
    micro_batch_size: int = 4  # default rows per micro-batch of generate_batch and score
    route_retries: int = 4  # with a coordinator: ask again when its route is out of date (a stage just died, or is
    # switching layers and its heartbeat has not said so yet), waiting 0.25, 0.5, 1, 2 s between tries
    failover: bool = True  # a generation whose stage dies, stalls or is cut off moves to another chain and goes on
    max_failovers: int = 3  # moves per generation (or micro-batch) before its error reaches the caller
    failover_timeout: float = 60.0  # seconds to find a working chain after a failure (the coordinator may re-plan)
    ban_seconds: float = 30.0  # a stage found dead or stalled is left out of routes this long
    probe_timeout: float = 3.0  # seconds a stage gets to answer Info when a failure is being located
    security: Security = field(default_factory=Security)  # TLS / mutual TLS / token (`Security.from_files`)
    # told of each move to another chain (the CLI prints `Failover.note()` on stderr); None: logged as a warning
    on_failover: Callable[[Failover], None] | None = None


@dataclass(frozen=True)
class Failover:
    """A generation (or micro-batch) moved to another chain after its chain failed."""

    what: str  # "session 1a2b3c4d", "a micro-batch of 4 rows"
    error: str  # what failed, as the client saw it
    failed: tuple[str, ...]  # the stages that did not answer when asked
    seconds: float  # from the failure to a working chain: the pause the reader sees
    waited_for_plan: bool  # no chain without the failed stages at first: the coordinator re-planned meanwhile
    replay_tokens: int  # tokens the new chain computes again before the answer goes on

    def note(self) -> str:
        who = f"stage {', '.join(self.failed)} stopped answering" if self.failed else f"the chain failed ({self.error})"
        why = (
            "the coordinator gave the lost layers to the remaining stages, which loaded them"
            if self.waited_for_plan
            else "another chain was ready"
        )
        return (
            f"layerline: {who}; {self.what} moved to another chain in {self.seconds:.1f} s ({why}) and computed its "
            f"{self.replay_tokens} tokens again there; the answer goes on"
        )


@dataclass(frozen=True)
class Piece:
    """One generated token and the text it adds (may be "" while a character or a stop string is incomplete)."""

    token_id: int
    text: str
    finish_reason: str = ""  # on a generation's last piece: "stop" or "length" (as Generation.finish_reason)
    logprob: float | None = None  # with logprobs: its log-probability under the model (before sampling settings)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # with top_logprobs=N: the N most likely (token id, logprob)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (stop token or string), "length" (max_new_tokens or the session's max_length)
    logprobs: list[float] | None = None  # with logprobs: each token's log-probability (Piece.logprob)
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None  # with top_logprobs=N (Piece.top_logprobs)


@dataclass
class Scores:
    """A scored sequence of n tokens: entry i is about token i + 1 given tokens 0..i (n - 1 entries)."""

    logprobs: list[float]
    top_logprobs: list[tuple[tuple[int, float], ...]]  # with top_logprobs=N: the N most likely (id, logprob) there


@dataclass(frozen=True)
class Options:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None = the tokenizer's end-of-sequence ids
    # speculative decoding: "ngram" (prompt lookup: proposals from the text so far, verified by the last stage, k
    # per round through the chain; greedy output is unchanged, sampling keeps its distribution), or a draft model
    # with the chain's tokenizer ("smollm2" or a path: run greedily in this client's process), or "stage" (the
    # draft model the first stage's host runs, `layerline stage --draft`; server loop); None = off
    speculate: str | None = None
    speculate_k: int | None = None  # proposals per round; None = adaptive
    logprobs: bool = False  # each token's log-probability under the model, computed at the last stage in float32
    top_logprobs: int = 0  # and that many most likely tokens at each (0..20; implies logprobs)

    @classmethod
    def make(cls, **kw: Any) -> Options:
        if "stop" in kw and isinstance(kw["stop"], str):
            kw["stop"] = (kw["stop"],)
        for k in ("stop", "stop_token_ids"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        unknown = set(kw) - set(cls.__dataclass_fields__)
        if unknown:
            raise RPCError(INVALID, f"unknown generation option(s): {', '.join(sorted(unknown))}")
        o = cls(**kw)
        problems = [f"max_new_tokens must be positive, got {o.max_new_tokens}"] if o.max_new_tokens <= 0 else []
        problems += sampling_problems(o.temperature, o.top_k, o.top_p, o.repetition_penalty)
        problems += speculate.check(o.speculate, o.speculate_k)
        problems += logprob_problems(o.top_logprobs)
        if problems:
            raise RPCError(INVALID, "; ".join(problems))
        return o

    def sampling(self, draws: int = 0) -> stage_pb2.SamplingParams:
        msg = stage_pb2.SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            draws=draws,
            logprobs=self.logprobs or self.top_logprobs > 0,
            top_logprobs=self.top_logprobs,
        )
        if self.seed is not None:
            msg.seed = self.seed % (1 << 64)
        return msg

    def seeded(self) -> Options:
        """These options with a seed: a sampling generation without one gets a random seed here, so that a replay
        after a failover continues its random numbers (greedy needs none)."""
        if self.seed is not None or self.temperature == 0:
            return self
        return replace(self, seed=secrets.randbits(63))


RETRIABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # a stage died, was cut off or is shutting down
        grpc.StatusCode.DEADLINE_EXCEEDED,  # a stage stalled (no result within step_timeout)
        grpc.StatusCode.ABORTED,
    }
)  # not NOT_FOUND: a session a stage expired (TTL) or dropped stays gone, as the stage said; not CANCELLED: that
# is this side closing its own streams (the caller left, or was interrupted)


@dataclass
class Link:
    address: str
    channel: grpc.aio.Channel
    stub: stage_pb2_grpc.StageStub
    info: stage_pb2.StageInfo = field(default_factory=stage_pb2.StageInfo)
