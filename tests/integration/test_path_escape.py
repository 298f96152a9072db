"""A request cannot leave its entry's base path (issue 9, bug 5), over real HTTP.

The requests are written on a raw socket: an HTTP client library would normalise ``..`` away before
sending, and the point is what the sidecar does with what an agent (or an attacker in it) sends.
The provider's base path is a prefix on a shared host (``/openai/v1``), the case where a climb would
reach another backend with this pool's key.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from keyroute.core.paths import PATH_RULE, safe_path
from tests.builders import config, cred, entry, pool

KEY = "sk-test-path-escape-0123456789abcdef"

REFUSED = [
    "/v1/../../etc/passwd",
    "/v1/%2e%2e/%2e%2e/x",
    "/v1/%2E%2E/%2E%2e/x",
    "/v1/.%2e/x",
    "/v1/%2e./x",
    "/v1/..",
    "/v1/./chat/completions",
    "/v1/%2e/chat/completions",
    "/v1//../x",
    "/v1/..%2f..%2fx",
    "/v1/%2F%2e%2e%2Fx",
    "/v1/..%5c..%5cx",
    "/v1/..\\..\\x",
    "/../v1/chat/completions",
]


async def raw_request(port: int, method: str, target: str) -> tuple[int, bytes]:
    """Send ``target`` byte for byte as the request line's path; return status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-agent-placeholder\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture
async def behind_prefix(fake_provider, start_sidecar):
    provider = await fake_provider("openai", prefix="/openai/v1", keys=[KEY])
    cfg = config(
        [entry("openai", "openai", provider.base_url, "keys")], [pool("keys", "openai", cred("k", KEY))]
    )
    return provider, await start_sidecar(cfg)


@pytest.mark.parametrize("target", REFUSED)
async def test_a_path_that_could_leave_the_base_path_is_refused_and_never_forwarded(behind_prefix, target):
    provider, sidecar = behind_prefix
    status, body = await raw_request(sidecar.port, "GET", target)
    assert status == 400
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_path" and err["message"] == PATH_RULE
    assert provider.received == []
    counted = sidecar.metrics.registry.get_sample_value(
        "keyroute_requests_total", {"chain": sidecar.chain.name, "provider": "", "class": "InvalidPath"}
    )
    assert counted == 1


async def test_double_slashes_are_merged_and_ordinary_dots_pass(behind_prefix):
    provider, sidecar = behind_prefix
    for target, upstream in [
        ("/v1//models", "/openai/v1/models"),
        ("/v1/models/ft:gpt-4o:acme..v2", "/openai/v1/models/ft:gpt-4o:acme..v2"),
        ("/v1/models/...", "/openai/v1/models/..."),
        ("/v1/models?after=../x", "/openai/v1/models"),  # a query is not a path
    ]:
        status, _ = await raw_request(sidecar.port, "GET", target)
        assert (status, provider.received[-1].path) == (200, upstream)
    assert provider.count(key=KEY) == 4


def test_the_rule_on_paths():
    assert safe_path("/v1/chat/completions") == "/v1/chat/completions"
    assert safe_path("/v1///a//b/") == "/v1/a/b/"
    assert safe_path("/v1/a.b/.c/c./...") == "/v1/a.b/.c/c./..."
    assert safe_path("/v1/%252e%252e/x") == "/v1/%252e%252e/x"  # one decode gives a literal "%2e%2e"
    for bad in REFUSED:
        assert safe_path(bad) is None, bad
