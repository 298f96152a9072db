"""The operator's per-object gauges and the webhook's admission counter: what the chart's alerts read."""

from __future__ import annotations

import kopf
import pytest

from keyroute.controller import webhook
from keyroute.controller.metrics import OperatorMetrics, shared
from keyroute.core import inject as core


def value(m: OperatorMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_credential_state_gauges_follow_the_status_and_forget_removed_credentials():
    m = OperatorMetrics()
    key = ("agents", "openai")
    m.pool_seen(key, "True", {"Available": 1, "Rejected": 1}, {"k1": "Available", "k2": "Rejected"})
    assert value(m, "keyroute_operator_credential_state", namespace="agents", pool="openai", credential="k2", state="Rejected") == 1
    assert value(m, "keyroute_operator_credential_state", namespace="agents", pool="openai", credential="k2", state="Available") == 0
    # k2 removed from the spec: its series go, so a revoked key that was replaced stops alerting.
    m.pool_seen(key, "True", {"Available": 1}, {"k1": "Available"})
    assert value(m, "keyroute_operator_credential_state", namespace="agents", pool="openai", credential="k2", state="Rejected") is None
    assert value(m, "keyroute_operator_credentials", state="Rejected") == 0
    m.pool_gone(key)
    assert value(m, "keyroute_operator_credential_state", namespace="agents", pool="openai", credential="k1", state="Available") is None


def test_a_replica_that_stops_leading_forgets_every_object_and_relearns_them():
    m = OperatorMetrics()
    m.pool_seen(("agents", "openai"), "False", {"Rejected": 1}, {"k1": "Rejected"})
    m.chain_seen(("agents", "main"), True, 2)
    m.forget_objects()
    # No stale Rejected or FallbackActive series left to keep the chart's alerts firing.
    assert value(m, "keyroute_operator_credential_state", namespace="agents", pool="openai", credential="k1", state="Rejected") is None
    assert value(m, "keyroute_operator_chain_fallback_active", namespace="agents", chain="main") is None
    assert value(m, "keyroute_operator_chain_sidecars", namespace="agents", chain="main") is None
    assert value(m, "keyroute_operator_pools", ready="False") == 0
    assert value(m, "keyroute_operator_credentials", state="Rejected") == 0
    # Leading again: the same pool counted once, not on top of what was forgotten.
    m.pool_seen(("agents", "openai"), "True", {"Available": 1}, {"k1": "Available"})
    assert value(m, "keyroute_operator_pools", ready="True") == 1
    assert value(m, "keyroute_operator_pools", ready="False") == 0
    assert value(m, "keyroute_operator_credential_state", namespace="agents", pool="openai", credential="k1", state="Available") == 1


def test_chain_gauges_and_their_removal():
    m = OperatorMetrics()
    m.chain_seen(("agents", "main"), True, 4)
    assert value(m, "keyroute_operator_chain_fallback_active", namespace="agents", chain="main") == 1
    assert value(m, "keyroute_operator_chain_sidecars", namespace="agents", chain="main") == 4
    m.chain_gone(("agents", "main"))
    m.chain_gone(("agents", "main"))  # twice: harmless
    assert value(m, "keyroute_operator_chain_fallback_active", namespace="agents", chain="main") is None


@pytest.fixture
def injection(monkeypatch):
    settings = core.InjectionSettings(image="keyroute:test")
    monkeypatch.setitem(webhook.STATE, "injection", settings)
    return settings


def pod(chain: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "agent-", "labels": {core.CHAIN_LABEL: chain}},
        "spec": {"containers": [{"name": "app", "image": "agent:1"}]},
    }


async def admit(body: dict) -> tuple[kopf.Patch, list[str]]:
    patch, warnings = kopf.Patch(), []
    await webhook.inject_sidecar(
        body=kopf.Body(body),
        patch=patch,
        labels=body["metadata"]["labels"],
        namespace="agents",
        warnings=warnings,
        dryrun=False,
        operation="CREATE",
    )
    return patch, warnings


async def test_webhook_counts_refusals_and_injections(injection):
    m = shared()

    def count(result: str, reason: str) -> float:
        return value(m, "keyroute_webhook_admissions_total", result=result, reason=reason) or 0.0

    refused = count("refused", "InvalidChainLabel")
    with pytest.raises(kopf.AdmissionError):
        await admit(pod("Not_A_Valid_Name!"))
    assert count("refused", "InvalidChainLabel") == refused + 1
    # Not logged in to an API server: the chain cannot be looked up, so the pod is injected with a warning.
    warned = count("injected", "InjectedWithWarning")
    patch, warnings = await admit(pod("agents"))
    assert warnings and patch.spec
    assert count("injected", "InjectedWithWarning") == warned + 1
