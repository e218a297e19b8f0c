"""`layerline api`: an OpenAI-compatible HTTP API over a layerline cluster, and the cluster's dashboard.

Endpoints (aiohttp, one asyncio process; generation goes through one shared `AsyncClient`, so every request is a
session on the stages like any other client's):
- `GET /v1/models`, `GET /v1/models/{id}`: the one model the cluster serves.
- `POST /v1/completions`: `prompt` (a string, a list of strings, a list of token ids or a list of such lists).
- `POST /v1/chat/completions`: `messages` through the model's chat template.
  Both take `max_tokens` (chat also `max_completion_tokens`), `temperature`, `top_p`, `stop` (a string or up to 4),
  `seed`, `n`, `stream` (server-sent events, `data: [DONE]` at the end) with `stream_options.include_usage`, and
  layerline's own `top_k` and `repetition_penalty`; answers carry `usage` (prompt, completion and total tokens).
  Log-probabilities (of the model's distribution, computed at the last stage in float32 from the logits the sampler
  saw): completions take `logprobs` (0..20 alternatives per token: OpenAI's `tokens`, `token_logprobs`,
  `top_logprobs`, `text_offset`) and `echo` (the prompt's tokens too, the first one's log-probability null;
  `max_tokens: 0` scores the prompt only); chat takes `logprobs: true` and `top_logprobs` (0..20). Streamed chunks
  carry those of the tokens whose text they carry.
  Parameters layerline cannot honour (penalties, tools, ...) are refused, not ignored.
- Errors are OpenAI-style bodies `{"error": {"message", "type", "param", "code"}}`: 400 for bad requests, 401 for a
  missing or wrong API key (`--api-key-file`), 404 for an unknown model or path, 429 when the stages are full
  (RESOURCE_EXHAUSTED), 503 when no route works (UNAVAILABLE), 500 otherwise.
- `GET /` (and `/dashboard`): the dashboard, plain HTML/JS/CSS from `layerline/dashboard/` (nothing from a CDN);
  `GET /api/cluster`: the JSON it polls (the coordinator's Status and every stage's Info, with rates and the history
  of the last minutes that the server samples every second, cluster_view.py); `GET /metrics`: Prometheus text for
  this process; `GET /health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from layerline.client import AsyncClient, Piece, RPCError
from layerline.cluster_view import ClusterView
from layerline.errors import LayerlineError
from layerline.rate_limit import Rate, RateLimiter
from layerline.sampling_params import MAX_TOP_LOGPROBS
from layerline.security import Security

logger = logging.getLogger(__name__)

DASHBOARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard")
MAX_N = 8
MAX_STOPS = 4
MAX_BODY = 8 << 20
HEALTH_TIMEOUT_S = 5.0  # /health: seconds the route's stages get to answer
DEFAULT_CHAT_MAX_TOKENS = 512
UNSUPPORTED = {  # parameter -> the values that mean "not asked for" (anything else is refused)
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
}
ROLES = {"system", "user", "assistant", "developer"}


class ApiError(Exception):
    """An error answered as an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status, headers=self.headers)


def from_rpc(e: RPCError) -> ApiError:
    code = e.code
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return ApiError(400, e.details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(429, e.details, "rate_limit_error", code="server_busy")
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
    ):
        return ApiError(503, e.details, "server_error", code="unavailable")
    return ApiError(500, f"{e.code.name}: {e.details}", "server_error")


@dataclass
class Request:
    """What one completions or chat request asks for, checked."""

    prompts: list[list[int]]  # token ids of each prompt (one for chat)
    options: dict[str, Any]  # generation options for the SDK
    n: int
    stream: bool
    include_usage: bool
    chat: bool
    logprobs: int | None = None  # alternatives per token when log-probabilities are asked for (None: not asked)
    echo: bool = False  # completions: the prompt comes back in the text (and its tokens in logprobs)
    texts: list[Any] = field(default_factory=list)  # completions: each prompt as given (a string or token ids)
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""


