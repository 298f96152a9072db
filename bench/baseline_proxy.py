"""The reference the sidecar is compared against: a minimal aiohttp pass-through proxy.

aiohttp server + one shared aiohttp ClientSession (unlimited pool, like the sidecar's). It forwards
method, path, query, body and headers (minus hop-by-hop ones and Host), and streams the upstream
answer back chunk by chunk as it arrives. No routing, no key handling, no inspection, no metrics:
whatever the sidecar costs on top of this is what keyroute adds.

Usage::

    python bench/baseline_proxy.py --port 9100 --upstream http://127.0.0.1:9001 [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import aiohttp
from aiohttp import web
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import run

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def make_app(upstream: str) -> web.Application:
    base = upstream.rstrip("/")
    state: dict[str, aiohttp.ClientSession] = {}

    async def on_startup(app: web.Application) -> None:
        state["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def on_cleanup(app: web.Application) -> None:
        await state["session"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = URL(base + request.rel_url.raw_path_qs, encoded=True)
        async with state["session"].request(
            request.method, url, headers=headers, data=body or None, allow_redirects=False
        ) as up:
            out = web.StreamResponse(
                status=up.status,
                headers={k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP},
            )
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def main_async(args: argparse.Namespace) -> None:
    runner = web.AppRunner(make_app(args.upstream), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {args.port}", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=args.max_seconds)
    await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9001")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="exit by itself after this long")
    args = p.parse_args()
    run(main_async(args), args.loop)


if __name__ == "__main__":
    main()
