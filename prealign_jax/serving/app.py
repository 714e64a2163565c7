"""The HTTP side of `prealign serve`: OpenAI-compatible routes over the batching engine.

    GET  /v1/models             the one model served
    POST /v1/completions        text in, text out (also streamed, server-sent events)
    POST /v1/chat/completions   messages through the chat template (`chat`), also streamed
    GET  /health                200 once the programs are compiled
    GET  /metrics               Prometheus text: requests, tokens, rows, latency

Every choice of a request is one engine request with its own row and seed. Text reaches
the client as plain text (`chat.content`), or as tagged text from the span the prompt
opened on (the operator's `tagged_content`: a prealigned model as the teacher of a tagged
corpus, `prealign synthesize`); each choice's `prealign` field carries the mode
of every generated token, the policy, and with `return_tagged` the tagged text. A request
the server refuses gets an OpenAI-style JSON error with a 4xx status; an error inside one
request answers it with a 500 and leaves the others alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import secrets
import time
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, CONTENT_TYPE_LATEST)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from prealign_jax import chat, engine as engine_lib, sampling
from prealign_jax import vocab as vocab_lib
from prealign_jax.errors import UserError
from prealign_jax.serving.protocol import (ChatRequest, CompletionRequest, ProtocolError,
                                           error_body)

LOG = logging.getLogger("prealign.serve")
MAX_BODY_BYTES = 1 << 20
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for completions
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks its client


@dataclasses.dataclass
class Served:
    """What the routes serve: the engine and its model, and the operator's choices."""

    name: str
    engine: engine_lib.Engine
    vocab: Any
    max_len: int
    default_policy: str
    allow_unmasked: bool = False
    max_n: int = 8
    api_key: str | None = None
    tagged_content: bool = False  # content is tagged text (a teacher of tagged corpora)
    copy_quotes: bool = False  # quotes copy the user's turn unless a request says otherwise


@dataclasses.dataclass
class _Choice:
    index: int
    prompt: sampling.Prompt
    request: engine_lib.Request | None = None
    tokens: list = dataclasses.field(default_factory=list)
    modes: list = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters already streamed
    started: bool = False  # a chunk was sent
    finish_reason: str | None = None
    final_state: str | None = None


