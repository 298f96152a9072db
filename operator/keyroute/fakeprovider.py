"""A fake LLM provider on a real socket that fails on purpose.

Why it exists: keyroute's job is to react to how providers fail (429 with reset headers, revoked
keys, connection resets, silence, streams that stall or break mid-body), and most of that behaviour
only exists on the wire: timeouts, half-sent chunked bodies, RSTs, a Host header or base-URL prefix
that is subtly wrong. Mocking at the function level cannot show any of it, so the tests, the
benchmarks and ``keyroute demo`` run this aiohttp server on 127.0.0.1 instead and script what each
request gets.

Speaks just enough of the OpenAI-compatible dialect (``chat/completions``, ``completions``,
``embeddings``, ``responses``, ``models``) and the Anthropic one (``messages``) for a proxy to pass
real-looking bytes through. Every request is recorded as a :class:`Received` (host, key, model ...),
so a test can see that a key went to the wrong provider or a base URL lost its prefix.

Usage::

    async with FakeProvider("primary", keys=["k1", "k2"]) as fp:
        fp.script(Behaviour.rate_limited(retry_after="2"), key="k1")  # next k1 request only
        fp.set(Behaviour.stream(5, cut_after=2), model="big")          # every "big" request
        ...  # point the sidecar at fp.base_url
        assert fp.keys_seen() == ["k1", "k2"]

Standalone: ``python -m keyroute.fakeprovider --port 0 --name x`` prints the base URL and serves
until interrupted.

The pure core never imports this module (import-linter contract); the shells and tests do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, MutableSet, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final, Literal, Self

from aiohttp import web

__all__ = ["Behaviour", "FakeProvider", "Hangup", "Received", "main", "serve_forever"]


@dataclass(frozen=True)
class Received:
    """One request as the provider saw it.

    ``headers`` has lower-cased names. ``key`` comes from ``Authorization: Bearer X`` or, failing
    that, ``x-api-key: X``. ``model`` and ``stream`` come from a JSON object body, if any.
    """

    time: float  # time.monotonic() at arrival
    method: str
    path: str  # e.g. "/v1/chat/completions", query string excluded
    host: str  # the Host header as received
    key: str | None
    model: str | None
    stream: bool
    body: bytes
    headers: dict[str, str]
    query: str = ""  # the raw query string, as received (without the "?")

    def body_json(self) -> Any:
        """The body parsed as JSON (raises ``ValueError`` if it is not JSON)."""
        return json.loads(self.body)


@dataclass(frozen=True)
class Hangup:
    """A client that closed its connection before its answer was complete (a silence, a stall or a
    stream still being sent): when the provider saw it go, so a test can tell how long a proxy held
    an upstream request open after its own client had left."""

    request: Received
    time: float  # time.monotonic() when the connection was seen closed


_Kind = Literal["ok", "status", "model_not_found", "reset", "silence", "stream"]
_Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, repr=False)
class Behaviour:
    """What to do with one request. Build with the classmethods; the fields are the mechanism.

    Stream positions count chunks (content events) from 1: ``stall_after=2`` sends chunks 1 and 2,
    ``malformed_at=2`` replaces chunk 2. ``stall_after``/``cut_after`` may equal ``chunks``: all
    chunks are sent, then the stream stalls or is cut before ``[DONE]``.
    """

    kind: _Kind = "ok"
    status_code: int = 200
    body: bytes = b""
    headers: _Headers = ()
    delay: float = 0.0  # before anything is sent (status line included)
    content: str | None = None  # answer text; default f"hello from {provider name}"
    chunks: int = 3
    interval: float = 0.0  # between stream events
    stall_after: int | None = None
    cut_after: int | None = None
    done: bool = True
    finish: bool = True
    malformed_at: int | None = None
    first_event_error: str | None = None  # JSON text of the error object
    model: str | None = None  # model_not_found: the model to name (default: the request's)
    first_event_delay: float = 0.0  # streams: after the headers, before the first event
    keepalive: float | None = None  # streams: a ": keepalive" comment this often while waiting

    def __post_init__(self) -> None:
        if self.delay < 0 or self.interval < 0 or self.first_event_delay < 0:
            raise ValueError("delay, interval and first_event_delay must be >= 0")
        if self.keepalive is not None and self.keepalive <= 0:
            raise ValueError("keepalive must be > 0")
        if self.chunks < 1:
            raise ValueError("a stream has at least one chunk")
        if self.stall_after is not None and self.cut_after is not None:
            raise ValueError("stall_after and cut_after are exclusive")
        for name in ("stall_after", "cut_after"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= self.chunks:
                raise ValueError(f"{name} must be within 0..chunks ({self.chunks}), got {value}")
        if self.malformed_at is not None and not 1 <= self.malformed_at <= self.chunks:
            raise ValueError(f"malformed_at must be within 1..chunks ({self.chunks})")

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name != "kind" and getattr(self, f.name) != f.default
        ]
        return f"Behaviour.{self.kind}({', '.join(changed)})"

    # -- success ---------------------------------------------------------------------------------

    @classmethod
    def ok(
        cls, *, delay: float = 0.0, content: str | None = None, headers: Mapping[str, str] | None = None
    ) -> Behaviour:
        """200: JSON, or a 3-chunk SSE stream if the request asked for ``"stream": true``."""
        return cls("ok", delay=delay, content=content, headers=_merge_headers({}, headers))

    @classmethod
    def slow_first_byte(cls, delay: float) -> Behaviour:
        """Like :meth:`ok`, but nothing (not even the status line) is sent for ``delay`` seconds."""
        return cls.ok(delay=delay)

    @classmethod
    def stream(
        cls,
        chunks: int = 3,
        *,
        interval: float = 0.0,
        stall_after: int | None = None,
        cut_after: int | None = None,
        done: bool = True,
        finish: bool = True,
        malformed_at: int | None = None,
        first_event_error: Mapping[str, Any] | None = None,
        content: str | None = None,
        delay: float = 0.0,
        first_event_delay: float = 0.0,
        keepalive: float | None = None,
    ) -> Behaviour:
        """An SSE answer (whatever the request's ``stream`` flag says), in the path's dialect.

        ``chunks`` content events, the last one carrying the finish reason if ``finish``, then
        ``data: [DONE]`` if ``done`` (Anthropic: ``message_stop``; Responses API: no terminator).
        ``stall_after=N``: after N chunks go quiet but keep the connection open.
        ``cut_after=N``: after N chunks close the connection without the chunked terminator.
        ``malformed_at=N``: chunk N is ``data: {not json`` and the stream otherwise completes.
        ``first_event_error``: 200 ``text/event-stream`` whose only event is that error, then end.
        ``first_event_delay``: the headers go at once, the first event that long after (a model that
        thinks before its first token); ``keepalive``: meanwhile a ``: keepalive`` comment that often.
        """
        return cls(
            "stream",
            chunks=chunks,
            interval=interval,
            stall_after=stall_after,
            cut_after=cut_after,
            done=done,
            finish=finish,
            malformed_at=malformed_at,
            first_event_error=None if first_event_error is None else _dumps(first_event_error),
            content=content,
            delay=delay,
            first_event_delay=first_event_delay,
            keepalive=keepalive,
        )

    # -- errors ----------------------------------------------------------------------------------

    @classmethod
    def status(
        cls,
        status: int,
        *,
        body: bytes | str | Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> Behaviour:
        """Any status with exactly this body (a mapping is sent as JSON; ``None``: empty body)."""
        raw, content_type = _encode_body(body)
        base = {"Content-Type": content_type} if content_type else {}
        return cls("status", status_code=status, body=raw, headers=_merge_headers(base, headers), delay=delay)

    @classmethod
    def rate_limited(
        cls,
        *,
        retry_after: str | float | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | str | Mapping[str, Any] | None = None,
    ) -> Behaviour:
        """429 with an OpenAI ``rate_limit_exceeded`` body; ``retry_after`` sets ``Retry-After``."""
        extra: dict[str, str] = {}
        if retry_after is not None:
            extra["Retry-After"] = _number_text(retry_after)
        extra.update(headers or {})
        return cls.status(429, body=_RATE_LIMITED if body is None else body, headers=extra)

    @classmethod
    def billing(cls) -> Behaviour:
        """402 with an insufficient-credits body."""
        return cls.status(402, body=_BILLING)

    @classmethod
    def revoked(cls) -> Behaviour:
        """401 with ``{"error": {"code": "invalid_api_key", ...}}``."""
        return cls.status(401, body=_invalid_key_body("Incorrect API key provided."))

    @classmethod
    def auth_failed(cls) -> Behaviour:
        """401 with a generic body (no revocation code)."""
        return cls.status(401, body=_AUTH_FAILED)

    @classmethod
    def server_error(cls, status: int = 500) -> Behaviour:
        return cls.status(status, body=_SERVER_ERROR)

    @classmethod
    def overloaded(cls) -> Behaviour:
        """529 with an Anthropic ``overloaded_error`` body."""
        return cls.status(529, body=_OVERLOADED)

    @classmethod
    def context_length(cls) -> Behaviour:
        """400 ``context_length_exceeded``."""
        return cls.status(400, body=_CONTEXT_LENGTH)

    @classmethod
    def model_not_found(cls, model: str | None = None) -> Behaviour:
        """404 naming ``model``, or the request's model when not given."""
        return cls("model_not_found", status_code=404, model=model)

    # -- connection-level ------------------------------------------------------------------------

    @classmethod
    def reset(cls) -> Behaviour:
        """Read the request, then reset the connection (RST) before any response byte."""
        return cls("reset")

    @classmethod
    def silence(cls) -> Behaviour:
        """Never answer; hold the connection until the client goes away or the server stops."""
        return cls("silence")


class FakeProvider:
    """An LLM provider on ``127.0.0.1`` whose answers are scripted per request.

    Choice for each request (that passes the route and key checks): the scripted queue of the most
    specific match (key+model, key, model, any) that still holds something; else the persistent
    rule of the most specific match; else ``default`` (``Behaviour.ok()`` unless given).

    Requests outside ``prefix`` get 404 ``no such route``; with ``keys`` given, a request whose key
    is not among them gets 401 ``invalid_api_key``. Neither consumes a scripted behaviour. All
    requests are recorded in ``received``.

    After :meth:`stop`, :meth:`start` binds the same port again (a provider coming back).
    """

    def __init__(
        self,
        name: str = "fake",
        *,
        prefix: str = "/v1",
        keys: Iterable[str] | None = None,
        default: Behaviour | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        models: Iterable[str] | None = None,
    ) -> None:
        self.name = name
        self.prefix = _normalise_prefix(prefix)
        if isinstance(keys, str):
            keys = [keys]
        self.keys: frozenset[str] | None = None if keys is None else frozenset(keys)
        self.default: Behaviour = default if default is not None else Behaviour.ok()
        self.host = host
        self.models: tuple[str, ...] = tuple(models) if models is not None else ("fake-model",)
        self.received: list[Received] = []
        self.hangups: list[Hangup] = []
        self._port = port
        self._queues: dict[_Match, deque[Behaviour]] = {}
        self._rules: dict[_Match, Behaviour] = {}
        self._handlers: MutableSet[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._arrived = asyncio.Event()
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        where = self.base_url if self._runner is not None else "stopped"
        return f"<FakeProvider {self.name!r} {where}>"

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._port

    @property
    def origin(self) -> str:
        """``http://host:port``, without the prefix."""
        if self._runner is None:
            raise RuntimeError(f"fake provider {self.name!r} is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    @property
    def base_url(self) -> str:
        """``http://host:port{prefix}``: what a client's ``base_url`` should be."""
        return self.origin + self.prefix

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,  # a client that goes away cancels its silent/stalled handler
            shutdown_timeout=0.25,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening, cancel handlers still holding connections, close everything. Prompt."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()
        pending = list(self._handlers)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- scripting -------------------------------------------------------------------------------

    def script(self, *behaviours: Behaviour, key: str | None = None, model: str | None = None) -> None:
        """Queue behaviours for the next matching requests, consumed in order."""
        self._queues.setdefault((key, model), deque()).extend(behaviours)

    def set(self, behaviour: Behaviour, *, key: str | None = None, model: str | None = None) -> None:
        """A persistent rule for matching requests (replaces the rule of the same match)."""
        self._rules[(key, model)] = behaviour

    def reset_rules(self) -> None:
        """Forget all rules and scripted queues (``default`` and ``received`` are kept)."""
        self._rules.clear()
        self._queues.clear()

    def pending(self, *, key: str | None = None, model: str | None = None) -> int:
        """How many scripted behaviours are still queued for exactly this match."""
        return len(self._queues.get((key, model), ()))

    # -- inspection ------------------------------------------------------------------------------

    @property
    def answering(self) -> int:
        """Requests whose answer is still being sent (or held: silence, a stall). A client that goes
        away ends its request here, so this shows whether a proxy let go of an upstream connection."""
        return len(self._handlers)

    def keys_seen(self) -> list[str | None]:
        return [r.key for r in self.received]

    def count(self, *, key: str | None = None, model: str | None = None, path: str | None = None) -> int:
        """Requests received, filtered by whichever of key, model and (exact) path are given."""
        return sum(
            1
            for r in self.received
            if (key is None or r.key == key)
            and (model is None or r.model == model)
            and (path is None or r.path == path)
        )

    async def wait_for_requests(self, n: int = 1, *, within: float = 5.0) -> None:
        """Wait until at least ``n`` requests were received in total (``TimeoutError`` after ``within``)."""
        async with asyncio.timeout(within):
            while len(self.received) < n:
                self._arrived.clear()
                await self._arrived.wait()

    # -- serving ---------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        seen: list[Received] = []
        try:
            return await self._answer(request, seen)
        except asyncio.CancelledError:
            # handler_cancellation: the client closed the connection mid-answer. stop() cancels the
            # handlers too, but only after clearing _runner: that is the server going, not a client.
            if self._runner is not None and seen:
                self.hangups.append(Hangup(seen[0], time.monotonic()))
            raise
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _answer(self, request: web.Request, seen: list[Received]) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.read()
        rec = _record(request, body, arrived)
        seen.append(rec)
        self.received.append(rec)
        self._arrived.set()

        endpoint = self._endpoint(request.path)
        if endpoint is None:
            return self._json(404, {"error": {"message": "no such route"}})
        if self.keys is not None and rec.key not in self.keys:
            return self._json(
                401,
                _invalid_key_body(f"Incorrect API key provided (unknown to provider {self.name!r})."),
            )

        b = self._pick(rec.key, rec.model)
        if b.delay:
            await asyncio.sleep(b.delay)
        if b.kind == "ok":
            if rec.stream and endpoint in _STREAMING:
                return await self._stream(request, b, endpoint, rec)
            return self._json(200, self._ok_body(endpoint, b, rec), b.headers)
        if b.kind == "status":
            return web.Response(
                status=b.status_code,
                reason=_REASONS.get(b.status_code),
                body=b.body,
                headers=self._headers(b.headers),
            )
        if b.kind == "model_not_found":
            return self._json(404, _model_not_found_body(b.model or rec.model or "x"), b.headers)
        if b.kind == "reset":
            _reset_connection(request)
            return web.Response(status=500)  # never reaches the wire: the transport is gone
        if b.kind == "silence":
            await _forever()
        return await self._stream(request, b, endpoint, rec)

    def _pick(self, key: str | None, model: str | None) -> Behaviour:
        matches = _matches(key, model)
        for match in matches:
            queue = self._queues.get(match)
            if queue:
                return queue.popleft()
        for match in matches:
            rule = self._rules.get(match)
            if rule is not None:
                return rule
        return self.default

    def _endpoint(self, path: str) -> str | None:
        """The dialect of ``path`` (``None`` if outside the prefix)."""
        if self.prefix:
            if path != self.prefix and not path.startswith(self.prefix + "/"):
                return None
            path = path[len(self.prefix) :]
        for suffix, endpoint in _ENDPOINTS:
            if path.endswith(suffix):
                return endpoint
        if path == "/models" or path.startswith("/models/"):
            return "models"
        return "other"

    def _headers(self, extra: _Headers = (), **more: str) -> dict[str, str]:
        merged = _merge_headers(more, dict(extra))
        return {"x-fake-provider": self.name, **dict(merged)}

    def _json(self, status: int, data: object, extra: _Headers = ()) -> web.Response:
        return web.Response(
            status=status,
            body=_dumps(data).encode(),
            headers=self._headers(extra, **{"Content-Type": "application/json"}),
        )

    def _text(self, b: Behaviour) -> str:
        return b.content if b.content is not None else f"hello from {self.name}"

    def _ok_body(self, endpoint: str, b: Behaviour, rec: Received) -> dict[str, Any]:
        n = next(self._ids)
        text = self._text(b)
        model = rec.model or self.models[0]
        created = int(time.time())
        prompt_tokens = max(1, len(rec.body) // 4)
        out_tokens = max(1, len(text.split()))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": out_tokens,
            "total_tokens": prompt_tokens + out_tokens,
        }
        if endpoint == "chat":
            return {
                "id": f"chatcmpl-{self.name}-{n}",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        if endpoint == "completions":
            return {
                "id": f"cmpl-{self.name}-{n}",
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage,
            }
        if endpoint == "anthropic":
            return {
                "id": f"msg_{self.name}_{n}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": out_tokens},
            }
        if endpoint == "responses":
            return _responses_object(f"resp_{self.name}_{n}", model, created, text, "completed")
        if endpoint == "embeddings":
            inputs = _json_field(rec.body, "input")
            count = len(inputs) if isinstance(inputs, list) and inputs else 1
            return {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3, 0.4]}
                    for i in range(count)
                ],
                "model": model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        if endpoint == "models":
            return {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": self.name} for m in self.models
                ],
            }
        return {"object": "fake.echo", "provider": self.name, "method": rec.method, "path": rec.path}

    async def _stream(
        self, request: web.Request, b: Behaviour, endpoint: str, rec: Received
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200,
            headers=self._headers(
                b.headers, **{"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            ),
        )
        await resp.prepare(request)  # StreamResponse sends the status line and headers right away
        sse = _dialect(endpoint)(
            f"{self.name}-{next(self._ids)}", rec.model or self.models[0], int(time.time()), self._text(b)
        )
        try:
            if b.first_event_delay:
                await _wait_with_keepalives(resp, b.first_event_delay, b.keepalive)
            if b.first_event_error is not None:
                await resp.write(sse.error(json.loads(b.first_event_error)))
                return resp
            pieces = _split(self._text(b), b.chunks)
            events = [
                sse.chunk(
                    piece,
                    first=i == 1,
                    last=i == len(pieces),
                    finish=b.finish and i == len(pieces),
                    malformed=b.malformed_at == i,
                )
                for i, piece in enumerate(pieces, start=1)
            ]
            options = _json_field(rec.body, "stream_options")
            if b.finish and isinstance(options, dict) and options.get("include_usage") is True:
                # OpenAI's final chunk: no choices, the usage; sent only when the client asked for it.
                events.append(sse.usage(max(1, len(rec.body) // 4), max(1, len(self._text(b).split()))))
            if b.done:
                events.append(sse.done())
            for i in range(len(events) + 1):
                if i == b.stall_after:
                    await _forever()
                if i == b.cut_after:
                    _cut_connection(request)
                    return resp
                if i == len(events):
                    break
                if i and b.interval:
                    await asyncio.sleep(b.interval)
                if events[i]:
                    await resp.write(events[i])
        except ConnectionError:
            # The client went away mid-body (a write noticed it before the cancellation did);
            # aiohttp finishes quietly.
            self.hangups.append(Hangup(rec, time.monotonic()))
        return resp


# -- the wire formats --------------------------------------------------------------------------------

_Match = tuple[str | None, str | None]

_ENDPOINTS: Final = (
    ("/chat/completions", "chat"),
    ("/messages", "anthropic"),
    ("/embeddings", "embeddings"),
    ("/completions", "completions"),
    ("/responses", "responses"),
)
_STREAMING: Final = frozenset({"chat", "completions", "anthropic", "responses"})
_REASONS: Final = {529: "Site Overloaded"}

_RATE_LIMITED: Final = {
    "error": {
        "message": "Rate limit reached for requests per min (RPM). Please slow down.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}
_BILLING: Final = {
    "error": {
        "message": "Insufficient credits: your account balance is too low to make this request.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_credits",
    }
}
_AUTH_FAILED: Final = {"error": {"message": "Authentication failed.", "type": "authentication_error"}}
_SERVER_ERROR: Final = {
    "error": {"message": "The server had an error while processing your request.", "type": "server_error"}
}
_OVERLOADED: Final = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
_CONTEXT_LENGTH: Final = {
    "error": {
        "message": (
            "This model's maximum context length is 8192 tokens. However, your messages resulted in "
            "9000 tokens. Please reduce the length of the messages."
        ),
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}


def _invalid_key_body(message: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def _model_not_found_body(model: str) -> dict[str, Any]:
    return {
        "error": {
            "message": f"The model `{model}` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }


def _responses_object(ident: str, model: str, created: int, text: str, status: str) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": f"msg_{ident}",
                "status": status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 1, "output_tokens": max(1, len(text.split())), "total_tokens": 2},
    }


def _dumps(data: object) -> str:
    return json.dumps(data, separators=(",", ":"))


def _event(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {_dumps(data)}\n\n".encode()


class _Sse:
    """The events of one streamed answer, OpenAI chat dialect (subclasses: the others)."""

    malformed = b"data: {not json\n\n"

    def __init__(self, ident: str, model: str, created: int, text: str) -> None:
        self.ident, self.model, self.created, self.text = ident, model, created, text

    def chunk(self, piece: str, *, first: bool, last: bool, finish: bool, malformed: bool) -> bytes:
        if malformed:
            return self.malformed
        delta = {"role": "assistant", "content": piece} if first else {"content": piece}
        return _event(
            {
                "id": f"chatcmpl-{self.ident}",
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if finish else None}],
            }
        )

    def done(self) -> bytes:
        return b"data: [DONE]\n\n"

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The ``include_usage`` chunk (empty for the dialects that report usage in their own events)."""
        return _event(
            {
                "id": f"chatcmpl-{self.ident}",
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    def error(self, err: Mapping[str, Any]) -> bytes:
        return _event({"error": err})


class _CompletionsSse(_Sse):
    def chunk(self, piece: str, *, first: bool, last: bool, finish: bool, malformed: bool) -> bytes:
        if malformed:
            return self.malformed
        return _event(
            {
                "id": f"cmpl-{self.ident}",
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {"index": 0, "text": piece, "logprobs": None, "finish_reason": "stop" if finish else None}
                ],
            }
        )


class _AnthropicSse(_Sse):
    """``message_start`` and ``content_block_start`` ride with chunk 1; ``finish`` adds
    ``content_block_stop`` + ``message_delta`` (stop_reason) to the last chunk; ``done`` is
    ``message_stop``."""

    malformed = b"event: content_block_delta\ndata: {not json\n\n"

    def chunk(self, piece: str, *, first: bool, last: bool, finish: bool, malformed: bool) -> bytes:
        out = b""
        if first:
            message: dict[str, Any] = {
                "id": f"msg_{self.ident}",
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1},
            }
            out += _event({"type": "message_start", "message": message}, "message_start")
            out += _event(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start",
            )
        if malformed:
            out += self.malformed
        else:
            delta = {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            }
            out += _event(delta, "content_block_delta")
        if finish:
            out += _event({"type": "content_block_stop", "index": 0}, "content_block_stop")
            out += _event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": max(1, len(self.text.split()))},
                },
                "message_delta",
            )
        return out

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return b""  # reported in this dialect's own events

    def done(self) -> bytes:
        return _event({"type": "message_stop"}, "message_stop")

    def error(self, err: Mapping[str, Any]) -> bytes:
        return _event({"type": "error", "error": err}, "error")


class _ResponsesSse(_Sse):
    """``response.created`` rides with chunk 1; ``finish`` adds ``response.completed``; the
    Responses API has no terminator, so ``done`` sends nothing."""

    malformed = b"event: response.output_text.delta\ndata: {not json\n\n"

    def chunk(self, piece: str, *, first: bool, last: bool, finish: bool, malformed: bool) -> bytes:
        out = b""
        if first:
            created = _responses_object(f"resp_{self.ident}", self.model, self.created, "", "in_progress")
            created["output"] = []
            out += _event({"type": "response.created", "response": created}, "response.created")
        if malformed:
            out += self.malformed
        else:
            delta = {
                "type": "response.output_text.delta",
                "item_id": f"msg_resp_{self.ident}",
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
            }
            out += _event(delta, "response.output_text.delta")
        if finish:
            completed = _responses_object(
                f"resp_{self.ident}", self.model, self.created, self.text, "completed"
            )
            out += _event({"type": "response.completed", "response": completed}, "response.completed")
        return out

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return b""  # reported in this dialect's own events

    def done(self) -> bytes:
        return b""

    def error(self, err: Mapping[str, Any]) -> bytes:
        return _event({"type": "error", **err}, "error")


def _dialect(endpoint: str) -> type[_Sse]:
    return {"anthropic": _AnthropicSse, "completions": _CompletionsSse, "responses": _ResponsesSse}.get(
        endpoint, _Sse
    )


# -- helpers -------------------------------------------------------------------------------------------


def _record(request: web.Request, body: bytes, arrived: float) -> Received:
    headers = {name.lower(): value for name, value in request.headers.items()}
    key: str | None = None
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        key = token.strip()
    elif "x-api-key" in headers:
        key = headers["x-api-key"]
    model = _json_field(body, "model")
    return Received(
        time=arrived,
        method=request.method,
        path=request.path,
        host=headers.get("host", ""),
        key=key,
        model=model if isinstance(model, str) else None,
        stream=_json_field(body, "stream") is True,
        body=body,
        headers=headers,
        query=request.rel_url.raw_query_string,
    )


def _json_field(body: bytes, name: str) -> Any:
    if not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        return None
    return data.get(name) if isinstance(data, dict) else None


def _matches(key: str | None, model: str | None) -> list[_Match]:
    """Most specific first: key+model, key, model, any (duplicates dropped)."""
    return list(dict.fromkeys([(key, model), (key, None), (None, model), (None, None)]))


def _split(text: str, n: int) -> list[str]:
    """``n`` consecutive pieces of ``text`` of near-equal length (some empty if text is short)."""
    size, extra = divmod(len(text), n)
    pieces, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def _encode_body(body: bytes | str | Mapping[str, Any] | None) -> tuple[bytes, str | None]:
    if body is None:
        return b"", None
    if isinstance(body, bytes):
        try:
            json.loads(body)
        except ValueError:
            return body, "application/octet-stream"
        return body, "application/json"
    if isinstance(body, str):
        return body.encode(), "text/plain; charset=utf-8"
    return _dumps(body).encode(), "application/json"


def _merge_headers(base: Mapping[str, str], extra: Mapping[str, str] | None) -> _Headers:
    """``base`` overridden by ``extra``, names compared case-insensitively."""
    merged = {name.lower(): (name, value) for name, value in base.items()}
    merged.update({name.lower(): (name, value) for name, value in (extra or {}).items()})
    return tuple(merged.values())


def _number_text(value: str | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip().rstrip("/")
    if prefix and not prefix.startswith("/"):
        prefix = "/" + prefix
    return prefix


async def _wait_with_keepalives(resp: web.StreamResponse, delay: float, every: float | None) -> None:
    """Sleep ``delay`` seconds, writing an SSE comment every ``every`` seconds meanwhile (if given)."""
    end = time.monotonic() + delay
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(left, every) if every else left)
        if every and time.monotonic() < end:
            await resp.write(b": keepalive\n\n")


async def _forever() -> None:
    """Hold until cancelled (client disconnect or server stop)."""
    await asyncio.Event().wait()


def _reset_connection(request: web.Request) -> None:
    """Abort with SO_LINGER 0, so the peer gets a RST rather than an orderly close."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _cut_connection(request: web.Request) -> None:
    """Close after flushing what was written, without the chunked terminator: a truncated body."""
    transport = request.transport
    if transport is not None:
        transport.close()


# -- standalone ------------------------------------------------------------------------------------------

_NAMED: Final[dict[str, Callable[[], Behaviour]]] = {
    "ok": Behaviour.ok,
    "stream": Behaviour.stream,
    "rate_limited": Behaviour.rate_limited,
    "billing": Behaviour.billing,
    "revoked": Behaviour.revoked,
    "auth_failed": Behaviour.auth_failed,
    "server_error": Behaviour.server_error,
    "overloaded": Behaviour.overloaded,
    "context_length": Behaviour.context_length,
    "model_not_found": Behaviour.model_not_found,
    "reset": Behaviour.reset,
    "silence": Behaviour.silence,
}


async def serve_forever(
    name: str = "fake",
    *,
    prefix: str = "/v1",
    keys: Iterable[str] | None = None,
    default: Behaviour | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    models: Iterable[str] | None = None,
    on_ready: Callable[[FakeProvider], object] | None = None,
) -> None:
    """Run one fake provider until cancelled; ``on_ready`` is called once it listens."""
    async with FakeProvider(
        name, prefix=prefix, keys=keys, default=default, host=host, port=port, models=models
    ) as provider:
        if on_ready is not None:
            on_ready(provider)
        await _forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keyroute.fakeprovider",
        description="Run a fake LLM provider on a real socket; prints its base URL.",
    )
    parser.add_argument("--name", default="fake")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--prefix", default="/v1", help="path prefix of the base URL (default /v1)")
    parser.add_argument("--key", action="append", dest="keys", help="accepted key (repeatable; default any)")
    parser.add_argument("--model", action="append", dest="models", help="model listed by GET /models")
    parser.add_argument("--default", choices=sorted(_NAMED), default="ok", help="answer to every request")
    args = parser.parse_args(argv)

    async def run() -> None:
        task = asyncio.current_task()
        if task is not None:
            with contextlib.suppress(NotImplementedError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve_forever(
                args.name,
                prefix=args.prefix,
                keys=args.keys,
                default=_NAMED[args.default](),
                host=args.host,
                port=args.port,
                models=args.models,
                on_ready=lambda provider: print(provider.base_url, flush=True),
            )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
