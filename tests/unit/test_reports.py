"""Sidecar reports (docs/reporting.md and secrets hygiene (docs/README.md)): recovery actions as Events, the operator's fold of them into status,
and fleet cooldowns (other pods' reported states adopted by a sidecar).

Everything here is pure: time is a parameter, no network, no sleeps. A ``Kube`` is constructed where
an API is required (fleet cooldowns) but never used.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
from typing import Any

import pytest

from keyroute.core import crds
from keyroute.core.actions import Action, ActionKind, rfc3339
from keyroute.core.chains import Chain
from keyroute.core.classes import ErrorClass
from keyroute.core.pools import ALL_MODELS, Block, Pool
from keyroute.core.render import render, resolve_pool
from keyroute.core.reports import (
    ANN_ACTION,
    ANN_AT,
    ANN_CREDENTIAL,
    ANN_DROPPED,
    ANN_ERROR_CLASS,
    ANN_POD,
    ANN_UNTIL,
    PRESENCE_REASON,
    PRESENCE_TTL,
    REPORT_LABEL,
    RESTORED_MEMORY,
    ChainSummary,
    LastFallbackFact,
    Origin,
    Report,
    ReportBook,
    ReportError,
    dedup_key,
    event_body,
    event_name,
    is_report,
    parse_report,
    parse_rfc3339,
    presence_body,
    presence_name,
    shared_blocks,
)
from keyroute.core.resources import CredentialPool, CredentialState, ProviderChain, Secret
from keyroute.core.status import chain_status, pool_status
from keyroute.kube import Connection, Kube
from keyroute.sidecar.fleet import FleetCooldowns
from keyroute.sidecar.metrics import Metrics
from tests.builders import two_providers

T0 = 1_800_000_000.0
NS = "default"
POOL = "openai"
CHAIN = "agents"
FP = "sha256:0123456789ab"
SECRET_TEXT = "sk-live-SECRET-do-not-leak-0123456789"
ORIGIN = Origin(pod="agent-7c9f-x2x4z", namespace=NS)
KEY = "sk-test-REPORTS-SECRET-000000001"

# RFC 1123 subdomain, what the API server requires of an Event's name.
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def is_dns_subdomain(name: str) -> bool:
    return len(name) <= 253 and DNS_SUBDOMAIN.fullmatch(name) is not None


# --- builders ---------------------------------------------------------------------------------------


def act(kind: ActionKind, at: float = T0, **fields: Any) -> Action:
    obj = (
        POOL
        if kind in (ActionKind.COOLED_DOWN, ActionKind.EXHAUSTED, ActionKind.REJECTED, ActionKind.RESTORED)
        else CHAIN
    )
    fields.setdefault("namespace", NS)
    fields.setdefault("object_name", obj)
    return Action(kind=kind, at=at, **fields)


def cooled(
    at: float = T0,
    cred_name: str = "k1",
    *,
    until: float | None = None,
    model: str | None = None,
    fp: str | None = FP,
    cls: ErrorClass = ErrorClass.RATE_LIMITED,
    status: int | None = 429,
) -> Action:
    return act(
        ActionKind.COOLED_DOWN,
        at,
        error_class=cls,
        credential=cred_name,
        fingerprint=fp,
        until=T0 + 60 if until is None else until,
        model=model,
        status=status,
    )


def restored(at: float, cred_name: str = "k1", *, model: str | None = None) -> Action:
    return act(
        ActionKind.RESTORED,
        at,
        error_class=ErrorClass.RATE_LIMITED,
        credential=cred_name,
        fingerprint=FP,
        model=model,
    )


def fallback(
    at: float, frm: str, to: str, *, model: str | None = None, cls: ErrorClass = ErrorClass.SERVER_ERROR
) -> Action:
    return act(
        ActionKind.FALLBACK_ACTIVATED,
        at,
        error_class=cls,
        from_entry=frm,
        to_entry=to,
        model=model,
        status=500,
    )


def primary_back(at: float, frm: str, to: str, *, model: str | None = None) -> Action:
    return act(ActionKind.PRIMARY_RESTORED, at, from_entry=frm, to_entry=to, model=model)


def rep(action: Action, pod: str = "pod-a") -> Report:
    return Report(action, pod, action.at)


def presence(pod: str, at: float) -> Report:
    return Report(None, pod, at)


#: One action of every kind, each carrying a provider message that must never reach an Event.
SAMPLES: dict[ActionKind, Action] = {
    ActionKind.COOLED_DOWN: act(
        ActionKind.COOLED_DOWN,
        T0 + 0.123456,
        error_class=ErrorClass.RATE_LIMITED,
        credential="k1",
        fingerprint=FP,
        until=T0 + 90,
        model="gpt-4o",
        status=429,
        message=SECRET_TEXT,
    ),
    ActionKind.EXHAUSTED: act(
        ActionKind.EXHAUSTED,
        T0,
        error_class=ErrorClass.BILLING,
        credential="k2",
        fingerprint=FP,
        until=T0 + 3600,
        status=402,
        message=SECRET_TEXT,
    ),
    ActionKind.REJECTED: act(
        ActionKind.REJECTED,
        T0,
        error_class=ErrorClass.REVOKED,
        credential="k3",
        fingerprint=FP,
        status=401,
        message=SECRET_TEXT,
    ),
    ActionKind.RESTORED: act(
        ActionKind.RESTORED,
        T0 + 61,
        error_class=ErrorClass.RATE_LIMITED,
        credential="k1",
        fingerprint=FP,
        model="gpt-4o",
        message=f"was CoolingDown {SECRET_TEXT}",
    ),
    ActionKind.FALLBACK_ACTIVATED: act(
        ActionKind.FALLBACK_ACTIVATED,
        T0 + 5,
        error_class=ErrorClass.SERVER_ERROR,
        from_entry="openai",
        to_entry="backup",
        model="gpt-4o",
        status=500,
        message=SECRET_TEXT,
    ),
    ActionKind.PRIMARY_RESTORED: act(
        ActionKind.PRIMARY_RESTORED,
        T0 + 65,
        from_entry="backup",
        to_entry="openai",
        model="gpt-4o",
        message=SECRET_TEXT,
    ),
    ActionKind.CHAIN_EXHAUSTED: act(
        ActionKind.CHAIN_EXHAUSTED,
        T0 + 7,
        error_class=ErrorClass.TIMEOUT,
        model="gpt-4o",
        message=SECRET_TEXT,
    ),
}


def body_of(action: Action, *, uid: str | None = "uid-1", **kw: Any) -> dict[str, Any]:
    name = event_name(action.object_name, ORIGIN, dedup_key(action), action.at)
    return event_body(action, ORIGIN, name=name, uid=uid, **kw)


def valid_event(**annotations: Any) -> dict[str, Any]:
    """A well-formed CredentialCoolingDown report, with ``annotations`` overriding (None: removed)."""
    event = body_of(SAMPLES[ActionKind.COOLED_DOWN])
    ann = event["metadata"]["annotations"]
    for k, v in annotations.items():
        if v is None:
            ann.pop(k, None)
        else:
            ann[k] = v
    return event


# --- Events: the sidecar's side ---------------------------------------------------------------------


def test_sample_actions_cover_every_kind():
    assert set(SAMPLES) == set(ActionKind)


@pytest.mark.parametrize("kind", list(ActionKind))
def test_event_body_round_trips_through_parse_report(kind: ActionKind):
    action = SAMPLES[kind]
    namespace, name, report = parse_report(body_of(action))
    assert (namespace, name) == (NS, action.object_name)
    assert report.pod == ORIGIN.pod and report.at == action.at
    assert report.action == dataclasses.replace(action, message="")  # the provider's text is not carried


@pytest.mark.parametrize("kind", list(ActionKind))
def test_event_is_about_the_right_kind_of_object(kind: ActionKind):
    action = SAMPLES[kind]
    involved = body_of(action)["involvedObject"]
    expected = (
        "ProviderChain"
        if kind in (ActionKind.FALLBACK_ACTIVATED, ActionKind.PRIMARY_RESTORED, ActionKind.CHAIN_EXHAUSTED)
        else "CredentialPool"
    )
    assert involved["kind"] == expected == action.object_kind
    assert involved["name"] == action.object_name and involved["namespace"] == NS
    assert involved["apiVersion"] == "keyroute.dev/v1alpha1"


@pytest.mark.parametrize("kind", list(ActionKind))
def test_event_never_carries_the_provider_message(kind: ActionKind):
    text = json.dumps(body_of(SAMPLES[kind], dropped=3))
    assert SECRET_TEXT not in text and "SECRET" not in text


@pytest.mark.parametrize(
    ("kind", "type_"),
    [
        (ActionKind.COOLED_DOWN, "Warning"),
        (ActionKind.EXHAUSTED, "Warning"),
        (ActionKind.REJECTED, "Warning"),
        (ActionKind.RESTORED, "Normal"),
        (ActionKind.FALLBACK_ACTIVATED, "Warning"),
        (ActionKind.PRIMARY_RESTORED, "Normal"),
        (ActionKind.CHAIN_EXHAUSTED, "Warning"),
    ],
)
def test_event_type_is_warning_except_for_restorations(kind: ActionKind, type_: str):
    body = body_of(SAMPLES[kind])
    assert body["type"] == type_ and body["reason"] == str(kind)


def test_event_is_labelled_as_a_sidecar_report_and_names_the_pod():
    body = body_of(SAMPLES[ActionKind.COOLED_DOWN])
    assert body["metadata"]["labels"] == {REPORT_LABEL: "sidecar"}
    assert body["related"] == {"apiVersion": "v1", "kind": "Pod", "name": ORIGIN.pod, "namespace": NS}
    assert body["reportingInstance"] == ORIGIN.pod
    assert is_report(body)


def test_involved_object_uid_only_when_known():
    assert body_of(SAMPLES[ActionKind.COOLED_DOWN], uid="uid-9")["involvedObject"]["uid"] == "uid-9"
    assert "uid" not in body_of(SAMPLES[ActionKind.COOLED_DOWN], uid=None)["involvedObject"]
    assert "uid" not in presence_body(CHAIN, NS, None, ORIGIN, at=T0, config_hash="h")["involvedObject"]
    assert presence_body(CHAIN, NS, "u-2", ORIGIN, at=T0, config_hash="h")["involvedObject"]["uid"] == "u-2"


def test_cooldown_message_names_pod_credential_class_and_until():
    action = SAMPLES[ActionKind.COOLED_DOWN]
    message = body_of(action)["message"]
    for part in (ORIGIN.pod, "k1", "RateLimited", rfc3339(T0 + 90), "HTTP 429", "gpt-4o"):
        assert part in message, part


def test_exhausted_message_names_until_and_rejected_says_secret_change():
    assert rfc3339(T0 + 3600) in body_of(SAMPLES[ActionKind.EXHAUSTED])["message"]
    rejected = body_of(SAMPLES[ActionKind.REJECTED])["message"]
    assert "k3" in rejected and "Revoked" in rejected and "Secret value changes" in rejected


def test_fallback_message_names_entries_and_pod():
    message = body_of(SAMPLES[ActionKind.FALLBACK_ACTIVATED])["message"]
    assert "openai" in message and "backup" in message and "ServerError" in message and ORIGIN.pod in message


def test_event_times_and_count():
    action = SAMPLES[ActionKind.EXHAUSTED]
    body = body_of(action, count=4, first_at=T0 - 120)
    assert body["count"] == 4
    assert body["firstTimestamp"] == rfc3339(T0 - 120) and body["lastTimestamp"] == rfc3339(T0)
    fresh = body_of(action)
    assert fresh["count"] == 1 and fresh["firstTimestamp"] == fresh["lastTimestamp"] == rfc3339(T0)


def test_dropped_reports_are_counted_on_the_next_event():
    body = body_of(SAMPLES[ActionKind.EXHAUSTED], dropped=3)
    assert body["metadata"]["annotations"][ANN_DROPPED] == "3"
    assert "3 earlier reports were dropped" in body["message"]
    assert ANN_DROPPED not in body_of(SAMPLES[ActionKind.EXHAUSTED])["metadata"]["annotations"]


def test_event_message_is_bounded():
    long = act(
        ActionKind.COOLED_DOWN, error_class=ErrorClass.RATE_LIMITED, credential="k" * 2000, until=T0 + 1
    )
    assert len(body_of(long)["message"]) <= 1024


def test_presence_body_round_trips():
    body = presence_body(CHAIN, NS, "u-1", ORIGIN, at=T0 + 0.5, config_hash="abc123", count=3)
    assert body["reason"] == PRESENCE_REASON and body["type"] == "Normal" and body["count"] == 3
    assert body["involvedObject"]["kind"] == "ProviderChain" and is_report(body)
    assert body["metadata"]["name"] == presence_name(CHAIN, ORIGIN)
    namespace, name, report = parse_report(body)
    assert (namespace, name) == (NS, CHAIN)
    assert report == Report(None, ORIGIN.pod, T0 + 0.5, config_hash="abc123")


@pytest.mark.parametrize("object_name", ["a", "openai", "x" * 63, "pool.with.dots", "p" * 253])
def test_event_and_presence_names_are_dns_subdomains(object_name: str):
    key = dedup_key(SAMPLES[ActionKind.COOLED_DOWN])
    for at in (T0, T0 + 0.001, 4_102_444_800.999):
        name = event_name(object_name, ORIGIN, key, at)
        assert is_dns_subdomain(name), name
    assert is_dns_subdomain(presence_name(object_name, ORIGIN))


@pytest.mark.parametrize("cut", ["-", "."])
def test_event_and_presence_names_stay_valid_when_truncation_ends_on_a_separator(cut: str):
    # BUG: both names keep object_name[:200] as is; if its 200th character is '-' or '.', the name
    # gets "-." or ".." (a label ending in '-', an empty label): not a DNS subdomain, the API server
    # would refuse the Event. Fix: object_name[:200].rstrip("-.").
    object_name = "a" * 199 + cut + "b" * 53  # a valid 253-character object name
    assert is_dns_subdomain(object_name)
    name = event_name(object_name, ORIGIN, dedup_key(SAMPLES[ActionKind.COOLED_DOWN]), T0)
    assert is_dns_subdomain(name), name
    assert is_dns_subdomain(presence_name(object_name, ORIGIN))


def test_event_name_differs_per_time_and_per_transition():
    key = dedup_key(SAMPLES[ActionKind.COOLED_DOWN])
    other = dedup_key(SAMPLES[ActionKind.EXHAUSTED])
    assert event_name(POOL, ORIGIN, key, T0) != event_name(POOL, ORIGIN, key, T0 + 1)
    assert event_name(POOL, ORIGIN, key, T0) != event_name(POOL, ORIGIN, other, T0)
    assert event_name(POOL, ORIGIN, key, T0) != event_name(POOL, Origin("pod-b", NS), key, T0)
    assert event_name(POOL, ORIGIN, key, T0) == event_name(POOL, ORIGIN, key, T0)


def test_presence_name_is_stable_per_pod():
    assert presence_name(CHAIN, ORIGIN) == presence_name(CHAIN, Origin(ORIGIN.pod, ORIGIN.namespace))
    assert presence_name(CHAIN, ORIGIN) != presence_name(CHAIN, Origin("pod-b", NS))
    assert presence_name(CHAIN, ORIGIN) != presence_name(CHAIN, Origin(ORIGIN.pod, "other-ns"))


def test_dedup_key_ignores_time_until_and_message_but_not_model():
    a = SAMPLES[ActionKind.COOLED_DOWN]
    later = dataclasses.replace(a, at=T0 + 30, until=T0 + 300, message="other", status=503)
    assert dedup_key(a) == dedup_key(later)
    assert dedup_key(a) != dedup_key(dataclasses.replace(a, model="other-model"))
    assert dedup_key(a) != dedup_key(dataclasses.replace(a, credential="k2"))


# --- parsing: the operator's side -------------------------------------------------------------------


def test_is_report_only_for_labelled_events():
    assert is_report(valid_event())
    assert not is_report({"metadata": {"name": "x"}})
    assert not is_report({"metadata": {"labels": {REPORT_LABEL: "operator"}}})
    assert not is_report({"metadata": {"labels": {"app": "x"}}})
    assert not is_report({"metadata": {"labels": ["keyroute.dev/report"]}})
    assert not is_report({})


BAD_EVENTS: list[tuple[str, Any, str]] = [
    # (id, edit of a valid report Event, a distinctive value the error must not echo)
    ("no-annotations", lambda e: e["metadata"].pop("annotations"), ""),
    ("annotations-not-a-mapping", lambda e: e["metadata"].__setitem__("annotations", ["x"]), ""),
    ("no-involved-object", lambda e: e.pop("involvedObject"), ""),
    ("no-pod", lambda e: e["metadata"]["annotations"].pop(ANN_POD), ""),
    ("no-at", lambda e: e["metadata"]["annotations"].pop(ANN_AT), ""),
    (
        "non-numeric-at",
        lambda e: e["metadata"]["annotations"].__setitem__(ANN_AT, "SNEAKY-AT-1"),
        "SNEAKY-AT-1",
    ),
    ("nan-at", lambda e: e["metadata"]["annotations"].__setitem__(ANN_AT, "nan"), ""),
    ("inf-at", lambda e: e["metadata"]["annotations"].__setitem__(ANN_AT, "inf"), ""),
    ("neg-inf-at", lambda e: e["metadata"]["annotations"].__setitem__(ANN_AT, "-Infinity"), ""),
    (
        "unknown-action",
        lambda e: e["metadata"]["annotations"].__setitem__(ANN_ACTION, "SNEAKY-ACTION"),
        "SNEAKY-ACTION",
    ),
    ("no-action", lambda e: e["metadata"]["annotations"].pop(ANN_ACTION), ""),
    (
        "unknown-error-class",
        lambda e: e["metadata"]["annotations"].__setitem__(ANN_ERROR_CLASS, "SNEAKY-CLASS"),
        "SNEAKY-CLASS",
    ),
    ("no-credential", lambda e: e["metadata"]["annotations"].pop(ANN_CREDENTIAL), ""),
    (
        "bad-until",
        lambda e: e["metadata"]["annotations"].__setitem__(ANN_UNTIL, "SNEAKY-UNTIL"),
        "SNEAKY-UNTIL",
    ),
    (
        "until-not-rfc3339",
        lambda e: e["metadata"]["annotations"].__setitem__(ANN_UNTIL, "1800000000"),
        "1800000000",
    ),
    (
        "pool-action-on-a-chain",
        lambda e: e["involvedObject"].__setitem__("kind", "ProviderChain"),
        "",
    ),
    (
        "presence-on-a-pool",
        lambda e: e["metadata"]["annotations"].__setitem__(ANN_ACTION, PRESENCE_REASON),
        "",
    ),
]


@pytest.mark.parametrize(
    ("edit", "value"), [(e, v) for _, e, v in BAD_EVENTS], ids=[i for i, _, _ in BAD_EVENTS]
)
def test_parse_report_rejects_garbage_without_echoing_it(edit: Any, value: str):
    event = valid_event()
    edit(event)
    with pytest.raises(ReportError) as info:
        parse_report(event)
    message = str(info.value)
    assert message
    if value:
        assert value not in message
    for name in (ORIGIN.pod, POOL, FP):  # nor names from the rest of the Event
        assert name not in message


def test_parse_report_rejects_an_unexpected_kind_without_echoing_it():
    # BUG: ReportError promises "The message names no value", but for an unexpected involvedObject
    # kind parse_report says f"report about an unexpected kind {kind!r:.40}", echoing up to 40
    # characters of whatever the Event carried into the operator's log. Fix: drop the value
    # ("report about an object that is neither a CredentialPool nor a ProviderChain").
    event = valid_event()
    event["involvedObject"]["kind"] = "SNEAKY-KIND"
    with pytest.raises(ReportError) as info:
        parse_report(event)
    assert "SNEAKY-KIND" not in str(info.value)


def test_parse_report_rejects_a_chain_action_on_a_pool():
    event = body_of(SAMPLES[ActionKind.FALLBACK_ACTIVATED])
    event["involvedObject"]["kind"] = "CredentialPool"
    with pytest.raises(ReportError):
        parse_report(event)


@pytest.mark.parametrize(
    "kind", [ActionKind.COOLED_DOWN, ActionKind.EXHAUSTED, ActionKind.REJECTED, ActionKind.RESTORED]
)
def test_every_credential_action_needs_a_credential(kind: ActionKind):
    event = body_of(SAMPLES[kind])
    event["metadata"]["annotations"].pop(ANN_CREDENTIAL)
    with pytest.raises(ReportError, match="credential"):
        parse_report(event)


def test_parse_report_takes_the_namespace_from_metadata_when_involved_object_has_none():
    event = valid_event()
    event["involvedObject"].pop("namespace")
    assert parse_report(event)[0] == NS


def test_parse_rfc3339_inverts_rfc3339():
    assert parse_rfc3339(rfc3339(T0)) == T0
    with pytest.raises(ValueError):
        parse_rfc3339("yesterday")


# --- the fold: pools --------------------------------------------------------------------------------


def test_pool_report_is_folded_and_says_pool():
    book = ReportBook()
    assert book.add(NS, POOL, rep(cooled(T0, until=T0 + 60))) == "pool"
    out = book.pool_reports(NS, POOL, T0)
    assert list(out) == ["k1"]
    r = out["k1"]
    assert (r.state, r.reason, r.until, r.fingerprint, r.status, r.pod, r.model, r.at) == (
        CredentialState.COOLING_DOWN,
        "RateLimited",
        T0 + 60,
        FP,
        429,
        "pod-a",
        None,
        T0,
    )


@pytest.mark.parametrize(
    ("kind", "cls", "state"),
    [
        (ActionKind.COOLED_DOWN, ErrorClass.AUTH_FAILED, CredentialState.COOLING_DOWN),
        (ActionKind.EXHAUSTED, ErrorClass.BILLING, CredentialState.EXHAUSTED),
        (ActionKind.REJECTED, ErrorClass.REVOKED, CredentialState.REJECTED),
    ],
)
def test_each_bench_kind_maps_to_its_state(kind: ActionKind, cls: ErrorClass, state: CredentialState):
    book = ReportBook()
    until = None if kind is ActionKind.REJECTED else T0 + 100
    book.add(NS, POOL, rep(act(kind, T0, error_class=cls, credential="k1", fingerprint=FP, until=until)))
    r = book.pool_reports(NS, POOL, T0 + 1)["k1"]
    assert (r.state, r.reason, r.until) == (state, str(cls), until)


def test_report_without_error_class_takes_the_state_as_reason():
    book = ReportBook()
    book.add(NS, POOL, rep(act(ActionKind.EXHAUSTED, T0, credential="k1", until=T0 + 10)))
    assert book.pool_reports(NS, POOL, T0)["k1"].reason == "Exhausted"


def test_latest_report_by_at_wins_not_the_latest_delivered():
    book = ReportBook()
    assert book.add(NS, POOL, rep(restored(T0 + 10))) == "pool"
    # A cooldown observed earlier, delivered late, does not undo the newer restoration.
    assert book.add(NS, POOL, rep(cooled(T0, until=T0 + 60), pod="pod-b")) is None
    assert book.pool_reports(NS, POOL, T0 + 11) == {}


def test_restored_clears_the_credential():
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0, until=T0 + 60)))
    assert book.add(NS, POOL, rep(restored(T0 + 20))) == "pool"
    assert book.pool_reports(NS, POOL, T0 + 21) == {}


def test_restoring_one_model_keeps_the_all_models_block():
    book = ReportBook()
    book.add(
        NS,
        POOL,
        rep(
            act(
                ActionKind.EXHAUSTED,
                T0,
                error_class=ErrorClass.BILLING,
                credential="k1",
                fingerprint=FP,
                until=T0 + 3600,
            )
        ),
    )
    book.add(NS, POOL, rep(cooled(T0 + 1, until=T0 + 60, model="m1")))
    book.add(NS, POOL, rep(restored(T0 + 2, model="m1")))
    assert book.pool_reports(NS, POOL, T0 + 3)["k1"].state is CredentialState.EXHAUSTED


def test_an_all_models_block_outranks_a_longer_model_block():
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0, until=T0 + 600, model="m1")))
    book.add(NS, POOL, rep(cooled(T0 + 1, until=T0 + 60, cls=ErrorClass.AUTH_FAILED, status=401)))
    r = book.pool_reports(NS, POOL, T0 + 2)["k1"]
    assert (r.model, r.reason, r.until) == (None, "AuthFailed", T0 + 60)
    # Once the all-models block ended, the model block shows.
    r = book.pool_reports(NS, POOL, T0 + 61)["k1"]
    assert (r.model, r.until) == ("m1", T0 + 600)


def test_among_model_blocks_the_longest_wins():
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0, until=T0 + 30, model="m1")))
    book.add(NS, POOL, rep(cooled(T0, until=T0 + 90, model="m2")))
    book.add(NS, POOL, rep(cooled(T0, until=T0 + 60, model="m3")))
    assert book.pool_reports(NS, POOL, T0 + 1)["k1"].model == "m2"


def test_model_block_without_until_outranks_model_blocks_with_one():
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0, until=T0 + 90, model="m1")))
    book.add(
        NS,
        POOL,
        rep(
            act(
                ActionKind.REJECTED,
                T0,
                error_class=ErrorClass.REVOKED,
                credential="k1",
                fingerprint=FP,
                model="m2",
            )
        ),
    )
    assert book.pool_reports(NS, POOL, T0 + 1)["k1"].model == "m2"


def test_reports_whose_until_passed_are_not_returned():
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0, until=T0 + 60)))
    assert "k1" in book.pool_reports(NS, POOL, T0 + 59.9)
    assert book.pool_reports(NS, POOL, T0 + 60) == {}
    assert book.pool_reports(NS, "other-pool", T0) == {}


def test_credentials_are_independent():
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0, "k1", until=T0 + 60)))
    book.add(NS, POOL, rep(cooled(T0, "k2", until=T0 + 120)))
    book.add(NS, POOL, rep(restored(T0 + 1, "k1")))
    assert list(book.pool_reports(NS, POOL, T0 + 2)) == ["k2"]


def test_pool_deadline_is_the_earliest_future_until():
    book = ReportBook()
    assert book.deadline("pool", NS, POOL, T0) is None
    book.add(NS, POOL, rep(cooled(T0, "k1", until=T0 + 120)))
    book.add(NS, POOL, rep(cooled(T0, "k2", until=T0 + 30)))
    book.add(NS, POOL, rep(act(ActionKind.REJECTED, T0, error_class=ErrorClass.REVOKED, credential="k3")))
    assert book.deadline("pool", NS, POOL, T0) == T0 + 30
    assert book.deadline("pool", NS, POOL, T0 + 30) == T0 + 120
    assert book.deadline("pool", NS, POOL, T0 + 120) is None  # a rejection ends by itself never


# --- the fold: chains -------------------------------------------------------------------------------


def test_no_summary_for_a_chain_nobody_reported_on():
    assert ReportBook().chain_summary(NS, CHAIN, T0) is None


def test_presence_of_a_new_pod_changes_the_chain_and_a_heartbeat_does_not():
    book = ReportBook()
    assert book.add(NS, CHAIN, presence("pod-a", T0)) == "chain"
    assert book.add(NS, CHAIN, presence("pod-a", T0 + 300)) is None
    assert book.add(NS, CHAIN, presence("pod-b", T0 + 300)) == "chain"
    s = book.chain_summary(NS, CHAIN, T0 + 301)
    assert (s.sidecars, s.on_fallback, s.active, s.last_fallback, s.reason) == (2, 0, None, None, None)


def test_an_older_heartbeat_does_not_move_last_seen_back():
    book = ReportBook(presence_ttl=100)
    book.add(NS, CHAIN, presence("pod-a", T0 + 50))
    book.add(NS, CHAIN, presence("pod-a", T0))
    assert book.chain_summary(NS, CHAIN, T0 + 120).sidecars == 1


def test_sidecars_count_only_within_presence_ttl():
    book = ReportBook(presence_ttl=100)
    book.add(NS, CHAIN, presence("pod-a", T0))
    book.add(NS, CHAIN, presence("pod-b", T0 + 50))
    assert book.chain_summary(NS, CHAIN, T0 + 99).sidecars == 2
    assert book.chain_summary(NS, CHAIN, T0 + 100).sidecars == 1
    assert book.chain_summary(NS, CHAIN, T0 + 150).sidecars == 0


def test_default_presence_ttl_covers_missed_heartbeats():
    assert PRESENCE_TTL == 750.0
    book = ReportBook()
    book.add(NS, CHAIN, presence("pod-a", T0))
    assert book.chain_summary(NS, CHAIN, T0 + 749).sidecars == 1
    assert book.chain_summary(NS, CHAIN, T0 + 750).sidecars == 0


def test_a_heartbeat_from_a_pod_that_had_aged_out_changes_the_chain():
    # BUG: add() returns None for any known pod's heartbeat, but a pod silent for longer than
    # presence_ttl (not yet pruned) is no longer counted; its next heartbeat brings it back into
    # status.sidecars, so the chain's status does change and must be rescheduled (otherwise it stays
    # stale until the next resync). Fix: return "chain" when the pod was not live before the report
    # (previous last_seen + presence_ttl <= report.at).
    book = ReportBook(presence_ttl=100)
    book.add(NS, CHAIN, presence("pod-a", T0))
    assert book.chain_summary(NS, CHAIN, T0 + 200).sidecars == 0
    assert book.add(NS, CHAIN, presence("pod-a", T0 + 200)) == "chain"
    assert book.chain_summary(NS, CHAIN, T0 + 200).sidecars == 1


def test_fallback_puts_the_pod_on_a_fallback():
    book = ReportBook()
    book.add(NS, CHAIN, presence("pod-a", T0))
    book.add(NS, CHAIN, presence("pod-b", T0))
    assert book.add(NS, CHAIN, rep(fallback(T0 + 5, "openai", "backup", model="m1"))) == "chain"
    s = book.chain_summary(NS, CHAIN, T0 + 6)
    assert (s.sidecars, s.on_fallback, s.active, s.reason) == (2, 1, "backup", "ServerError")
    assert s.last_fallback == LastFallbackFact("openai", "backup", "ServerError", T0 + 5, "pod-a")


def test_a_fallback_report_counts_its_pod_as_reporting():
    book = ReportBook()
    book.add(NS, CHAIN, rep(fallback(T0, "openai", "backup")))
    assert book.chain_summary(NS, CHAIN, T0 + 1).sidecars == 1


def test_fallback_without_error_class_has_reason_unknown():
    book = ReportBook()
    book.add(NS, CHAIN, rep(act(ActionKind.FALLBACK_ACTIVATED, T0, from_entry="openai", to_entry="backup")))
    assert book.chain_summary(NS, CHAIN, T0).reason == "Unknown"


def test_a_pod_is_on_fallback_while_any_of_its_models_is():
    book = ReportBook()
    book.add(NS, CHAIN, rep(fallback(T0, "openai", "backup", model="m1")))
    book.add(NS, CHAIN, rep(fallback(T0 + 1, "openai", "backup", model="m2")))
    assert book.add(NS, CHAIN, rep(primary_back(T0 + 2, "backup", "openai", model="m1"))) == "chain"
    s = book.chain_summary(NS, CHAIN, T0 + 3)
    assert (s.on_fallback, s.active) == (1, "backup")
    book.add(NS, CHAIN, rep(primary_back(T0 + 4, "backup", "openai", model="m2")))
    s = book.chain_summary(NS, CHAIN, T0 + 5)
    assert (s.on_fallback, s.active, s.reason) == (0, None, None)


def test_a_fallback_from_a_fallback_keeps_the_original_entry():
    book = ReportBook()
    book.add(NS, CHAIN, rep(fallback(T0, "a", "b", model="m")))
    book.add(NS, CHAIN, rep(fallback(T0 + 1, "b", "c", model="m", cls=ErrorClass.TIMEOUT)))
    assert book.chains[(NS, CHAIN)]["pod-a"].fallbacks["m"][:3] == ("a", "c", "Timeout")
    s = book.chain_summary(NS, CHAIN, T0 + 2)
    assert (s.on_fallback, s.active, s.reason) == (1, "c", "Timeout")
    # lastFallback is the transition as it happened.
    assert (s.last_fallback.from_entry, s.last_fallback.to_entry) == ("b", "c")


def test_active_is_the_target_of_the_latest_fallback_in_force():
    book = ReportBook()
    book.add(NS, CHAIN, rep(fallback(T0, "a", "b", model="m1"), pod="pod-a"))
    book.add(NS, CHAIN, rep(fallback(T0 + 10, "a", "c", model="m2"), pod="pod-b"))
    assert book.chain_summary(NS, CHAIN, T0 + 11).active == "c"
    book.add(NS, CHAIN, rep(primary_back(T0 + 20, "c", "a", model="m2"), pod="pod-b"))
    s = book.chain_summary(NS, CHAIN, T0 + 21)
    assert (s.active, s.on_fallback, s.sidecars) == ("b", 1, 2)
    assert s.last_fallback.to_entry == "c"  # history: the latest fallback, even though it ended


def test_last_fallback_is_kept_after_restore():
    book = ReportBook()
    book.add(NS, CHAIN, rep(fallback(T0, "openai", "backup")))
    book.add(NS, CHAIN, rep(primary_back(T0 + 60, "backup", "openai")))
    s = book.chain_summary(NS, CHAIN, T0 + 61)
    assert s.on_fallback == 0 and s.active is None
    assert s.last_fallback == LastFallbackFact("openai", "backup", "ServerError", T0, "pod-a")


def test_an_older_fallback_does_not_replace_last_fallback():
    book = ReportBook()
    book.add(NS, CHAIN, rep(fallback(T0 + 10, "a", "b"), pod="pod-a"))
    book.add(NS, CHAIN, rep(fallback(T0, "a", "c"), pod="pod-b"))
    assert book.chain_summary(NS, CHAIN, T0 + 11).last_fallback.to_entry == "b"


def test_a_late_fallback_does_not_undo_a_newer_restore_of_the_same_pod():
    book = ReportBook()
    book.add(NS, CHAIN, rep(primary_back(T0 + 10, "backup", "openai")))
    assert book.add(NS, CHAIN, rep(fallback(T0, "openai", "backup"))) is None
    assert book.chain_summary(NS, CHAIN, T0 + 11).on_fallback == 0


def test_order_is_kept_per_model_a_restore_of_one_model_does_not_hide_another_models_fallback():
    # BUG: PodState.last_order is per pod, not per (pod, model). A fallback of model m2 observed at
    # T0, delivered after a restore of model m1 observed at T0+10 (the operator's initial LIST returns
    # Events in name order, not time order), is dropped although nothing newer happened to m2: the
    # pod is on a fallback for m2 but status says it is not. Fix: keep last_order per model.
    book = ReportBook()
    book.add(NS, CHAIN, rep(fallback(T0 - 5, "openai", "backup", model="m1")))
    book.add(NS, CHAIN, rep(primary_back(T0 + 10, "backup", "openai", model="m1")))
    assert book.add(NS, CHAIN, rep(fallback(T0, "openai", "backup", model="m2"))) == "chain"
    s = book.chain_summary(NS, CHAIN, T0 + 11)
    assert (s.on_fallback, s.active) == (1, "backup")


def test_chain_exhausted_changes_nothing():
    book = ReportBook()
    book.add(NS, CHAIN, presence("pod-a", T0))
    before = book.chain_summary(NS, CHAIN, T0 + 1)
    assert book.add(NS, CHAIN, rep(SAMPLES[ActionKind.CHAIN_EXHAUSTED])) is None
    assert book.chain_summary(NS, CHAIN, T0 + 1) == before


def test_chain_exhausted_from_an_unknown_pod_changes_the_sidecar_count():
    # BUG: a CHAIN_EXHAUSTED from a pod the book does not know adds that pod (it now counts in
    # status.sidecars) but add() returns None, so the chain's status is not rescheduled. Fix: return
    # "chain" when the pod was new (or not live) before the report, whatever its kind.
    book = ReportBook()
    before = book.chain_summary(NS, CHAIN, T0 + 10)
    result = book.add(NS, CHAIN, rep(SAMPLES[ActionKind.CHAIN_EXHAUSTED]))
    after = book.chain_summary(NS, CHAIN, T0 + 10)
    assert before != after
    assert result == "chain"


def test_chain_deadline_is_the_earliest_presence_age_out():
    book = ReportBook(presence_ttl=100)
    assert book.deadline("chain", NS, CHAIN, T0) is None
    book.add(NS, CHAIN, presence("pod-a", T0))
    book.add(NS, CHAIN, presence("pod-b", T0 + 40))
    assert book.deadline("chain", NS, CHAIN, T0 + 1) == T0 + 100
    assert book.deadline("chain", NS, CHAIN, T0 + 100) == T0 + 140
    assert book.deadline("chain", NS, CHAIN, T0 + 140) is None


def test_prune_drops_old_restored_entries_and_expired_blocks_but_keeps_live_ones():
    book = ReportBook()
    book.add(NS, POOL, rep(restored(T0, "k1")))
    book.add(NS, POOL, rep(cooled(T0, "k2", until=T0 + 60)))
    book.add(NS, POOL, rep(act(ActionKind.REJECTED, T0, error_class=ErrorClass.REVOKED, credential="k3")))
    book.prune(T0 + RESTORED_MEMORY - 1)
    assert set(book.pools[(NS, POOL)]) == {("k1", ""), ("k2", ""), ("k3", "")}
    book.prune(T0 + RESTORED_MEMORY + 61)
    assert set(book.pools[(NS, POOL)]) == {("k3", "")}  # a rejection has no end


def test_prune_removes_an_emptied_pool():
    book = ReportBook()
    book.add(NS, POOL, rep(restored(T0)))
    book.prune(T0 + RESTORED_MEMORY + 1)
    assert (NS, POOL) not in book.pools


def test_prune_drops_silent_pods_and_emptied_chains_but_keeps_last_fallback():
    book = ReportBook(presence_ttl=100)
    book.add(NS, CHAIN, rep(fallback(T0, "openai", "backup"), pod="pod-a"))
    book.add(NS, CHAIN, presence("pod-b", T0 + 50))
    book.prune(T0 + 101)
    assert set(book.chains[(NS, CHAIN)]) == {"pod-b"}
    book.prune(T0 + 151)
    assert (NS, CHAIN) not in book.chains
    s = book.chain_summary(NS, CHAIN, T0 + 151)
    assert s is not None and s.sidecars == 0 and s.last_fallback.to_entry == "backup"


def test_forget_drops_everything_about_the_object():
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0)))
    book.add(NS, CHAIN, rep(fallback(T0, "openai", "backup")))
    book.forget("pool", NS, POOL)
    book.forget("chain", NS, CHAIN)
    assert book.pool_reports(NS, POOL, T0) == {}
    assert book.chain_summary(NS, CHAIN, T0) is None
    book.forget("pool", NS, "never-seen")  # no error


def test_books_are_keyed_by_namespace():
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0)))
    assert book.pool_reports("other", POOL, T0) == {}


# --- seeding after a restart ------------------------------------------------------------------------


def row(
    name: str, state: str, *, until: float | None = None, reason: str | None = None, **extra: Any
) -> dict:
    out: dict[str, Any] = {
        "name": name,
        "state": state,
        "fingerprint": FP,
        "lastTransitionTime": rfc3339(T0 - 10),
    }
    if reason:
        out["reason"] = reason
    if until is not None:
        out["until"] = rfc3339(until)
    out.update(extra)
    return out


SEED_STATUS = {
    "credentials": [
        row(
            "k1",
            "CoolingDown",
            until=T0 + 60,
            reason="RateLimited",
            reportedBy="pod-a",
            lastErrorCode=429,
            model="m1",
        ),
        row("k2", "Exhausted", until=T0 - 1, reason="Billing"),  # ended
        row("k3", "Available"),
        row("k4", "Missing", reason="SecretNotFound"),
        row("k5", "Rejected", reason="Revoked", reportedBy="pod-b"),
        row("k6", "CoolingDown", until=T0 + 60, reason="RateLimited", fingerprint=None),
        {"name": "k7", "state": "CoolingDown", "until": "tomorrow"},
        "not a row",
    ]
}


def test_seed_pool_adopts_benched_rows_with_a_future_until():
    book = ReportBook()
    book.seed_pool(NS, POOL, SEED_STATUS, T0)
    out = book.pool_reports(NS, POOL, T0)
    assert set(out) == {"k1", "k5", "k6"}
    k1 = out["k1"]
    assert (k1.state, k1.reason, k1.until, k1.pod, k1.status, k1.model, k1.at, k1.fingerprint) == (
        CredentialState.COOLING_DOWN,
        "RateLimited",
        T0 + 60,
        "pod-a",
        429,
        "m1",
        T0 - 10,
        FP,
    )
    assert (out["k5"].state, out["k5"].until) == (CredentialState.REJECTED, None)


def test_seeded_state_orders_against_later_reports_by_its_transition_time():
    book = ReportBook()
    book.seed_pool(NS, POOL, SEED_STATUS, T0)
    assert book.add(NS, POOL, rep(restored(T0 - 20, "k5"))) is None  # older than the status row
    assert book.add(NS, POOL, rep(restored(T0, "k5"))) == "pool"
    assert "k5" not in book.pool_reports(NS, POOL, T0)


def test_seed_pool_does_not_override_known_reports():
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0, "k9", until=T0 + 30)))
    book.seed_pool(NS, POOL, SEED_STATUS, T0)
    assert set(book.pool_reports(NS, POOL, T0)) == {"k9"}


def test_seed_pool_with_nothing_benched_records_nothing():
    book = ReportBook()
    book.seed_pool(NS, POOL, None, T0)
    book.seed_pool(NS, POOL, {}, T0)
    book.seed_pool(NS, POOL, {"credentials": [row("k3", "Available")]}, T0)
    assert book.pools == {}


def test_seed_chain_keeps_last_fallback():
    book = ReportBook()
    status = {
        "lastFallback": {
            "from": "openai",
            "to": "backup",
            "reason": "Timeout",
            "time": rfc3339(T0),
            "pod": "p",
        }
    }
    book.seed_chain(NS, CHAIN, status)
    s = book.chain_summary(NS, CHAIN, T0 + 1)
    assert s.last_fallback == LastFallbackFact("openai", "backup", "Timeout", T0, "p")
    assert (s.sidecars, s.on_fallback) == (0, 0)


def test_seed_chain_does_not_override_and_ignores_garbage():
    book = ReportBook()
    book.add(NS, CHAIN, rep(fallback(T0 + 5, "a", "b")))
    book.seed_chain(NS, CHAIN, {"lastFallback": {"from": "x", "to": "y", "reason": "R", "time": rfc3339(T0)}})
    assert book.chain_summary(NS, CHAIN, T0 + 6).last_fallback.to_entry == "b"
    for garbage in (
        None,
        {},
        {"lastFallback": "x"},
        {"lastFallback": {"from": "a"}},
        {"lastFallback": {"from": "a", "to": "b", "reason": "r", "time": "soon"}},
    ):
        other = ReportBook()
        other.seed_chain(NS, CHAIN, garbage)
        assert other.last_fallbacks == {}
    lenient = ReportBook()
    lenient.seed_chain(
        NS, CHAIN, {"lastFallback": {"from": "a", "to": "b", "reason": "r", "time": rfc3339(T0)}}
    )
    assert lenient.last_fallbacks[(NS, CHAIN)].pod == ""


# --- status folding ---------------------------------------------------------------------------------


def pool_obj(*creds: tuple[str, str, str], generation: int = 3) -> CredentialPool:
    return CredentialPool.model_validate(
        {
            "metadata": {"name": POOL, "namespace": NS, "generation": generation},
            "spec": {
                "provider": "openai",
                "credentials": [{"name": n, "secretRef": {"name": s, "key": k}} for n, s, k in creds],
            },
        }
    )


def pool_obj_named(name: str, provider: str) -> CredentialPool:
    return CredentialPool.model_validate(
        {
            "metadata": {"name": name, "namespace": NS, "generation": 1},
            "spec": {
                "provider": provider,
                "credentials": [{"name": "k1", "secretRef": {"name": "s", "key": "a"}}],
            },
        }
    )


def secret(name: str, **values: str) -> Secret:
    return Secret.model_validate(
        {
            "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
        }
    )


def chain_obj() -> ProviderChain:
    return ProviderChain.model_validate(
        {
            "metadata": {"name": CHAIN, "namespace": NS, "generation": 2, "uid": "u-1"},
            "spec": {
                "providers": [
                    {
                        "name": "openai",
                        "provider": "openai",
                        "baseURL": "https://openai.test/v1",
                        "credentialPoolRef": {"name": "openai"},
                    },
                    {
                        "name": "backup",
                        "provider": "backup",
                        "baseURL": "https://backup.test/v1",
                        "credentialPoolRef": {"name": "backup"},
                    },
                ]
            },
        }
    )


def rendered():
    pools = {"openai": pool_obj_named("openai", "openai"), "backup": pool_obj_named("backup", "backup")}
    return render(chain_obj(), pools, {"s": secret("s", a=KEY)})


def cond(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


@pytest.fixture
def two_keys():
    p = pool_obj(("k1", "s", "a"), ("k2", "s", "b"))
    resolved = resolve_pool(p, {"s": secret("s", a=KEY, b=KEY + "2")})
    fps = {c.name: c.fingerprint for c in resolved.credentials}
    return p, resolved, fps


def test_pool_status_shows_reported_state(two_keys):
    p, resolved, fps = two_keys
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0 - 2, "k1", until=T0 + 30, model="gpt-4o", fp=fps["k1"])))
    st = pool_status(p, resolved, old=None, now=T0, reported=book.pool_reports(NS, POOL, T0))
    k1 = st["credentials"][0]
    assert k1 == {
        "name": "k1",
        "fingerprint": fps["k1"],
        "state": "CoolingDown",
        "reason": "RateLimited",
        "until": rfc3339(T0 + 30),
        "lastErrorCode": 429,
        "reportedBy": "pod-a",
        "model": "gpt-4o",
        "lastTransitionTime": rfc3339(T0 - 2),  # when the sidecar saw it, not when status was written
    }
    assert st["credentials"][1]["state"] == "Available"
    assert (st["available"], st["total"]) == (1, 2)
    assert cond(st, "Ready")["status"] == "True"
    assert cond(st, "Degraded")["status"] == "True" and cond(st, "Degraded")["reason"] == "RateLimited"
    assert cond(st, "Exhausted")["status"] == "False"
    assert crds.validate("CredentialPool", st, part="status") == []


def test_pool_status_flips_back_after_until(two_keys):
    p, resolved, fps = two_keys
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0, "k1", until=T0 + 30, fp=fps["k1"])))
    first = pool_status(p, resolved, old=None, now=T0 + 1, reported=book.pool_reports(NS, POOL, T0 + 1))
    later = pool_status(p, resolved, old=first, now=T0 + 31, reported=book.pool_reports(NS, POOL, T0 + 31))
    k1 = later["credentials"][0]
    assert k1 == {
        "name": "k1",
        "fingerprint": fps["k1"],
        "state": "Available",
        "lastTransitionTime": rfc3339(T0 + 31),
    }
    assert cond(later, "Degraded")["status"] == "False"
    assert crds.validate("CredentialPool", later, part="status") == []


def test_pool_status_ignores_a_report_about_another_key_value(two_keys):
    p, resolved, fps = two_keys
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0, "k1", until=T0 + 30, fp="sha256:rotated-away")))
    st = pool_status(p, resolved, old=None, now=T0, reported=book.pool_reports(NS, POOL, T0))
    assert st["credentials"][0]["state"] == "Available" and "reportedBy" not in st["credentials"][0]


def test_pool_status_exhausted_when_every_present_key_is_benched(two_keys):
    p, resolved, fps = two_keys
    book = ReportBook()
    book.add(
        NS,
        POOL,
        rep(
            act(
                ActionKind.EXHAUSTED,
                T0,
                error_class=ErrorClass.BILLING,
                credential="k1",
                fingerprint=fps["k1"],
                until=T0 + 3600,
                status=402,
            )
        ),
    )
    book.add(
        NS,
        POOL,
        rep(
            act(
                ActionKind.REJECTED,
                T0,
                error_class=ErrorClass.REVOKED,
                credential="k2",
                fingerprint=fps["k2"],
                status=401,
            ),
            pod="pod-b",
        ),
    )
    st = pool_status(p, resolved, old=None, now=T0 + 1, reported=book.pool_reports(NS, POOL, T0 + 1))
    rows = {r["name"]: r for r in st["credentials"]}
    assert rows["k1"]["state"] == "Exhausted" and rows["k1"]["until"] == rfc3339(T0 + 3600)
    assert (
        rows["k2"]["state"] == "Rejected"
        and "until" not in rows["k2"]
        and rows["k2"]["reportedBy"] == "pod-b"
    )
    assert st["available"] == 0
    assert cond(st, "Ready")["reason"] == "NoCredentialAvailable"
    assert cond(st, "Exhausted")["status"] == "True"
    assert crds.validate("CredentialPool", st, part="status") == []
    assert KEY not in json.dumps(st)


def test_pool_status_round_trips_through_seed(two_keys):
    """What the operator wrote is what a restarted operator adopts."""
    p, resolved, fps = two_keys
    book = ReportBook()
    book.add(NS, POOL, rep(cooled(T0, "k1", until=T0 + 30, fp=fps["k1"], model="m")))
    st = pool_status(p, resolved, old=None, now=T0 + 1, reported=book.pool_reports(NS, POOL, T0 + 1))
    fresh = ReportBook()
    fresh.seed_pool(NS, POOL, st, T0 + 2)
    assert fresh.pool_reports(NS, POOL, T0 + 2) == book.pool_reports(NS, POOL, T0 + 2)


def summary(
    sidecars: int = 2,
    on_fallback: int = 1,
    active: str | None = "backup",
    reason: str | None = "ServerError",
    last: bool = True,
) -> ChainSummary:
    return ChainSummary(
        sidecars=sidecars,
        on_fallback=on_fallback,
        active=active,
        last_fallback=LastFallbackFact("openai", "backup", "ServerError", T0 - 5, "pod-a") if last else None,
        reason=reason,
    )


def test_chain_status_with_a_fallback_in_force():
    st = chain_status(chain_obj(), rendered(), old=None, now=T0, summary=summary())
    assert (st["sidecars"], st["sidecarsOnFallback"], st["activeProvider"]) == (2, 1, "backup")
    assert st["lastFallback"] == {
        "from": "openai",
        "to": "backup",
        "reason": "ServerError",
        "time": rfc3339(T0 - 5),
        "pod": "pod-a",
    }
    fa = cond(st, "FallbackActive")
    assert (fa["status"], fa["reason"]) == ("True", "ServerError")
    assert "1 of 2" in fa["message"]
    assert crds.validate("ProviderChain", st, part="status") == []


def test_chain_status_active_provider_only_if_routable():
    st = chain_status(chain_obj(), rendered(), old=None, now=T0, summary=summary(active="not-in-the-chain"))
    assert st["activeProvider"] == "openai"
    assert crds.validate("ProviderChain", st, part="status") == []


def test_chain_status_primary_serving():
    st = chain_status(
        chain_obj(), rendered(), old=None, now=T0, summary=summary(on_fallback=0, active=None, reason=None)
    )
    fa = cond(st, "FallbackActive")
    assert (fa["status"], fa["reason"]) == ("False", "PrimaryServing")
    assert (st["activeProvider"], st["sidecarsOnFallback"]) == ("openai", 0)
    assert st["lastFallback"]["to"] == "backup"  # history stays
    assert crds.validate("ProviderChain", st, part="status") == []


def test_chain_status_no_sidecar_reporting():
    st = chain_status(
        chain_obj(),
        rendered(),
        old=None,
        now=T0,
        summary=summary(sidecars=0, on_fallback=0, active=None, reason=None, last=False),
    )
    fa = cond(st, "FallbackActive")
    assert (fa["status"], fa["reason"]) == ("False", "NoFallbackReported")
    assert st["sidecars"] == 0 and "lastFallback" not in st
    assert crds.validate("ProviderChain", st, part="status") == []


def test_chain_status_from_the_book():
    book = ReportBook()
    book.add(NS, CHAIN, presence("pod-a", T0))
    book.add(NS, CHAIN, rep(fallback(T0 + 1, "openai", "backup", cls=ErrorClass.RATE_LIMITED), pod="pod-b"))
    st = chain_status(
        chain_obj(), rendered(), old=None, now=T0 + 2, summary=book.chain_summary(NS, CHAIN, T0 + 2)
    )
    assert (st["sidecars"], st["sidecarsOnFallback"], st["activeProvider"]) == (2, 1, "backup")
    assert cond(st, "FallbackActive")["reason"] == "RateLimited"
    assert crds.validate("ProviderChain", st, part="status") == []
    book.add(NS, CHAIN, rep(primary_back(T0 + 70, "backup", "openai"), pod="pod-b"))
    back = chain_status(
        chain_obj(), rendered(), old=st, now=T0 + 71, summary=book.chain_summary(NS, CHAIN, T0 + 71)
    )
    assert back["activeProvider"] == "openai" and back["sidecarsOnFallback"] == 0
    assert cond(back, "FallbackActive")["reason"] == "PrimaryServing"
    assert cond(back, "FallbackActive")["lastTransitionTime"] == rfc3339(T0 + 71)
    assert back["lastFallback"]["pod"] == "pod-b"


def test_chain_status_without_summary_keeps_old_report_fields():
    result = rendered()
    reported = chain_status(chain_obj(), result, old=None, now=T0, summary=summary())
    kept = chain_status(chain_obj(), result, old=reported, now=T0 + 10, summary=None)
    for field_name in ("sidecars", "sidecarsOnFallback", "lastFallback", "activeProvider"):
        assert kept[field_name] == reported[field_name], field_name
    assert cond(kept, "FallbackActive") == cond(reported, "FallbackActive")
    assert crds.validate("ProviderChain", kept, part="status") == []


def test_chain_status_without_summary_or_history_says_no_fallback_reported():
    st = chain_status(chain_obj(), rendered(), old=None, now=T0, summary=None)
    assert cond(st, "FallbackActive")["reason"] == "NoFallbackReported"
    assert "sidecars" not in st and st["activeProvider"] == "openai"


def test_chain_status_without_summary_drops_an_old_active_provider_no_longer_routable():
    old = {"activeProvider": "removed-entry", "sidecars": 1}
    st = chain_status(chain_obj(), rendered(), old=old, now=T0, summary=None)
    assert st["activeProvider"] == "openai" and st["sidecars"] == 1


# --- shared blocks: status → what other pods adopt --------------------------------------------------


def test_shared_blocks_from_another_pods_rows():
    status = {
        "credentials": [
            row(
                "k1",
                "CoolingDown",
                until=T0 + 60,
                reason="RateLimited",
                reportedBy="pod-b",
                lastErrorCode=429,
                model="gpt-4o",
            ),
            row("k2", "Exhausted", until=T0 + 3600, reason="Billing", reportedBy="pod-c"),
        ]
    }
    blocks = shared_blocks(status, pod="pod-a", now=T0)
    assert [
        (b.credential, b.state, b.error_class, b.until, b.model, b.status, b.reported_by, b.fingerprint)
        for b in blocks
    ] == [
        ("k1", CredentialState.COOLING_DOWN, ErrorClass.RATE_LIMITED, T0 + 60, "gpt-4o", 429, "pod-b", FP),
        ("k2", CredentialState.EXHAUSTED, ErrorClass.BILLING, T0 + 3600, None, None, "pod-c", FP),
    ]


def test_shared_blocks_skip_own_rows_and_rows_without_fingerprint():
    status = {
        "credentials": [
            row("k1", "CoolingDown", until=T0 + 60, reason="RateLimited", reportedBy="pod-a"),
            row(
                "k2", "CoolingDown", until=T0 + 60, reason="RateLimited", reportedBy="pod-b", fingerprint=None
            ),
            {"name": "k3", "state": "CoolingDown", "until": rfc3339(T0 + 60), "reportedBy": "pod-b"},
        ]
    }
    assert shared_blocks(status, pod="pod-a", now=T0) == []


def test_shared_blocks_skip_expired_available_missing_and_unreadable_rows():
    status = {
        "credentials": [
            row("k1", "CoolingDown", until=T0, reason="RateLimited", reportedBy="pod-b"),  # ends now
            row("k2", "Available", reportedBy="pod-b"),
            row("k3", "Missing", reason="SecretNotFound"),
            row("k4", "CoolingDown", reportedBy="pod-b", until=None, lastTransitionTime="garbage"),
            {"state": "CoolingDown", "fingerprint": FP, "until": rfc3339(T0 + 60)},  # no name
            42,
        ]
    }
    assert shared_blocks(status, pod="pod-a", now=T0) == []
    assert shared_blocks(None, pod="pod-a", now=T0) == []
    assert shared_blocks({}, pod="pod-a", now=T0) == []


def test_shared_rejection_without_until_lasts_until_the_key_changes():
    status = {"credentials": [row("k1", "Rejected", reason="Revoked", reportedBy="pod-b")]}
    (b,) = shared_blocks(status, pod="pod-a", now=T0)
    assert (b.state, b.error_class, b.until) == (CredentialState.REJECTED, ErrorClass.REVOKED, None)


@pytest.mark.parametrize(
    ("state", "default"),
    [
        ("CoolingDown", ErrorClass.RATE_LIMITED),
        ("Exhausted", ErrorClass.BILLING),
        ("Rejected", ErrorClass.REVOKED),
    ],
)
def test_shared_block_with_an_unknown_reason_gets_the_states_default_class(state: str, default: ErrorClass):
    status = {"credentials": [row("k1", state, until=T0 + 60, reason="SomethingNew", reportedBy="pod-b")]}
    (b,) = shared_blocks(status, pod="pod-a", now=T0)
    assert b.error_class is default


def test_shared_block_without_reported_by_names_another_pod():
    status = {"credentials": [row("k1", "CoolingDown", until=T0 + 60, reason="RateLimited")]}
    (b,) = shared_blocks(status, pod="pod-a", now=T0)
    assert b.reported_by == "another pod"


# --- Pool.apply_block and expire ----------------------------------------------------------------------


def acme_pool() -> Pool:
    return Chain(two_providers()).pools["acme-keys"]


def adopted(
    until: float | None,
    *,
    state: CredentialState = CredentialState.COOLING_DOWN,
    cls: ErrorClass = ErrorClass.RATE_LIMITED,
) -> Block:
    return Block(state=state, error_class=cls, since=T0, until=until, reported_by="pod-b")


def test_adopted_all_models_block_makes_the_key_unusable_for_every_model():
    p = acme_pool()
    c1, c2 = p.credentials
    assert p.apply_block(c1.name, c1.fingerprint, adopted(T0 + 60)) is True
    assert not p.usable(c1, "m1", T0) and not p.usable(c1, "m2", T0)
    assert p.usable(c2, "m1", T0)
    lease = p.acquire("m1", T0)
    assert lease is not None and lease.credential.name == c2.name


def test_adopted_model_block_applies_to_that_model_only():
    p = acme_pool()
    c1 = p.credentials[0]
    assert p.apply_block(c1.name, c1.fingerprint, adopted(T0 + 60), model="m1") is True
    assert not p.usable(c1, "m1", T0) and p.usable(c1, "m2", T0)


def test_adopted_block_expires_silently():
    p = acme_pool()
    c1 = p.credentials[0]
    p.apply_block(c1.name, c1.fingerprint, adopted(T0 + 60))
    assert p.expire(T0 + 59) == []
    assert not p.usable(c1, "m", T0 + 59)
    assert p.expire(T0 + 60) == []  # restoring it is the reporting pod's business
    assert p.usable(c1, "m", T0 + 60) and p.health[c1.name].blocks == {}


def test_own_block_expiry_still_reports_restoration():
    p = acme_pool()
    c1 = p.credentials[0]
    p.health[c1.name].blocks[ALL_MODELS] = Block(
        CredentialState.COOLING_DOWN, ErrorClass.RATE_LIMITED, T0, T0 + 60
    )
    (a,) = p.expire(T0 + 60)
    assert (a.kind, a.credential, a.model) == (ActionKind.RESTORED, c1.name, None)


def test_adopted_block_for_another_key_value_is_ignored():
    p = acme_pool()
    c1 = p.credentials[0]
    assert p.apply_block(c1.name, "sha256:someone-elses-key", adopted(T0 + 60)) is False
    assert p.apply_block("no-such-credential", c1.fingerprint, adopted(T0 + 60)) is False
    assert p.usable(c1, "m", T0) and p.health[c1.name].blocks == {}


def test_a_shorter_adopted_block_does_not_shorten_a_longer_one():
    p = acme_pool()
    c1 = p.credentials[0]
    assert p.apply_block(c1.name, c1.fingerprint, adopted(T0 + 600)) is True
    epoch = p.health[c1.name].epoch
    assert p.apply_block(c1.name, c1.fingerprint, adopted(T0 + 60)) is False
    assert p.apply_block(c1.name, c1.fingerprint, adopted(T0 + 600)) is False  # the same again: nothing new
    assert p.health[c1.name].blocks[ALL_MODELS].until == T0 + 600 and p.health[c1.name].epoch == epoch
    assert p.apply_block(c1.name, c1.fingerprint, adopted(T0 + 900)) is True
    assert p.health[c1.name].blocks[ALL_MODELS].until == T0 + 900


def test_a_shorter_adopted_block_does_not_shorten_an_own_block():
    p = acme_pool()
    c1 = p.credentials[0]
    p.health[c1.name].blocks[ALL_MODELS] = Block(CredentialState.EXHAUSTED, ErrorClass.BILLING, T0, T0 + 3600)
    assert p.apply_block(c1.name, c1.fingerprint, adopted(T0 + 60)) is False
    assert p.health[c1.name].blocks[ALL_MODELS].reported_by is None


def test_an_adopted_cooldown_does_not_end_an_own_rejection():
    # BUG: Pool.apply_block only compares untils when both are set. An own Rejected block
    # (until None: until the Secret value changes) is replaced by any adopted block with an end, so a
    # revoked key becomes usable again when another pod's cooldown ends. Fix: treat until None as
    # infinite: refuse when current.until is None (and block.until is not None).
    p = acme_pool()
    c1 = p.credentials[0]
    p.health[c1.name].blocks[ALL_MODELS] = Block(CredentialState.REJECTED, ErrorClass.REVOKED, T0, None)
    assert p.apply_block(c1.name, c1.fingerprint, adopted(T0 + 60)) is False
    p.expire(T0 + 61)
    assert not p.usable(c1, "m", T0 + 61)


def test_an_adopted_rejection_replaces_a_cooldown():
    p = acme_pool()
    c1 = p.credentials[0]
    assert p.apply_block(c1.name, c1.fingerprint, adopted(T0 + 60)) is True
    rejection = adopted(None, state=CredentialState.REJECTED, cls=ErrorClass.REVOKED)
    assert p.apply_block(c1.name, c1.fingerprint, rejection) is True
    assert p.expire(T0 + 10_000) == [] and not p.usable(c1, "m", T0 + 10_000)


# --- FleetCooldowns.apply ---------------------------------------------------------------------------


NEVER_USED = Kube.from_connection(Connection(server="http://127.0.0.1:9"))


def fleet(chain: Chain | None, metrics: Metrics, now: float = T0) -> FleetCooldowns:
    return FleetCooldowns(NEVER_USED, Origin("pod-a", NS), lambda: chain, metrics, clock=lambda: now)


def acme_status(*rows: dict[str, Any], name: str = "acme-keys") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS}, "status": {"credentials": list(rows)}}


def acme_row(chain: Chain, index: int, **kw: Any) -> dict[str, Any]:
    c = chain.pools["acme-keys"].credentials[index]
    kw.setdefault("reportedBy", "pod-b")
    kw.setdefault("reason", "RateLimited")
    out = row(c.name, kw.pop("state", "CoolingDown"), until=kw.pop("until", T0 + 60), **kw)
    out["fingerprint"] = c.fingerprint
    return out


def shared_count(metrics: Metrics, pool_name: str = "acme-keys") -> float:
    return (
        metrics.registry.get_sample_value("keyroute_shared_cooldowns_applied_total", {"pool": pool_name})
        or 0.0
    )


def test_fleet_adopts_other_pods_blocks_and_counts_them():
    chain = Chain(two_providers())
    metrics = Metrics()
    f = fleet(chain, metrics)
    obj = acme_status(
        acme_row(chain, 0), acme_row(chain, 1, state="Exhausted", reason="Billing", until=T0 + 3600)
    )
    assert f.apply("acme-keys", "MODIFIED", obj) == 2
    p = chain.pools["acme-keys"]
    assert not p.usable(p.credentials[0], "m", T0) and not p.usable(p.credentials[1], "m", T0)
    assert p.health[p.credentials[0].name].blocks[ALL_MODELS].reported_by == "pod-b"
    assert shared_count(metrics) == 2
    # The same status again (every status write is a watch event) adopts nothing new.
    assert f.apply("acme-keys", "MODIFIED", obj) == 0
    assert shared_count(metrics) == 2
    # The fallback pool is untouched.
    backup = chain.pools["backup-keys"]
    assert all(backup.usable(c, "m", T0) for c in backup.credentials)


def test_fleet_logs_an_adopted_state_with_the_fields_an_sre_filters_on(caplog):
    # docs/sidecar.md "Logs": ``class`` (as on every other line) and ``until`` in RFC 3339.
    caplog.set_level(logging.INFO, logger="keyroute")
    chain = Chain(two_providers())
    assert fleet(chain, Metrics()).apply("acme-keys", "MODIFIED", acme_status(acme_row(chain, 0))) == 1
    [line] = [r for r in caplog.records if r.getMessage() == "honouring a credential state another pod reported"]
    fields = line.kr  # type: ignore[attr-defined]
    assert (fields["class"], fields["until"], fields["reported_by"]) == (
        "RateLimited",
        rfc3339(T0 + 60),
        "pod-b",
    )


def test_fleet_reapplying_a_shared_rejection_adopts_it_once():
    # BUG (same root cause as test_an_adopted_cooldown_does_not_end_an_own_rejection): apply_block
    # replaces a block whose until is None every time, so every status event of the pool re-adopts a
    # shared rejection, bumps the epoch, logs again and inflates keyroute_shared_cooldowns_applied.
    chain = Chain(two_providers())
    metrics = Metrics()
    f = fleet(chain, metrics)
    obj = acme_status(acme_row(chain, 0, state="Rejected", reason="Revoked", until=None))
    assert f.apply("acme-keys", "ADDED", obj) == 1
    assert f.apply("acme-keys", "MODIFIED", obj) == 0
    assert shared_count(metrics) == 1


def test_fleet_adopts_model_scoped_blocks_for_that_model():
    chain = Chain(two_providers())
    f = fleet(chain, Metrics())
    assert f.apply("acme-keys", "MODIFIED", acme_status(acme_row(chain, 0, model="gpt-4o"))) == 1
    p = chain.pools["acme-keys"]
    assert not p.usable(p.credentials[0], "gpt-4o", T0) and p.usable(p.credentials[0], "other", T0)


def test_fleet_ignores_its_own_pods_rows():
    chain = Chain(two_providers())
    f = fleet(chain, Metrics())
    assert f.apply("acme-keys", "MODIFIED", acme_status(acme_row(chain, 0, reportedBy="pod-a"))) == 0


def test_fleet_ignores_deleted_objects():
    chain = Chain(two_providers())
    metrics = Metrics()
    assert fleet(chain, metrics).apply("acme-keys", "DELETED", acme_status(acme_row(chain, 0))) == 0
    assert shared_count(metrics) == 0


def test_fleet_ignores_objects_with_another_name():
    chain = Chain(two_providers())
    f = fleet(chain, Metrics())
    assert f.apply("acme-keys", "MODIFIED", acme_status(acme_row(chain, 0), name="backup-keys")) == 0
    assert f.apply("acme-keys", "MODIFIED", {"status": {"credentials": [acme_row(chain, 0)]}}) == 0
    p = chain.pools["acme-keys"]
    assert p.usable(p.credentials[0], "m", T0)


def test_fleet_ignores_pools_without_shared_cooldowns():
    cfg = two_providers()
    data = cfg.dump()
    data["pools"][0]["shareCooldowns"] = False
    chain = Chain(type(cfg).parse(data))
    assert chain.pools["acme-keys"].share_cooldowns is False
    metrics = Metrics()
    assert fleet(chain, metrics).apply("acme-keys", "MODIFIED", acme_status(acme_row(chain, 0))) == 0
    assert shared_count(metrics) == 0


def test_fleet_ignores_pools_not_in_the_config_or_no_config():
    chain = Chain(two_providers())
    assert fleet(chain, Metrics()).apply("unknown", "MODIFIED", acme_status(name="unknown")) == 0
    assert fleet(None, Metrics()).apply("acme-keys", "MODIFIED", acme_status()) == 0


def test_fleet_ignores_rows_for_another_key_value_and_ended_rows():
    chain = Chain(two_providers())
    f = fleet(chain, Metrics(), now=T0 + 100)
    stale = acme_row(chain, 0)  # until T0 + 60: over by now
    rotated = acme_row(chain, 1, until=T0 + 600)
    rotated["fingerprint"] = "sha256:old-key-value"
    assert f.apply("acme-keys", "MODIFIED", acme_status(stale, rotated)) == 0


def test_fleet_adopted_block_ends_at_its_until_without_an_action():
    chain = Chain(two_providers())
    f = fleet(chain, Metrics())
    f.apply("acme-keys", "MODIFIED", acme_status(acme_row(chain, 0)))
    p = chain.pools["acme-keys"]
    assert p.expire(T0 + 60) == [] and p.usable(p.credentials[0], "m", T0 + 60)