class Api:
    def __init__(
        self,
        client: AsyncClient,
        model_name: str,
        coordinator: str = "",
        route: list[str] | None = None,
        security: Security | None = None,
        api_key: str = "",
        speculate: str = "",
        rate_limit: Rate | None = None,
    ) -> None:
        self.client = client
        self.model_name = model_name
        self.speculate = speculate  # every generation's speculative decoding ("ngram", a draft; "" = none)
        self.coordinator = coordinator
        self.route = list(route or [])
        self.security = security or Security()
        self.api_keys = [k.encode() for k in api_key.split()]  # any of them (the file's lines); none: no key asked
        # requests per key (the bearer token sent, or the caller's address without one), refused with 429 past it
        self.limiter = RateLimiter(rate_limit) if rate_limit is not None else None
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "layerline_api_requests", "HTTP API requests", ["endpoint", "status"], registry=self.registry
        )
        self.tokens = Counter("layerline_api_tokens", "tokens", ["kind"], registry=self.registry)
        self.latency = Histogram(
            "layerline_api_request_seconds",
            "time to answer a request (a streamed one: to its last event)",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.generated_total = 0
        # why the cluster is not there yet ("" once it is): until then /v1 and /health answer 503 with the reason
        self.waiting = ""
        self.view = ClusterView(coordinator, self.route, self.security)  # what the dashboard shows

    # ---- the app -------------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        app.add_routes(
            [
                web.get("/v1/models", self.models),
                web.get("/v1/models/{model}", self.model),
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.get("/health", self.health),
                web.get("/metrics", self.metrics),
                web.get("/api/cluster", self.cluster),
                web.get("/", self.dashboard),
                web.get("/dashboard", self.dashboard),
                web.static("/dashboard/static", DASHBOARD),
            ]
        )
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
        began = time.monotonic()
        try:
            if request.path.startswith("/v1/"):
                self._check_key(request)
                self._check_rate(request)
                if self.waiting:
                    raise ApiError(
                        503, f"the cluster is not there yet: {self.waiting}", "server_error", code="unavailable"
                    )
            response = await handler(request)
        except ApiError as e:
            response = e.response()
        except web.HTTPException as e:
            if e.status == 404:
                response = ApiError(
                    404, f"no such endpoint: {request.method} {request.path}", code="not_found"
                ).response()
            elif e.status == 405:
                response = ApiError(405, f"{request.method} is not allowed on {request.path}").response()
            elif e.status == 413:
                response = ApiError(413, f"the request body is larger than {MAX_BODY} bytes").response()
            else:
                raise
        except RPCError as e:
            response = from_rpc(e).response()
        except Exception:
            logger.exception("%s %s failed", request.method, request.path)
            response = ApiError(500, "internal error (see the api server's log)", "server_error").response()
        self.requests.labels(endpoint, str(response.status)).inc()
        self.latency.labels(endpoint).observe(time.monotonic() - began)
        return response

    def _check_key(self, request: web.Request) -> None:
        if not self.api_keys:
            return
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        sent = token.strip().encode()
        if scheme.lower() != "bearer" or not any([hmac.compare_digest(sent, k) for k in self.api_keys]):
            raise ApiError(
                401,
                "a valid API key is required (Authorization: Bearer ...)",
                "invalid_request_error",
                code="invalid_api_key",
            )

    def _check_rate(self, request: web.Request) -> None:
        if self.limiter is not None:
            wait = self.limiter.acquire(_caller(request))
            if wait > 0:
                raise ApiError(
                    429,
                    self.limiter.message("requests per API key") + f"; retry in {wait:.2f} s",
                    "rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )

    # ---- models, health, metrics ---------------------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "layerline"}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return web.json_response(self._model_card())

    def _check_model(self, name: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model is required (see GET /v1/models)", param="model")
        if name != self.model_name:
            raise ApiError(
                404,
                f"the model {name!r} is not served here; this cluster serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def health(self, request: web.Request) -> web.Response:
        """200 while every stage of the route answers now (each asked, at most HEALTH_TIMEOUT_S), else 503 with
        the reason; a route with a stage that does not answer is forgotten, so that the next check or request asks
        for one again (from the coordinator, when there is one)."""

        async def check() -> list[str]:
            links = await self.client.links()
            dead = await self.client.locate_failure(links)
            if dead:
                self.client.forget_route()
                raise RPCError(grpc.StatusCode.UNAVAILABLE, f"stage {', '.join(dead)} of the route does not answer")
            return [link.address for link in links]

        if self.waiting:
            return web.json_response({"status": "unavailable", "problem": self.waiting}, status=503)
        try:
            route = await asyncio.wait_for(check(), HEALTH_TIMEOUT_S)
        except RPCError as e:
            return web.json_response({"status": "unavailable", "problem": e.details}, status=503)
        except TimeoutError:
            problem = f"the route did not answer within {HEALTH_TIMEOUT_S:g} s"
            return web.json_response({"status": "unavailable", "problem": problem}, status=503)
        return web.json_response({"status": "ok", "route": route})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- completions ---------------------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        self._check_model(body.get("model"))
        prompt = body.get("prompt")
        if prompt is None:
            raise ApiError(400, "prompt is required", param="prompt")
        texts = _prompts(prompt)
        prompts = [await self._encode(p, None) for p in texts]
        req = await self._request(body, prompts, chat=False, default_max_tokens=16)
        req.id, req.texts = "cmpl-" + secrets.token_hex(12), texts
        return await self._answer(request, req)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        self._check_model(body.get("model"))
        messages = _messages(body.get("messages"))
        ids = await self._encode(None, messages)
        if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
            body = {**body, "max_tokens": body["max_completion_tokens"]}
        req = await self._request(body, [ids], chat=True, default_max_tokens=None)
        req.id = "chatcmpl-" + secrets.token_hex(12)
        return await self._answer(request, req)

    async def _encode(self, prompt: str | list[int] | None, messages: list[dict] | None) -> list[int]:
        try:
            ids = await self.client.prompt_ids(prompt, messages)
        except RPCError as e:
            raise from_rpc(e) from None
        if not ids:
            raise ApiError(400, "the prompt is empty", param="messages" if messages is not None else "prompt")
        vocab = (await self.client.links())[0].info.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
        return ids

    async def _request(
        self, body: dict[str, Any], prompts: list[list[int]], chat: bool, default_max_tokens: int | None
    ) -> Request:
        for name, allowed in UNSUPPORTED.items():
            if name in body and body[name] not in allowed:
                raise ApiError(400, f"{name} is not supported by layerline", param=name, code="unsupported_parameter")
        logprobs, echo = _logprob_settings(body, chat)
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise ApiError(400, 'response_format: only {"type": "text"} is supported', param="response_format")
        context = await self.client.fit(1 << 30)
        longest = max(len(p) for p in prompts)
        if longest >= context:
            raise ApiError(
                400,
                f"the prompt has {longest} tokens; the model's context is {context} tokens",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = default_max_tokens or min(DEFAULT_CHAT_MAX_TOKENS, context - longest)
        max_tokens = _integer(max_tokens, "max_tokens", 0 if echo else 1)
        if longest + max_tokens > context:
            raise ApiError(
                400,
                f"this model's context is {context} tokens, but the request asks for {longest + max_tokens} "
                f"({longest} in the prompt, {max_tokens} to generate)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        temperature = _number(body.get("temperature", 1.0), "temperature", 0.0, 2.0)
        top_p = _number(body.get("top_p", 1.0), "top_p", 0.0, 1.0)
        if top_p == 0:
            raise ApiError(400, "top_p must be in (0, 1]", param="top_p")
        n = _integer(body.get("n", 1), "n", 1, MAX_N)
        stop = body.get("stop")
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,) if stop else ()
        elif isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop):
            stops = tuple(stop)
        else:
            raise ApiError(
                400, f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings", param="stop"
            )
        options: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": stops,
            "top_k": _integer(body.get("top_k", 0), "top_k", 0),
            "repetition_penalty": _number(body.get("repetition_penalty", 1.0), "repetition_penalty", 1e-6, 100.0),
        }
        if self.speculate:
            options["speculate"] = self.speculate
        if logprobs is not None:
            options["logprobs"], options["top_logprobs"] = True, logprobs
        seed = body.get("seed")
        if seed is not None:
            options["seed"] = _integer(seed, "seed", -(1 << 63), (1 << 64) - 1)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        return Request(prompts, options, n, stream, bool(stream_options.get("include_usage")), chat, logprobs, echo)

    def _choices(self, req: Request) -> list[tuple[int, list[int], dict[str, Any]]]:
        """(index, prompt ids, options) of every choice: n per prompt, seeded ones with seed + j."""
        out = []
        for i, ids in enumerate(req.prompts):
            for j in range(req.n):
                opts = dict(req.options)
                if "seed" in opts and j:
                    opts["seed"] = opts["seed"] + j
                out.append((i * req.n + j, ids, opts))
        return out

    async def _generate(
        self, ids: list[int], options: dict[str, Any]
    ) -> AsyncIterator[tuple[str, str | None, int, list[Piece]]]:
        """(text delta, finish_reason, tokens generated so far, the pieces since the last item) as the answer
        streams; the finish reason comes with the last item. Leaving early (the caller went away) closes the
        session on every stage."""
        if options["max_new_tokens"] == 0:  # echo, scoring only
            yield "", "length", 0, []
            return
        max_length = await self.client.fit(len(ids) + options["max_new_tokens"])
        count = 0
        pending: list[Piece] = []
        async with self.client.session(max_length=max_length) as s:
            async with contextlib.aclosing(s.generate(ids, **options)) as pieces:
                async for piece in pieces:
                    count += 1
                    self.tokens.labels("completion").inc()
                    self.generated_total += 1
                    pending.append(piece)
                    if piece.text:
                        yield piece.text, None, count, pending
                        pending = []
            last = s.last
        yield "", (last.finish_reason if last is not None else "stop"), count, pending

    async def _echoed(self, req: Request, index: int, ids: list[int]) -> tuple[str, list[Piece]]:
        """Choice `index`'s echoed prompt: its text (as given, or its token ids decoded), and (with logprobs) its
        tokens as pieces with their log-probabilities under the model (the first one's None), scored in one pass."""
        given = req.texts[index // req.n]
        if isinstance(given, str):
            text = given
        else:
            tok = await self.client.tokenizer()
            text = tok.decode(ids) if tok is not None else ""
        if req.logprobs is None:
            return text, []
        scores = (await self.client.score_top([ids], req.logprobs))[0]
        pieces = [Piece(ids[0], "", "", None, ())]
        for i, t in enumerate(ids[1:]):
            pieces.append(Piece(t, "", "", scores.logprobs[i], scores.top_logprobs[i] if req.logprobs else ()))
        return text, pieces

    async def _logprobs(self, req: Request, pieces: list[Piece], offset: int) -> tuple[dict[str, Any] | None, int]:
        """OpenAI's logprobs object of these pieces (completions: starting at character `offset` of the text;
        chat: the `content` list), and the offset after them."""
        if req.logprobs is None:
            return None, offset
        tok = await self.client.tokenizer()

        def text_of(t: int) -> str:
            return tok.decode([t]) if tok is not None else f"<{t}>"

        if req.chat:
            content = []
            for p in pieces:
                tops = [
                    {"token": text_of(t), "logprob": lp, "bytes": list(text_of(t).encode())} for t, lp in p.top_logprobs
                ]
                s_ = text_of(p.token_id)
                content.append({"token": s_, "logprob": p.logprob, "bytes": list(s_.encode()), "top_logprobs": tops})
            return {"content": content, "refusal": None}, offset
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for p in pieces:
            s_ = text_of(p.token_id)
            out["tokens"].append(s_)
            out["token_logprobs"].append(p.logprob)
            out["top_logprobs"].append(None if p.logprob is None else {text_of(t): lp for t, lp in p.top_logprobs})
            out["text_offset"].append(offset)
            offset += len(s_)
        return out, offset

    async def _answer(self, request: web.Request, req: Request) -> web.StreamResponse:
        self.tokens.labels("prompt").inc(sum(len(p) for p in req.prompts) * req.n)
        if req.stream:
            return await self._stream(request, req)
        choices = self._choices(req)

        async def one(index: int, ids: list[int], opts: dict[str, Any]) -> dict[str, Any]:
            text, reason, count, pieces = [], "stop", 0, []
            if req.echo:
                echoed, pieces = await self._echoed(req, index, ids)
                text.append(echoed)
            async with contextlib.aclosing(self._generate(ids, opts)) as gen:
                async for delta, finish, so_far, new in gen:
                    text.append(delta)
                    pieces += new
                    reason, count = finish or reason, so_far
            logprobs, _ = await self._logprobs(req, pieces, 0)
            return {
                "index": index,
                "text": "".join(text),
                "finish_reason": reason,
                "tokens": count,
                "logprobs": logprobs,
            }

        results = await asyncio.gather(*(one(*c) for c in choices))
        completion_tokens = sum(r["tokens"] for r in results)
        prompt_tokens = sum(len(p) for p in req.prompts)  # counted once, however many choices (as OpenAI)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if req.chat:
            out_choices = [
                {
                    "index": r["index"],
                    "message": {"role": "assistant", "content": r["text"]},
                    "logprobs": r["logprobs"],
                    "finish_reason": r["finish_reason"],
                }
                for r in results
            ]
            kind = "chat.completion"
        else:
            out_choices = [
                {"index": r["index"], "text": r["text"], "logprobs": r["logprobs"], "finish_reason": r["finish_reason"]}
                for r in results
            ]
            kind = "text_completion"
        body = {
            "id": req.id,
            "object": kind,
            "created": req.created,
            "model": self.model_name,
            "choices": out_choices,
            "usage": usage,
        }
        if req.chat:
            body["system_fingerprint"] = None
        return web.json_response(body)

    async def _stream(self, request: web.Request, req: Request) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        await response.prepare(request)
        kind = "chat.completion.chunk" if req.chat else "text_completion"
        events: asyncio.Queue = asyncio.Queue()
        counts: dict[int, int] = {}

        def chunk(
            index: int, delta: str | None, finish: str | None, first: bool = False, logprobs: dict | None = None
        ) -> dict[str, Any]:
            if req.chat:
                d: dict[str, Any] = {}
                if first:
                    d["role"] = "assistant"
                if delta is not None:
                    d["content"] = delta
                choice = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
            return {
                "id": req.id,
                "object": kind,
                "created": req.created,
                "model": self.model_name,
                "choices": [choice],
            }

        async def one(index: int, ids: list[int], opts: dict[str, Any]) -> None:
            counts[index] = 0
            offset = 0
            try:
                if req.chat:
                    await events.put(chunk(index, "", None, first=True))
                if req.echo:
                    echoed, pieces = await self._echoed(req, index, ids)
                    logprobs, offset = await self._logprobs(req, pieces, offset)
                    await events.put(chunk(index, echoed, None, logprobs=logprobs))
                async with contextlib.aclosing(self._generate(ids, opts)) as gen:
                    async for delta, finish, counts[index], pieces in gen:
                        logprobs, offset = await self._logprobs(req, pieces, offset)
                        if finish is None:
                            await events.put(chunk(index, delta, None, logprobs=logprobs))
                        else:
                            last = logprobs if pieces else None
                            await events.put(chunk(index, None if req.chat else "", finish, logprobs=last))
            except Exception as e:  # told to the caller in the stream (the status line is long sent)
                error = from_rpc(e) if isinstance(e, RPCError) else ApiError(500, "internal error", "server_error")
                if not isinstance(e, RPCError):
                    logger.exception("streamed generation failed")
                await events.put(
                    {"error": {"message": error.message, "type": error.kind, "param": None, "code": error.code}}
                )

        tasks = [asyncio.ensure_future(one(*c)) for c in self._choices(req)]
        done = asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))
        get: asyncio.Future | None = None
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                finished, _ = await asyncio.wait({get, done}, return_when=asyncio.FIRST_COMPLETED)
                if get in finished:
                    await response.write(_sse(get.result()))
                    continue
                get.cancel()
                while not events.empty():
                    await response.write(_sse(events.get_nowait()))
                break
            if req.include_usage:
                prompt_tokens = sum(len(p) for p in req.prompts)  # counted once, however many choices (as OpenAI)
                completion_tokens = sum(counts.values())
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                await response.write(_sse({**chunk(0, None, None), "choices": [], "usage": usage}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            # the caller went away (noticed on a write): its generations stop (below), and with them their sessions
            # on every stage; the status line is long sent, so there is nothing to answer
            logger.info("%s: the caller left the stream", req.id)
        finally:  # also when aiohttp cancels this handler because the caller disconnected
            if get is not None:
                get.cancel()  # not left pending (asyncio would report it destroyed so)
            for t in tasks:
                if not t.done():
                    t.cancel()
            with contextlib.suppress(BaseException):
                await done
        return response

    # ---- dashboard -----------------------------------------------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(os.path.join(DASHBOARD, "index.html"))

    async def cluster(self, request: web.Request) -> web.Response:
        return web.json_response(await self.view.latest(self.model_name, self.generated_total))


# ---- request parsing ---------------------------------------------------------------------------------------------


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=_strict_loads)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _strict_loads(text: str) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=no_constants)


def _prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completions request: a string, a list of strings, a list of ids, or a list of id lists."""

    def ids_list(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        return [prompt]
    if ids_list(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and len(prompt) <= 64:
        if all(isinstance(p, str) for p in prompt) or all(ids_list(p) for p in prompt):
            return list(prompt)
    raise ApiError(
        400,
        "prompt must be a string, a list of strings, a list of token ids or a list of token id lists (at most "
        "64 prompts)",
        param="prompt",
    )


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ApiError(
                400, f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}, got {role!r}", param="messages"
            )
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _caller(request: web.Request) -> str:
    """Whose request this is, for the rate limit: the bearer token it carries, else the caller's address."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "key:" + token.strip()
    return "peer:" + (request.remote or "")


def _logprob_settings(body: dict[str, Any], chat: bool) -> tuple[int | None, bool]:
    """(alternatives per token, or None when log-probabilities are not asked for; echo) of a request."""
    if chat:
        if body.get("echo") not in (None, False):
            raise ApiError(400, "echo is a parameter of /v1/completions, not of chat", param="echo")
        asked = body.get("logprobs")
        if asked is not None and not isinstance(asked, bool):
            raise ApiError(400, f"logprobs must be true or false, got {asked!r}", param="logprobs")
        top = body.get("top_logprobs")
        if top is not None and not asked:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (_integer(top or 0, "top_logprobs", 0, MAX_TOP_LOGPROBS) if asked else None), False
    if body.get("top_logprobs") is not None:
        raise ApiError(400, "top_logprobs is a chat parameter; completions take logprobs: N", param="top_logprobs")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ApiError(400, "echo must be true or false", param="echo")
    asked = body.get("logprobs")
    return (None if asked is None else _integer(asked, "logprobs", 0, MAX_TOP_LOGPROBS)), echo


def _integer(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ApiError(400, f"{name} must be an integer, got {value!r}", param=name)
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ApiError(400, f"{name} must be {bound}, got {value}", param=name)
    return value


def _number(value: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be in [{lo:g}, {hi:g}], got {value}", param=name)
    return float(value)


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


# ---- serving -----------------------------------------------------------------------------------------------------


class _NotHttpOneLine(logging.Filter):
    """aiohttp logs a request it cannot parse with a full traceback at ERROR. Such a request is the caller's
    mistake, most often a gRPC (HTTP/2) client pointed at the API's port: one line at WARNING says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            text = str(getattr(exc, "message", "") or exc).strip().splitlines()
            h2 = "PRI" in " ".join(text) or "HTTP/2" in " ".join(text)
            hint = " (an HTTP/2 or gRPC client? this port speaks HTTP/1.1: the OpenAI API and the dashboard)"
            what = hint if h2 else (f": {text[0]}" if text else "")
            record.msg = f"{record.getMessage()}: not an HTTP/1.1 request{what}"
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


async def serve_api(
    client: AsyncClient,
    model_name: str,
    host: str,
    port: int,
    *,
    coordinator: str = "",
    route: list[str] | None = None,
    security: Security | None = None,
    api_key: str = "",
    connect_timeout: float = 300.0,
    speculate: str = "",
    rate_limit: Rate | None = None,
    on_ready: Callable[[str, int, str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Listen on host:port at once, then wait (up to `connect_timeout` s) for the cluster to have a working route,
    answering /v1 and /health with 503 and the reason meanwhile; `on_ready(host, port, model name)` once it does.
    Serve until `stop` is set (or forever). `model_name` "": the name of the checkpoint the stages serve;
    `speculate`: every generation's speculative decoding ("ngram", a draft model's name or path; "" = none);
    `api_key`: the keys clients must send, whitespace-separated ("" = none); `rate_limit`: requests per key."""
    api = Api(client, model_name, coordinator, route, security, api_key, speculate, rate_limit)
    api.waiting = "connecting to the cluster"
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _NotHttpOneLine) for f in server_log.filters):
        server_log.addFilter(_NotHttpOneLine())
    runner = web.AppRunner(api.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        await client.close()
        raise LayerlineError(
            f"cannot listen on {host}:{port}: {e.strerror or e} (port taken? pick another --port)"
        ) from None
    bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port  # type: ignore[union-attr]
    logger.info("OpenAI-compatible API on http://%s:%d/v1, dashboard on http://%s:%d/", host, bound, host, bound)
    stopped = stop or asyncio.Event()
    # the dashboard's samples, every second from now on (the charts' history; a cluster still coming shows so)
    sampler = asyncio.ensure_future(api.view.sample_forever(lambda: (api.model_name, api.generated_total)))
    try:
        waiter = asyncio.ensure_future(_await_cluster(api, connect_timeout))
        halted = asyncio.ensure_future(stopped.wait())
        await asyncio.wait([waiter, halted], return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            return
        halted.cancel()
        waiter.result()  # the cluster never came: raise its reason
        if on_ready is not None:
            on_ready(host, bound, api.model_name)
        await stopped.wait()
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await runner.cleanup()
        await client.close()


async def _await_cluster(api: Api, timeout: float) -> None:
    """Connect the API's client to the cluster, again and again (backing off) while it has no working route (a
    cluster starting up: stages measuring, loading), keeping the reason in `api.waiting` for the 503 answers;
    LayerlineError after `timeout` seconds."""
    deadline, wait, said = time.monotonic() + timeout, 0.5, False
    while True:
        try:
            infos = await api.client.connect()
            break
        except RPCError as e:
            api.waiting = e.details
            if time.monotonic() + wait > deadline:
                where = f"the coordinator at {api.coordinator}" if api.coordinator else "the route"
                raise LayerlineError(f"cannot reach the cluster through {where}: {e.details}") from None
            if not said:
                logger.warning("waiting for the cluster (answering 503 until it is there): %s", e.details)
                said = True
            await asyncio.sleep(wait)
            wait = min(wait * 2, 5.0)
    api.model_name = api.model_name or infos[0].model_name.removesuffix(".gguf")
    api.waiting = ""
