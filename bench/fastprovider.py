"""A minimal, fast fake LLM provider for benchmarks (not the test fake: that is keyroute.fakeprovider).

It must never be what limits a benchmark, so the default implementation is a raw asyncio Protocol on
uvloop with the whole response precomputed: one ``write`` per answer. An aiohttp implementation of
the same behaviour is kept (``--impl aiohttp``) to show the difference.

Behaviour:

- ``POST */chat/completions`` (any POST path, in fact): a fixed ~400-byte OpenAI chat completion;
  if the body has ``"stream": true``, an SSE stream (chunked transfer encoding) of N
  ``chat.completion.chunk`` events, the last with ``finish_reason``, then ``data: [DONE]``.
  The first event goes out with the response head. N and the pause between events come from
  ``--stream-chunks`` / ``--chunk-delay-ms`` or, per request, from the ``X-Bench-Chunks`` and
  ``X-Bench-Chunk-Delay-Ms`` headers (proxies forward them).
- a request whose key (``Authorization: Bearer K`` or ``x-api-key: K``) is in ``--fail-keys`` gets
  ``--fail-status``: 429 with ``Retry-After`` (``rate_limit_exceeded``) or 500 (``server_error``).
- ``GET /stats``: JSON counts per key and status, open and max concurrently open streams;
  ``POST /stats/reset`` zeroes them.

Usage::

    python bench/fastprovider.py --port 9001 [--fail-keys K1,K2] [--fail-status 429] [--impl raw|aiohttp]

It prints ``READY <port>`` on stdout once listening, and runs until SIGTERM/SIGINT or ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import run

COMPLETION = (
    b'{"id":"chatcmpl-bench000000000000000000000001","object":"chat.completion","created":1700000000,'
    b'"model":"gpt-bench","choices":[{"index":0,"message":{"role":"assistant","content":'
    b'"Hello! This is the fixed answer of the keyroute benchmark provider, about four hundred bytes.",'
    b'"refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,'
    b'"completion_tokens":21,"total_tokens":33},"system_fingerprint":"fp_bench01"}'
)
RATE_LIMITED = (
    b'{"error":{"message":"Rate limit reached for requests","type":"requests","param":null,'
    b'"code":"rate_limit_exceeded"}}'
)
SERVER_ERROR = (
    b'{"error":{"message":"The server had an error while processing your request.",'
    b'"type":"server_error","param":null,"code":null}}'
)
NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error","code":"not_found"}}'
_REASONS = {200: b"OK", 404: b"Not Found", 429: b"Too Many Requests", 500: b"Internal Server Error"}


def _head(status: int, ctype: bytes, length: int | None, extra: list[tuple[bytes, bytes]] = ()) -> bytes:  # type: ignore[assignment]
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"X")), b"Content-Type: " + ctype]
    if length is None:
        lines.append(b"Transfer-Encoding: chunked")
    else:
        lines.append(b"Content-Length: %d" % length)
    lines += [b"x-request-id: req_bench", b"openai-processing-ms: 1"]
    lines += [k + b": " + v for k, v in extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def sse_event(i: int, n: int) -> bytes:
    if i < n - 1:
        delta, finish = b'{"content":"tok%d "}' % i, b"null"
    else:
        delta, finish = b"{}", b'"stop"'
    return (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"gpt-bench","choices":[{"index":0,"delta":'
        + delta
        + b',"finish_reason":'
        + finish
        + b"}]}\n\n"
    )


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class State:
    """Counters and configuration shared by every connection."""

    def __init__(self, args: argparse.Namespace):
        self.fail_keys = {k for k in (args.fail_keys or "").split(",") if k}
        self.fail_status = args.fail_status
        self.chunks = args.stream_chunks
        self.delay = args.chunk_delay_ms / 1000.0
        self.by_key: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.requests = 0
        self.open_streams = 0
        self.max_open_streams = 0
        fail_body = RATE_LIMITED if self.fail_status == 429 else SERVER_ERROR
        extra = [(b"Retry-After", str(args.retry_after).encode())] if self.fail_status == 429 else []
        self.ok_response = _head(200, b"application/json", len(COMPLETION)) + COMPLETION
        self.fail_response = _head(self.fail_status, b"application/json", len(fail_body), extra) + fail_body
        self.fail_body, self.fail_extra = fail_body, extra
        self.not_found = _head(404, b"application/json", len(NOT_FOUND)) + NOT_FOUND
        self.stream_head = _head(200, b"text/event-stream", None, [(b"Cache-Control", b"no-cache")])
        self.events = [sse_event(i, 64) for i in range(64)]

    def event(self, i: int, n: int) -> bytes:
        return sse_event(i, n) if n > len(self.events) or i == n - 1 else self.events[min(i, 62)]

    def count(self, key: str, status: int) -> None:
        self.requests += 1
        self.by_key[key][status] += 1

    def stats(self) -> bytes:
        return json.dumps(
            {
                "requests": self.requests,
                "by_key": {k: {str(s): n for s, n in v.items()} for k, v in self.by_key.items()},
                "open_streams": self.open_streams,
                "max_open_streams": self.max_open_streams,
            }
        ).encode()

    def reset(self) -> None:
        self.by_key.clear()
        self.requests = 0
        self.max_open_streams = self.open_streams


def _key_of(auth: str, api_key: str) -> str:
    if auth.startswith("Bearer "):
        return auth[7:].strip()
    return api_key.strip()


def _is_stream(body: bytes) -> bool:
    return b'"stream":true' in body or b'"stream": true' in body


# --- raw asyncio Protocol implementation --------------------------------------------------------


class RawProvider(asyncio.Protocol):
    __slots__ = ("buf", "busy", "closing", "loop", "state", "timer", "transport")

    def __init__(self, state: State):
        self.state = state
        self.buf = bytearray()
        self.busy = False  # a stream is being sent on this connection
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.busy:
            self.busy = False
            self.state.open_streams -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        while not self.busy and self.transport is not None:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).split(b"\r\n")
            try:
                method, target, version = head[0].split(b" ", 2)
            except ValueError:
                self.transport.close()
                return
            length = 0
            chunked_body = False
            auth = api_key = ""
            chunks, delay = self.state.chunks, self.state.delay
            keep_alive = version == b"HTTP/1.1"
            for line in head[1:]:
                name, _, value = line.partition(b":")
                n = name.strip().lower()
                if n == b"content-length":
                    length = int(value)
                elif n == b"authorization":
                    auth = value.strip().decode("latin-1")
                elif n == b"x-api-key":
                    api_key = value.strip().decode("latin-1")
                elif n == b"transfer-encoding":
                    chunked_body = b"chunked" in value.lower()
                elif n == b"connection":
                    v = value.strip().lower()
                    keep_alive = v != b"close" and (keep_alive or v == b"keep-alive")
                elif n == b"x-bench-chunks":
                    chunks = max(1, int(value))
                elif n == b"x-bench-chunk-delay-ms":
                    delay = float(value) / 1000.0
            start = end + 4
            if chunked_body:
                parsed = _dechunk(buf, start)
                if parsed is None:
                    return
                body, consumed = parsed
            else:
                if len(buf) < start + length:
                    return
                body, consumed = bytes(buf[start : start + length]), start + length
            del buf[:consumed]
            self._answer(method, target, body, _key_of(auth, api_key), chunks, delay)
            if not keep_alive:
                self.closing = True
                if not self.busy and self.transport is not None:
                    self.transport.close()
                return

    def _answer(self, method: bytes, target: bytes, body: bytes, key: str, chunks: int, delay: float) -> None:
        st = self.state
        t = self.transport
        assert t is not None
        if method == b"GET" and target.startswith(b"/stats"):
            data = st.stats()
            t.write(_head(200, b"application/json", len(data)) + data)
            return
        if method == b"POST" and target.startswith(b"/stats/reset"):
            st.reset()
            t.write(_head(200, b"application/json", 2) + b"{}")
            return
        if method != b"POST":
            st.count(key, 404)
            t.write(st.not_found)
            return
        if key in st.fail_keys:
            st.count(key, st.fail_status)
            t.write(st.fail_response)
            return
        st.count(key, 200)
        if not _is_stream(body):
            t.write(st.ok_response)
            return
        st.open_streams += 1
        st.max_open_streams = max(st.max_open_streams, st.open_streams)
        self.busy = True
        t.write(st.stream_head + chunked(st.event(0, chunks)))
        self._stream(1, chunks, delay)

    def _stream(self, i: int, n: int, delay: float) -> None:
        self.timer = None
        t = self.transport
        if t is None:
            return
        st = self.state
        while i < n:
            if delay > 0:
                self.timer = self.loop.call_later(delay, self._next, i, n, delay)
                return
            t.write(chunked(st.event(i, n)))
            i += 1
        t.write(chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.busy = False
        st.open_streams -= 1
        if self.closing:
            t.close()
        elif self.buf:
            self._process()

    def _next(self, i: int, n: int, delay: float) -> None:
        t = self.transport
        if t is None:
            return
        t.write(chunked(self.state.event(i, n)))
        if i + 1 < n:
            self.timer = self.loop.call_later(delay, self._next, i + 1, n, delay)
        else:
            self._stream(n, n, delay)


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """Decode a chunked request body starting at ``pos``; None if incomplete."""
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)
            if end < 0:
                return None
            return bytes(out), end + 4
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


async def serve_raw(args: argparse.Namespace, state: State) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: RawProvider(state), args.host, args.port, backlog=2048)


# --- aiohttp implementation ---------------------------------------------------------------------


async def serve_aiohttp(args: argparse.Namespace, state: State) -> object:
    from aiohttp import web

    async def stats(request: web.Request) -> web.Response:
        if request.method == "POST":
            state.reset()
            return web.json_response({})
        return web.Response(body=state.stats(), content_type="application/json")

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        key = _key_of(request.headers.get("Authorization", ""), request.headers.get("x-api-key", ""))
        if key in state.fail_keys:
            state.count(key, state.fail_status)
            return web.Response(
                status=state.fail_status,
                body=state.fail_body,
                content_type="application/json",
                headers={k.decode(): v.decode() for k, v in state.fail_extra},
            )
        state.count(key, 200)
        if not _is_stream(body):
            return web.Response(body=COMPLETION, content_type="application/json")
        n = int(request.headers.get("X-Bench-Chunks", state.chunks))
        delay = float(request.headers.get("X-Bench-Chunk-Delay-Ms", state.delay * 1000)) / 1000.0
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        state.open_streams += 1
        state.max_open_streams = max(state.max_open_streams, state.open_streams)
        try:
            await resp.prepare(request)
            for i in range(n):
                if i and delay > 0:
                    await asyncio.sleep(delay)
                await resp.write(state.event(i, n))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        finally:
            state.open_streams -= 1
        return resp

    app = web.Application()
    app.router.add_route("*", "/stats{tail:.*}", stats)
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=2048, reuse_address=True)
    await site.start()
    return runner


async def main_async(args: argparse.Namespace) -> None:
    state = State(args)
    server: object = await (serve_raw(args, state) if args.impl == "raw" else serve_aiohttp(args, state))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {args.port}", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), timeout=args.max_seconds)
    except TimeoutError:
        print("fastprovider: --max-seconds reached, exiting", file=sys.stderr)
    if isinstance(server, asyncio.AbstractServer):
        server.close()
    else:
        await server.cleanup()  # type: ignore[attr-defined]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fail-keys", default="", help="comma-separated keys that get --fail-status")
    p.add_argument("--fail-status", type=int, choices=[429, 500], default=429)
    p.add_argument("--retry-after", type=int, default=30, help="Retry-After seconds sent with a 429")
    p.add_argument("--stream-chunks", type=int, default=20, help="events per stream (X-Bench-Chunks)")
    p.add_argument(
        "--chunk-delay-ms", type=float, default=0.0, help="pause between events (X-Bench-Chunk-Delay-Ms)"
    )
    p.add_argument("--impl", choices=["raw", "aiohttp"], default="raw")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="exit by itself after this long")
    args = p.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("the bench provider listens on loopback only")
    run(main_async(args), args.loop)


if __name__ == "__main__":
    main()
