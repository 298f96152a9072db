"""Closed-loop HTTP/1.1 load generator for the keyroute benchmarks (its own process; loopback only).

C workers, each with its own keep-alive connection (the pool is sized to C), send requests back to
back: a warm-up of W requests (not recorded), then N requests (``-n``) or as many as fit in T
seconds (``--duration``). Per request it records, with ``perf_counter_ns``, the time from writing the
request to the last byte of the answer and, for streams, to the first byte of the body (TTFB).

The default client (``--client raw``) is an asyncio Protocol on uvloop with a minimal incremental
HTTP/1.1 response parser (Content-Length and chunked); timestamps are taken in ``data_received``, not
after the worker coroutine resumes, so loop scheduling of other workers does not inflate them.
``--client aiohttp`` uses an aiohttp ClientSession with a connector limited to C, to show how much
the generator itself costs (see ``run.py``'s generator check).

Prints one JSON object on stdout: throughput, latency p50/p90/p99/p999/max (ms), TTFB for streams,
errors by reason, and optionally which provider/credential the sidecar says served
(``X-Keyroute-Provider``/``X-Keyroute-Credential``).

Example::

    python bench/loadgen.py --url http://127.0.0.1:8411/v1/chat/completions -c 32 -n 20000 --warmup 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import percentiles, run

_ns = time.perf_counter_ns


@dataclass(slots=True)
class Result:
    status: int = 0
    t0: int = 0
    t_first: int = 0  # first body byte
    t_done: int = 0
    body: bytearray = field(default_factory=bytearray)
    provider: str = ""
    credential: str = ""
    close: bool = False


# --- raw client -----------------------------------------------------------------------------------

_HEAD, _LEN, _CSIZE, _CDATA, _CCRLF, _CTRAIL, _EOF = range(7)


class RawConn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, want_headers: bool):
        self.want_headers = want_headers
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.fut: asyncio.Future[Result] | None = None
        self.res = Result()
        self.state = _HEAD
        self.remaining = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        fut = self.fut
        if fut is not None and not fut.done():
            if self.state == _EOF:
                self._finish()
            else:
                fut.set_exception(ConnectionError("connection closed mid-response"))

    def request(self, data: bytes) -> asyncio.Future[Result]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.fut = fut = loop.create_future()
        self.res = Result()
        self.state = _HEAD
        self.buf.clear()
        self.res.t0 = _ns()
        self.transport.write(data)
        return fut

    def data_received(self, data: bytes) -> None:
        if self.fut is None or self.fut.done():
            return  # stray bytes after a failed request: the connection is dropped anyway
        self.buf += data
        try:
            self._parse()
        except Exception as exc:  # malformed answer
            if not self.fut.done():
                self.fut.set_exception(exc)
            if self.transport is not None:
                self.transport.close()

    def _body(self, chunk: bytes | bytearray) -> None:
        res = self.res
        if not res.t_first and chunk:
            res.t_first = _ns()
        res.body += chunk

    def _parse(self) -> None:
        buf = self.buf
        pos = 0
        res = self.res
        while True:
            st = self.state
            if st == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                lines = bytes(buf[pos:end]).split(b"\r\n")
                res.status = int(lines[0].split(b" ", 2)[1])
                length = -1
                is_chunked = False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    n = name.lower()
                    if n == b"content-length":
                        length = int(value)
                    elif n == b"transfer-encoding":
                        is_chunked = b"chunked" in value.lower()
                    elif n == b"connection":
                        res.close = value.strip().lower() == b"close"
                    elif self.want_headers and n == b"x-keyroute-provider":
                        res.provider = value.strip().decode()
                    elif self.want_headers and n == b"x-keyroute-credential":
                        res.credential = value.strip().decode()
                pos = end + 4
                if is_chunked:
                    self.state = _CSIZE
                elif length >= 0:
                    self.state, self.remaining = _LEN, length
                    if length == 0:
                        del buf[:pos]
                        self._finish()
                        return
                else:
                    self.state = _EOF
                    res.close = True
            elif st == _LEN:
                take = min(self.remaining, len(buf) - pos)
                if take <= 0:
                    break
                self._body(buf[pos : pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    del buf[:pos]
                    self._finish()
                    return
            elif st == _CSIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                pos = eol + 2
                if size == 0:
                    self.state = _CTRAIL
                else:
                    self.state, self.remaining = _CDATA, size
            elif st == _CDATA:
                take = min(self.remaining, len(buf) - pos)
                if take <= 0:
                    break
                self._body(buf[pos : pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = _CCRLF
            elif st == _CCRLF:
                if len(buf) - pos < 2:
                    break
                pos += 2
                self.state = _CSIZE
            elif st == _CTRAIL:
                if len(buf) - pos < 2:
                    break
                if buf[pos : pos + 2] == b"\r\n":
                    pos += 2
                else:
                    end = buf.find(b"\r\n\r\n", pos)
                    if end < 0:
                        break
                    pos = end + 4
                del buf[:pos]
                self._finish()
                return
            else:  # _EOF: body until the connection closes
                if len(buf) > pos:
                    self._body(buf[pos:])
                pos = len(buf)
                break
        del buf[:pos]

    def _finish(self) -> None:
        self.res.t_done = _ns()
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(self.res)


class RawClient:
    def __init__(self, url: str, want_headers: bool):
        u = urlsplit(url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("loadgen targets loopback only")
        self.host, self.port = u.hostname, u.port or 80
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.want_headers = want_headers

    async def connect(self) -> RawConn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: RawConn(self.want_headers), self.host, self.port)
        return proto

    def build(self, body: bytes, headers: list[tuple[str, str]]) -> bytes:
        head = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Content-Type: application/json",
            "Accept: application/json",
            f"Content-Length: {len(body)}",
        ]
        head += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Stats:
    lat: list[int] = field(default_factory=list)
    ttfb: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)
    done: int = 0
    sent: int = 0  # every request started, warm-up included (what the proxy's CPU time covers)
    t_start: int = 0
    t_end: int = 0


def make_body(args: argparse.Namespace, model: str) -> bytes:
    content = "Say hello in one short sentence."
    if args.body_bytes > 0:
        content += " " + "lorem ipsum " * max(0, (args.body_bytes - 150) // 12)
    msg = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 64}
    if args.stream:
        msg["stream"] = True
    return json.dumps(msg, separators=(",", ":")).encode()


def valid(args: argparse.Namespace, res: Result) -> str | None:
    if res.status != args.expect_status:
        return f"status {res.status}"
    if args.expect_status != 200:
        return None
    if args.stream:
        if not res.body.rstrip().endswith(b"data: [DONE]"):
            return "stream incomplete"
    elif not res.body.startswith(b"{"):
        return "bad body"
    return None


class Phase:
    def __init__(self, count: int | None, duration: float | None, record: bool):
        self.left = count
        self.deadline = time.monotonic() + duration if duration else None
        self.record = record
        self.index = 0

    def take(self) -> int | None:
        if self.left is not None:
            if self.left <= 0:
                return None
            self.left -= 1
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return None
        self.index += 1
        return self.index - 1


async def run_raw(args: argparse.Namespace) -> Stats:
    client = RawClient(args.url, args.record_headers)
    headers = [("Authorization", f"Bearer {args.key}")] + [tuple(h.split(":", 1)) for h in args.header]  # type: ignore[misc]
    headers = [(k.strip(), v.strip()) for k, v in headers]
    fixed = client.build(make_body(args, args.model), headers)
    conns: list[RawConn] = list(await asyncio.gather(*(client.connect() for _ in range(args.concurrency))))
    stats = Stats()
    inflight: dict[int, RawConn] = {}
    serial = 0

    def request_bytes() -> bytes:
        nonlocal serial
        serial += 1
        if args.unique_model:
            return client.build(make_body(args, f"{args.unique_model}{serial}"), headers)
        return fixed

    async def worker(k: int, phase: Phase) -> None:
        conn = conns[k]
        while phase.take() is not None:
            if conn.lost:
                conn = conns[k] = await client.connect()
            fut = conn.request(request_bytes())
            stats.sent += 1
            inflight[k] = conn
            try:
                res = await fut
            except Exception as exc:
                stats.errors[type(exc).__name__] += 1
                conn.lost = True
                if conn.transport is not None:
                    conn.transport.close()
                continue
            finally:
                inflight.pop(k, None)
            if res.close:
                conn.lost = True
                if conn.transport is not None:
                    conn.transport.close()
            if not phase.record:
                continue
            err = valid(args, res)
            stats.done += 1
            if err:
                stats.errors[err] += 1
                continue
            stats.lat.append(res.t_done - res.t0)
            if args.stream:
                stats.ttfb.append(res.t_first - res.t0)
            if args.record_headers:
                stats.served[f"{res.provider}/{res.credential}"] += 1
            stats.t_end = max(stats.t_end, res.t_done)

    async def watchdog() -> None:
        limit = int(args.timeout * 1e9)
        while True:
            await asyncio.sleep(0.5)
            now = _ns()
            for conn in list(inflight.values()):
                if conn.fut is not None and not conn.fut.done() and now - conn.res.t0 > limit:
                    conn.fut.set_exception(TimeoutError("request timed out"))

    dog = asyncio.create_task(watchdog())
    try:
        if args.warmup:
            warm = Phase(args.warmup, None, record=False)
            await asyncio.gather(*(worker(k, warm) for k in range(args.concurrency)))
        phase = Phase(args.requests, args.duration, record=True)
        stats.t_start = _ns()
        await asyncio.gather(*(worker(k, phase) for k in range(args.concurrency)))
        if not stats.t_end:
            stats.t_end = _ns()
    finally:
        dog.cancel()
        for c in conns:
            if c.transport is not None:
                c.transport.close()
    return stats


async def run_aiohttp(args: argparse.Namespace) -> Stats:
    import aiohttp

    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loadgen targets loopback only")
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    for h in args.header:
        k, v = h.split(":", 1)
        headers[k.strip()] = v.strip()
    fixed = make_body(args, args.model)
    stats = Stats()
    serial = 0
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:

        async def one(record: bool) -> None:
            nonlocal serial
            serial += 1
            body = make_body(args, f"{args.unique_model}{serial}") if args.unique_model else fixed
            res = Result()
            stats.sent += 1
            res.t0 = _ns()
            try:
                async with session.post(args.url, data=body, headers=headers) as resp:
                    res.status = resp.status
                    res.provider = resp.headers.get("X-Keyroute-Provider", "")
                    res.credential = resp.headers.get("X-Keyroute-Credential", "")
                    async for chunk in resp.content.iter_any():
                        if not res.t_first:
                            res.t_first = _ns()
                        res.body += chunk
                res.t_done = _ns()
            except Exception as exc:
                stats.errors[type(exc).__name__] += 1
                return
            if not record:
                return
            stats.done += 1
            err = valid(args, res)
            if err:
                stats.errors[err] += 1
                return
            stats.lat.append(res.t_done - res.t0)
            if args.stream:
                stats.ttfb.append(res.t_first - res.t0)
            if args.record_headers:
                stats.served[f"{res.provider}/{res.credential}"] += 1
            stats.t_end = max(stats.t_end, res.t_done)

        async def worker(phase: Phase) -> None:
            while phase.take() is not None:
                await one(phase.record)

        if args.warmup:
            warm = Phase(args.warmup, None, record=False)
            await asyncio.gather(*(worker(warm) for _ in range(args.concurrency)))
        phase = Phase(args.requests, args.duration, record=True)
        stats.t_start = _ns()
        await asyncio.gather(*(worker(phase) for _ in range(args.concurrency)))
        if not stats.t_end:
            stats.t_end = _ns()
    return stats


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    runner = run_raw if args.client == "raw" else run_aiohttp
    stats = await asyncio.wait_for(runner(args), timeout=args.max_seconds)
    elapsed = max(stats.t_end - stats.t_start, 1) / 1e9
    ok = len(stats.lat)
    out: dict[str, object] = {
        "url": args.url,
        "client": args.client,
        "concurrency": args.concurrency,
        "stream": args.stream,
        "warmup": args.warmup,
        "completed": stats.done,
        "sent_total": stats.sent,
        "ok": ok,
        "errors": sum(stats.errors.values()),
        "error_reasons": dict(stats.errors),
        "elapsed_s": round(elapsed, 4),
        "rps": round(ok / elapsed, 1),
        "latency_ms": percentiles(stats.lat),
    }
    if args.stream:
        out["ttfb_ms"] = percentiles(stats.ttfb)
    if args.record_headers:
        out["served_by"] = dict(stats.served)
    if args.dump:
        out["_samples"] = (stats.lat, stats.ttfb)
    return out


def dump(path: str, samples: tuple[list[int], list[int]], stream: bool) -> None:
    """Raw samples for an orchestrator that merges several runs: int64 nanoseconds, native order."""
    with open(path + ".lat", "wb") as f:
        array("q", samples[0]).tofile(f)
    if stream:
        with open(path + ".ttfb", "wb") as f:
            array("q", samples[1]).tofile(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8411/v1/chat/completions")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-n", "--requests", type=int, default=None, help="measured requests (default 1000)")
    p.add_argument("--duration", type=float, default=None, help="measure for this many seconds instead")
    p.add_argument("--warmup", type=int, default=0, help="requests sent first and not recorded")
    p.add_argument("--stream", action="store_true", help='send "stream": true and record TTFB')
    p.add_argument("--header", action="append", default=[], help="extra header 'Name: value' (repeatable)")
    p.add_argument("--key", default="sk-agent-placeholder", help="the agent's own key (a proxy replaces it)")
    p.add_argument("--model", default="gpt-bench")
    p.add_argument(
        "--unique-model", default="", metavar="PREFIX", help="model PREFIX<n>: a new model per request"
    )
    p.add_argument("--body-bytes", type=int, default=0, help="pad the request body to about this size")
    p.add_argument("--expect-status", type=int, default=200)
    p.add_argument("--record-headers", action="store_true", help="count X-Keyroute-Provider/Credential")
    p.add_argument("--client", choices=["raw", "aiohttp"], default="raw")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument(
        "--dump", metavar="PATH", help="also write raw samples to PATH.lat (and PATH.ttfb), int64 ns"
    )
    p.add_argument("--timeout", type=float, default=15.0, help="per-request timeout, seconds")
    p.add_argument(
        "--max-seconds", type=float, default=300.0, help="the whole run stops by itself after this"
    )
    args = p.parse_args()
    if args.requests is None and args.duration is None:
        args.requests = 1000
    out = run(main_async(args), args.loop)
    if args.dump:
        dump(args.dump, out.pop("_samples"), args.stream)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