class _Generation:
    """The choices of one HTTP request, fed by the engine's thread through an asyncio
    queue; ends each at EOS, the stop token, a stop string or max_tokens."""

    def __init__(self, served: Served, prompts: list[sampling.Prompt], body, policy: str,
                 stop_token: int, max_tokens: int, stops: list[str], opener: str = ""):
        self.served, self.stops, self.policy, self.mask = served, stops, policy, body.mask
        self.copy_quotes = (served.copy_quotes if body.copy_quotes is None
                            else body.copy_quotes)
        self.opener = opener  # the span the prompt opened: tagged content starts with it
        self.return_tagged, self.stop_token = body.return_tagged, stop_token
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        seed = body.seed if body.seed is not None else secrets.randbits(62)
        self.choices = []
        for i, prompt in enumerate(p for p in prompts for _ in range(body.n)):
            choice = _Choice(i, prompt)
            choice.request = engine_lib.Request(
                prompt_ids=prompt.ids, policy=policy, state=prompt.state,
                max_new_tokens=max_tokens, use_mask=body.mask, stop_token=stop_token,
                copy_quotes=self.copy_quotes,
                temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                seed=(seed + i) % (sampling.MAX_SEED + 1),
                on_tokens=lambda *a, i=i: self._post("tokens", i, *a),
                on_done=lambda *a, i=i: self._post("done", i, *a),
                on_error=lambda *a, i=i: self._post("error", i, *a))
            self.choices.append(choice)

    def _post(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def start(self) -> None:
        for c in self.choices:
            self.served.engine.submit(c.request)

    def cancel(self) -> None:
        for c in self.choices:
            c.request.cancelled = True

    async def updates(self) -> AsyncIterator[_Choice]:
        """Each choice whose text grew or that finished, as the engine reports."""
        open_choices = len(self.choices)
        while open_choices:
            kind, i, *rest = await self.events.get()
            c = self.choices[i]
            if c.finish_reason is not None:
                continue  # ended here (a stop string) before the engine's last report
            if kind == "error":
                self.cancel()
                raise rest[0]
            if kind == "tokens":
                tokens, token_modes, _ = rest
                c.tokens += tokens
                c.modes += token_modes
                c.text = (self.opener + vocab_lib.decode_tagged(self.served.vocab, c.tokens)
                          if self.served.tagged_content
                          else chat.content(self.served.vocab, c.tokens))
                self._check_stops(c)
            else:
                c.final_state = rest[0]
                ended = c.tokens and c.tokens[-1] in (vocab_lib.EOS_ID, self.stop_token)
                c.finish_reason = "stop" if ended else "length"
            if c.finish_reason is not None:
                open_choices -= 1
            yield c

    def _check_stops(self, c: _Choice) -> None:
        cut = min((p for p in (c.text.find(s) for s in self.stops) if p >= 0), default=-1)
        if cut >= 0:
            c.text, c.finish_reason = c.text[:cut], "stop"
            c.request.cancelled = True

    def streamable(self, c: _Choice) -> str:
        """New text safe to send: held back while it may still become a stop string or
        ends in an incomplete UTF-8 character."""
        end = len(c.text)
        if c.finish_reason is None:
            end -= max((len(s) - 1 for s in self.stops), default=0)
            while end > c.sent and c.text[end - 1] == "\ufffd":
                end -= 1
        new = c.text[c.sent:max(end, c.sent)]
        c.sent += len(new)
        return new

    def extension(self, c: _Choice) -> dict:
        out = {"policy": self.policy, "mask": self.mask, "copy_quotes": self.copy_quotes,
               "modes": c.modes,
               "token_ids": c.tokens, "final_state": c.final_state}
        if self.return_tagged:
            out.update(tagged_text=vocab_lib.decode_tagged(self.served.vocab, c.tokens),
                       prompt=c.prompt.text, prompt_token_ids=list(c.prompt.ids))
        return out

    def usage(self) -> dict:
        prompt = sum(len(p.ids) for p in {id(c.prompt): c.prompt
                                          for c in self.choices}.values())
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, engine: engine_lib.Engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("prealign_requests", "HTTP requests answered",
                                ["path", "status"], registry=self.registry)
        self.latency = Histogram("prealign_request_latency_seconds",
                                 "time to the whole response", ["path"],
                                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                 registry=self.registry)
        self.in_flight = Gauge("prealign_requests_in_flight", "requests being answered",
                               registry=self.registry)
        self.registry.register(_EngineCollector(engine))


class _EngineCollector:
    """The engine's counters, read at scrape time."""

    def __init__(self, engine: engine_lib.Engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        for name, value, text in (
                ("decode_steps", stats.steps, "decode steps run"),
                ("decode_row_steps", stats.row_steps,
                 "rows active per decode step, summed (/ decode_steps = mean occupancy)"),
                ("admitted", stats.admitted, "requests given a row"),
                ("prompt_tokens", stats.prompt_tokens, "prompt tokens prefilled"),
                ("completion_tokens", stats.row_steps, "tokens generated"),
                ("cache_compactions", stats.compactions, "KV cache compactions")):
            yield CounterMetricFamily(f"prealign_{name}", text, value=value)
        yield GaugeMetricFamily("prealign_batch_rows_active", "rows decoding now",
                                value=self.engine.active)
        yield GaugeMetricFamily("prealign_batch_rows", "rows of the batch",
                                value=self.engine.max_batch)


class _Guard:
    """ASGI middleware: bodies over MAX_BODY_BYTES get a 413 (the body is read here, up
    to the limit, then replayed to the app), and every response is counted and timed."""

    def __init__(self, app, metrics: _Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _PATHS else "other"
        start, status = time.perf_counter(), [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            body = await self._read_body(receive)
            if body is None:
                response = JSONResponse(error_body(
                    f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error",
                    code="request_too_large"), status_code=413)
                return await response(scope, receive, counted_send)
            replayed = [False]

            async def replay():
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            try:
                await self.app(scope, replay, counted_send)
            except Exception:  # noqa: BLE001 - answered with a 500 by the app's handler
                # Starlette re-raises after answering; uvicorn would then close the
                # connection under a client that may reuse it. Log it and go on.
                LOG.exception("request %s %s failed", scope["method"], scope["path"])
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)

    @staticmethod
    async def _read_body(receive) -> bytes | None:
        """The body, or None if it is over the limit (the rest is read and dropped, so
        the client, still sending, gets the 413 instead of a reset connection)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            size += len(message.get("body", b""))
            if size <= MAX_BODY_BYTES:
                chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        return b"".join(chunks) if size <= MAX_BODY_BYTES else None


_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


def create_app(served: Served):
    """The ASGI application (FastAPI inside the body-limit and metrics guard)."""
    app = FastAPI(title="prealign", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = _Metrics(served.engine)

    @app.exception_handler(ProtocolError)
    async def refused(_, e: ProtocolError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        if first["type"] == "json_invalid":
            message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})"
        elif first["type"] == "extra_forbidden":
            message = f"{where}: unknown field"
        else:
            message = f"{where or 'body'}: {first['msg']}"
        return JSONResponse(error_body(message, "invalid_request_error", where or None),
                            status_code=400)

    @app.exception_handler(Exception)
    async def failed(_, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}",
                                       "server_error"), status_code=500)

    def authorized(request: Request) -> None:
        if served.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {served.api_key}".encode()):
            raise ProtocolError("missing or wrong API key (send Authorization: Bearer KEY)",
                                status=401, code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model",
                                            "created": 0, "owned_by": "prealign"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        policy = _policy(served, body)
        names = ("prompt", "mode")
        prompts = [_checked(lambda t=t: sampling.make_prompt(
            _utf8(t, "prompt"), served.vocab, policy, mode=body.mode, names=names))
            for t in body.prompts()]
        max_tokens = body.max_tokens or COMPLETION_DEFAULT_TOKENS
        gen = _generation(served, prompts, body, policy, -1, max_tokens, "prompt",
                          f"<{body.mode}>" if body.mode else "")
        return await _respond(gen, body, request, "text_completion", _completion_choice)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request):
        policy = _policy(served, body)
        messages = [(m.role, _utf8(m.text(), f"messages.{i}.content"))
                    for i, m in enumerate(body.messages)]
        prompt = _checked(lambda: sampling.chat_prompt(messages, served.vocab, policy))
        closer = vocab_lib.tag_ids(served.vocab)[chat.CLOSER]
        gen = _generation(served, [prompt], body, policy, closer, body.token_limit(),
                          "messages", chat.OPENER)
        return await _respond(gen, body, request, "chat.completion", _chat_choice)

    return _Guard(app, metrics)


def _policy(served: Served, body) -> str:
    if body.model is not None and body.model != served.name:
        raise ProtocolError(f"model {body.model!r} is not served here; this server serves "
                            f"{served.name!r} (GET /v1/models)", "model", 404,
                            "model_not_found")
    name = body.policy or served.default_policy
    if name not in served.engine.policies:
        raise ProtocolError(f"policy {name!r} is not allowed on this server; allowed: "
                            f"{', '.join(served.engine.policies)}", "policy")
    if not body.mask and not served.allow_unmasked:
        raise ProtocolError("mask=false: this server keeps the transition mask on (the "
                            "operator can allow it with --allow_unmasked)", "mask", 403)
    if body.top_k > served.engine.candidates:
        raise ProtocolError(f"top_k={body.top_k}: at most {served.engine.candidates}",
                            "top_k")
    if body.temperature and body.temperature < sampling.MIN_TEMPERATURE:
        raise ProtocolError(f"temperature={body.temperature}: 0 (greedy) or at least "
                            f"{sampling.MIN_TEMPERATURE:g}", "temperature")
    if body.n > served.max_n:
        raise ProtocolError(f"n={body.n}: at most {served.max_n}", "n")
    return name


def _utf8(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, which JSON can carry
        raise ProtocolError(f"{param}: not valid Unicode at character {e.start}",
                            param) from None
    return text


def _checked(make):
    try:
        return make()
    except UserError as e:
        raise ProtocolError(str(e).splitlines()[0]) from None


def _generation(served: Served, prompts, body, policy: str, stop_token: int,
                max_tokens: int | None, prompt_param: str, opener: str) -> _Generation:
    """The request's choices, once its prompts and max_tokens (default: what the context
    has left) fit the model's context."""
    longest = max(len(p.ids) for p in prompts) + 1  # + the leading 0 of a document
    if longest >= served.max_len:
        raise ProtocolError(f"the prompt ({longest - 1} tokens) fills the model's context of "
                            f"{served.max_len} tokens; shorten it", prompt_param,
                            code="context_length_exceeded")
    max_tokens = max_tokens or served.max_len - longest
    if longest + max_tokens > served.max_len:
        raise ProtocolError(
            f"the prompt ({longest - 1} tokens) and max_tokens ({max_tokens}) exceed the "
            f"model's context of {served.max_len} tokens; lower max_tokens to at most "
            f"{served.max_len - longest}", "max_tokens", code="context_length_exceeded")
    return _Generation(served, prompts, body, policy, stop_token, max_tokens, body.stops(),
                       opener)


def _completion_choice(gen: _Generation, c: _Choice, text: str, final: bool,
                       stream: bool) -> dict:
    out = {"index": c.index, "text": text, "logprobs": None,
           "finish_reason": c.finish_reason}
    if final:
        out["prealign"] = gen.extension(c)
    return out


def _chat_choice(gen: _Generation, c: _Choice, text: str, final: bool, stream: bool) -> dict:
    if stream:  # the role in a choice's first chunk only
        key, message = "delta", {"content": text}
        if not c.started:
            message = {"role": "assistant", **message}
    else:
        key, message = "message", {"role": "assistant", "content": text}
    c.started = True
    out = {"index": c.index, key: message, "logprobs": None,
           "finish_reason": c.finish_reason}
    if final:
        out["prealign"] = gen.extension(c)
    return out


async def _respond(gen: _Generation, body, request: Request, kind: str, choice_of):
    ident = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{secrets.token_hex(12)}"
    head = {"id": ident, "created": int(time.time()), "model": gen.served.name}
    gen.start()
    if body.stream:
        return StreamingResponse(_stream(gen, body, head, kind, choice_of),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    async def drain():
        async for _ in gen.updates():
            pass

    consume = asyncio.ensure_future(drain())
    try:
        while not (await asyncio.wait({consume}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():  # the client went away: free its rows
                gen.cancel()
                consume.cancel()
                return Response(status_code=499)
        consume.result()
    except BaseException:
        gen.cancel()
        consume.cancel()
        raise
    return {**head, "object": kind, "usage": gen.usage(),
            "choices": [choice_of(gen, c, c.text, True, False) for c in gen.choices]}


async def _stream(gen: _Generation, body, head: dict, kind: str, choice_of):
    """Server-sent events: one chunk per choice update, then the usage chunk if asked,
    then [DONE]. A client that goes away cancels the choices (their rows free up)."""
    chunk_kind = kind + ".chunk" if kind == "chat.completion" else kind

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    try:
        async for c in gen.updates():
            text = gen.streamable(c)
            final = c.finish_reason is not None
            if text or final:
                yield event({**head, "object": chunk_kind,
                             "choices": [choice_of(gen, c, text, final, True)]})
        if body.stream_options and body.stream_options.include_usage:
            yield event({**head, "object": chunk_kind, "choices": [], "usage": gen.usage()})
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - the stream has begun: report in-band
        yield event(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"))
    finally:
        gen.cancel()
