"""Tokens per credential, read from real answers through a real sidecar (``keyroute_tokens_total``).

The agent's request is never changed to get usage: a stream is counted only when the agent itself
asked for ``stream_options.include_usage``.
"""

from __future__ import annotations

import json

from keyroute.fakeprovider import Behaviour, FakeProvider
from tests.builders import config, cred, entry, pool
from tests.integration.conftest import chat


def key(name: str) -> str:
    return f"sk-test-{name}-0123456789abcdef"


def tokens(sidecar, **labels: str) -> dict[str, float]:
    """kind -> count for the series matching ``labels``."""
    out: dict[str, float] = {}
    for metric in sidecar.metrics.registry.collect():
        if metric.name != "keyroute_tokens":
            continue
        for s in metric.samples:
            if s.name == "keyroute_tokens_total" and all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.labels["kind"]] = out.get(s.labels["kind"], 0) + s.value
    return out


async def openai_setup(fake_provider, start_sidecar, **kwargs):
    fp: FakeProvider = await fake_provider("acme", keys=[key("a1")])
    cfg = config(
        [entry("acme", "acme", fp.base_url, "acme-keys", models={"gpt-4o": "acme/gpt-4o-2026"})],
        [pool("acme-keys", "acme", cred("a1", key("a1")))],
    )
    return fp, await start_sidecar(cfg, **kwargs)


async def anthropic_setup(fake_provider, start_sidecar):
    fp: FakeProvider = await fake_provider("claude", keys=[key("c1")])
    cfg = config(
        [entry("claude", "claude", fp.base_url, "c", api="anthropic")],
        [pool("c", "claude", cred("c1", key("c1")))],
    )
    return fp, await start_sidecar(cfg)


async def test_json_answer_counts_tokens_per_credential_and_upstream_model(fake_provider, start_sidecar, agent):
    fp, sidecar = await openai_setup(fake_provider, start_sidecar)
    for _ in range(2):
        async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
            answer = await resp.json()
    usage = answer["usage"]
    got = tokens(sidecar, chain="agents", provider="acme", credential="a1", model="acme/gpt-4o-2026")
    assert got == {"input": 2 * usage["prompt_tokens"], "output": 2 * usage["completion_tokens"]}
    served = sidecar.metrics.registry.get_sample_value(
        "keyroute_upstream_attempts_total",
        {"chain": "agents", "provider": "acme", "credential": "a1", "class": "OK"},
    )
    assert served == 2


async def test_stream_counts_usage_only_when_the_agent_asked_for_it(fake_provider, start_sidecar, agent):
    fp, sidecar = await openai_setup(fake_provider, start_sidecar)
    fp.set(Behaviour.stream(3))
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat(stream=True)) as resp:
        plain = await resp.read()
    assert b'"usage"' not in plain and tokens(sidecar) == {}
    asked = chat(stream=True, stream_options={"include_usage": True})
    async with agent.post(sidecar.base_url + "/chat/completions", json=asked) as resp:
        body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n") and b"keyroute_stream_error" not in body
    last = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")][-1]
    usage = json.loads(last[len(b"data: ") :])["usage"]
    assert tokens(sidecar, credential="a1") == {"input": usage["prompt_tokens"], "output": usage["completion_tokens"]}
    # Forwarded as the agent sent it, but for the model alias: no stream_options added to the first one.
    assert "stream_options" not in fp.received[0].body_json()
    assert fp.received[1].body_json()["stream_options"] == {"include_usage": True}


async def test_a_long_stream_counts_its_usage(fake_provider, start_sidecar, agent):
    # Several 16 KiB batches of chunks before the usage chunk: it is read all the same.
    fp, sidecar = await openai_setup(fake_provider, start_sidecar)
    fp.set(Behaviour.stream(600))
    asked = chat(stream=True, stream_options={"include_usage": True})
    async with agent.post(sidecar.base_url + "/chat/completions", json=asked) as resp:
        body = await resp.read()
    assert len(body) > 4 * 16 * 1024 and b"keyroute_stream_error" not in body
    last = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")][-1]
    usage = json.loads(last[len(b"data: ") :])["usage"]
    assert tokens(sidecar, credential="a1") == {"input": usage["prompt_tokens"], "output": usage["completion_tokens"]}


async def test_a_long_stream_cut_midway_counts_its_first_batch(fake_provider, start_sidecar, agent):
    # message_start's usage is in the first 16 KiB batch, the cut several batches later: counted.
    fp, sidecar = await anthropic_setup(fake_provider, start_sidecar)
    fp.set(Behaviour.stream(600, cut_after=400))
    body = {"model": "claude-x", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with agent.post(sidecar.base_url + "/messages", json=body) as resp:
        answer = await resp.read()
    assert len(answer) > 2 * 16 * 1024 and b"keyroute_stream_error" in answer
    assert tokens(sidecar, credential="c1") == {"input": 1, "output": 1}


async def test_anthropic_stream_counts_message_start_and_message_delta(fake_provider, start_sidecar, agent):
    fp, sidecar = await anthropic_setup(fake_provider, start_sidecar)
    fp.set(Behaviour.stream(4))
    body = {"model": "claude-x", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with agent.post(sidecar.base_url + "/messages", json=body) as resp:
        answer = await resp.read()
    delta = next(e for e in answer.split(b"\n\n") if e.startswith(b"event: message_delta"))
    delta_tokens = json.loads(delta.split(b"data: ", 1)[1])["usage"]["output_tokens"]
    assert delta_tokens > 1
    # message_start's placeholder output count (1) is replaced by message_delta's running total.
    assert tokens(sidecar, chain="agents", provider="claude", credential="c1", model="claude-x") == {
        "input": 1,
        "output": delta_tokens,
    }


async def test_token_metrics_off_counts_nothing(fake_provider, start_sidecar, agent):
    fp, sidecar = await openai_setup(fake_provider, start_sidecar, count_tokens=False)
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.status == 200
    assert tokens(sidecar) == {}


async def test_a_stream_cut_midway_still_counts_what_the_provider_reported(fake_provider, start_sidecar, agent):
    fp, sidecar = await anthropic_setup(fake_provider, start_sidecar)
    fp.set(Behaviour.stream(4, cut_after=2))  # message_start (input tokens) went out with chunk 1
    body = {"model": "claude-x", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with agent.post(sidecar.base_url + "/messages", json=body) as resp:
        answer = await resp.read()
    assert b"keyroute_stream_error" in answer  # the agent was told the answer is cut
    # The provider bills the input it reported in message_start; the output placeholder is what it said so far.
    assert tokens(sidecar, credential="c1") == {"input": 1, "output": 1}
