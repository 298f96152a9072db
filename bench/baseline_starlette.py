"""The alternative stack for the server/client comparison: a starlette + httpx pass-through on uvicorn.

Same job as ``baseline_proxy.py`` (forward method/path/query/body/headers, stream the answer back),
written the way such a proxy usually is: a catch-all starlette route, one shared
``httpx.AsyncClient``, ``client.send(..., stream=True)`` and a ``StreamingResponse`` over
``aiter_raw()``. Bench-only dependencies: ``pip install -r bench/requirements.txt``.

``--limits default`` keeps httpx's default pool (100 connections, 20 kept alive), which is what a
pass-through written without thinking about it gets; ``--limits wide`` keeps every connection alive.

Usage::

    python bench/baseline_starlette.py --port 9200 --upstream http://127.0.0.1:9001 \
        [--loop uvloop|asyncio] [--http httptools|h11] [--limits default|wide]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)


def make_app(upstream: str, limits: str) -> Starlette:
    holder: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = (
            httpx.Limits(max_connections=None, max_keepalive_connections=None)
            if limits == "wide"
            else httpx.Limits(max_connections=100, max_keepalive_connections=20)
        )
        async with httpx.AsyncClient(base_url=upstream, limits=pool, timeout=60.0, trust_env=False) as client:
            holder["client"] = client
            yield

    async def proxy(request: Request) -> StreamingResponse:
        client = holder["client"]
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_BY_HOP]
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        req = client.build_request(request.method, path, headers=headers, content=body)
        resp = await client.send(req, stream=True)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower().encode() not in HOP_BY_HOP}
        return StreamingResponse(
            resp.aiter_raw(),
            status_code=resp.status_code,
            headers=out_headers,
            background=BackgroundTask(resp.aclose),
        )

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", proxy, methods=methods)], lifespan=lifespan)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--http", choices=["httptools", "h11"], default="httptools")
    p.add_argument("--limits", choices=["default", "wide"], default="default")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="exit by itself after this long")
    args = p.parse_args()
    config = uvicorn.Config(
        make_app(args.upstream, args.limits),
        host="127.0.0.1",
        port=args.port,
        loop=args.loop,
        http=args.http,
        log_level="warning",
        access_log=False,
        backlog=1024,
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn has no "started" event)
            await asyncio.sleep(0.02)
        print(f"READY {args.port}", flush=True)
        done, _ = await asyncio.wait({task}, timeout=args.max_seconds)
        if not done:
            server.should_exit = True
            await task

    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve())
    else:
        asyncio.run(serve())


if __name__ == "__main__":
    main()
