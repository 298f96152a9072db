"""The operator's pure decisions: conditions per the API conventions, pool and chain status, and
which transitions become Events."""

from __future__ import annotations

import base64

from keyroute.core.conditions import fact, merge_conditions
from keyroute.core.names import INVALID_NAME, chain_name_problem
from keyroute.core.objects import (
    HASH_ANNOTATION,
    config_secret,
    config_secret_chain,
    secret_hash,
    transitions,
)
from keyroute.core.render import render, resolve_pool
from keyroute.core.reports import CredentialReport
from keyroute.core.resources import CredentialPool, CredentialState, ProviderChain, Secret
from keyroute.core.status import chain_status, invalid_status, pool_status

T0 = 1_800_000_000.0
KEY = "sk-test-STATUS-SECRET-000000001"


def pool(*creds: tuple[str, str, str], provider: str = "openai", generation: int = 3) -> CredentialPool:
    return CredentialPool.model_validate(
        {
            "metadata": {"name": "openai", "namespace": "default", "generation": generation},
            "spec": {
                "provider": provider,
                "credentials": [{"name": n, "secretRef": {"name": s, "key": k}} for n, s, k in creds],
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


def chain(*pools: tuple[str, str], generation: int = 2) -> ProviderChain:
    names = [f"{prov}-{i}" if i else prov for i, (prov, _) in enumerate(pools)]
    return ProviderChain.model_validate(
        {
            "metadata": {"name": "agents", "namespace": "default", "generation": generation, "uid": "u-1"},
            "spec": {
                "providers": [
                    {
                        "name": n,
                        "provider": prov,
                        "baseURL": f"https://{prov}.test/v1",
                        "credentialPoolRef": {"name": ref},
                    }
                    for n, (prov, ref) in zip(names, pools, strict=True)
                ]
            },
        }
    )


def cond(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


# --- conditions ----------------------------------------------------------------------------------


def test_last_transition_time_moves_only_when_status_flips():
    first = merge_conditions(None, [fact("Ready", True, "Ok", "fine")], now="t1", generation=1)
    assert first == [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Ok",
            "message": "fine",
            "lastTransitionTime": "t1",
            "observedGeneration": 1,
        }
    ]
    same = merge_conditions(first, [fact("Ready", True, "StillOk", "still fine")], now="t2", generation=2)
    assert (
        same[0]["lastTransitionTime"] == "t1"
        and same[0]["reason"] == "StillOk"
        and same[0]["observedGeneration"] == 2
    )
    flipped = merge_conditions(same, [fact("Ready", False, "Broken")], now="t3", generation=2)
    assert flipped[0]["lastTransitionTime"] == "t3" and flipped[0]["status"] == "False"


def test_other_condition_types_are_kept_in_order_and_new_ones_appended():
    old = [{"type": "Foreign", "status": "True", "reason": "X", "lastTransitionTime": "t0"}]
    out = merge_conditions(old, [fact("Ready", None, "Pending")], now="t1", generation=None)
    assert [c["type"] for c in out] == ["Foreign", "Ready"]
    assert out[1]["status"] == "Unknown" and "observedGeneration" not in out[1]


# --- pool status ---------------------------------------------------------------------------------


def test_pool_all_available():
    p = pool(("k1", "s", "a"), ("k2", "s", "b"))
    st = pool_status(p, resolve_pool(p, {"s": secret("s", a=KEY, b=KEY + "2")}), old=None, now=T0)
    assert (st["available"], st["total"], st["observedGeneration"]) == (2, 2, 3)
    assert cond(st, "Ready")["status"] == "True"
    assert cond(st, "Degraded")["status"] == "False" and cond(st, "Exhausted")["status"] == "False"
    assert all(
        c["state"] == "Available" and c["fingerprint"].startswith("sha256:") for c in st["credentials"]
    )
    assert KEY not in str(st)


def test_pool_missing_secret_and_key_are_named_and_others_unaffected():
    p = pool(("k1", "gone", "a"), ("k2", "s", "nope"), ("k3", "s", "blank"), ("k4", "s", "a"))
    st = pool_status(p, resolve_pool(p, {"s": secret("s", a=KEY, blank="  \n")}), old=None, now=T0)
    states = {c["name"]: (c["state"], c.get("reason")) for c in st["credentials"]}
    assert states == {
        "k1": ("Missing", "SecretNotFound"),
        "k2": ("Missing", "SecretKeyMissing"),
        "k3": ("Missing", "SecretKeyMissing"),
        "k4": ("Available", None),
    }
    assert (st["available"], st["total"]) == (1, 4)
    assert cond(st, "Ready")["status"] == "True"
    degraded = cond(st, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "SecretNotFound"
    assert (
        "Secret default/gone not found" in degraded["message"]
        and "empty or whitespace" in degraded["message"]
    )


def test_pool_with_no_usable_key_is_not_ready():
    p = pool(("k1", "gone", "a"))
    st = pool_status(p, resolve_pool(p, {}), old=None, now=T0)
    ready = cond(st, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "NoCredentialAvailable"
    assert cond(st, "Exhausted")["status"] == "False"  # nothing benched: the key is missing, say so


def test_pool_reports_fold_in_until_they_expire_and_only_for_the_same_key():
    p = pool(("k1", "s", "a"))
    resolved = resolve_pool(p, {"s": secret("s", a=KEY)})
    fp = resolved.credentials[0].fingerprint
    rep = {
        "k1": CredentialReport(
            CredentialState.COOLING_DOWN, "RateLimited", T0 - 2, T0 + 30, fp, 429, "pod-a", None
        )
    }
    st = pool_status(p, resolved, old=None, now=T0, reported=rep)
    row = st["credentials"][0]
    assert (row["state"], row["reason"], row["lastErrorCode"], row["reportedBy"]) == (
        "CoolingDown",
        "RateLimited",
        429,
        "pod-a",
    )
    assert row["until"] == "2027-01-15T08:00:30Z"
    assert row["lastTransitionTime"] == "2027-01-15T07:59:58Z"  # when the sidecar saw it
    assert cond(st, "Exhausted")["status"] == "True" and cond(st, "Exhausted")["reason"] == "RateLimited"
    later = pool_status(p, resolved, old=st, now=T0 + 31, reported=rep)
    assert later["credentials"][0]["state"] == "Available" and "until" not in later["credentials"][0]
    rotated = {
        "k1": CredentialReport(
            CredentialState.REJECTED, "Revoked", T0, None, "sha256:other", 401, "pod-a", None
        )
    }
    assert (
        pool_status(p, resolved, old=None, now=T0, reported=rotated)["credentials"][0]["state"] == "Available"
    )


def test_next_available_is_the_soonest_until_of_a_benched_key():
    p = pool(("k1", "s", "a"), ("k2", "s", "b"), ("k3", "s", "c"))
    resolved = resolve_pool(p, {"s": secret("s", a=KEY, b=KEY + "b", c=KEY + "c")})
    fps = {c.name: c.fingerprint for c in resolved.credentials}

    def report(name: str, state: CredentialState, reason: str, until: float | None) -> CredentialReport:
        return CredentialReport(state, reason, T0 - 1, until, fps[name], 429, "pod-a", None)

    rep = {
        "k1": report("k1", CredentialState.EXHAUSTED, "Billing", T0 + 3600),
        "k2": report("k2", CredentialState.COOLING_DOWN, "RateLimited", T0 + 30),
        "k3": report("k3", CredentialState.REJECTED, "Revoked", None),  # back only when its key changes
    }
    st = pool_status(p, resolved, old=None, now=T0, reported=rep)
    assert st["nextAvailableAt"] == "2027-01-15T08:00:30Z"
    # When k2 comes back, the next is k1's; with no benched key the field goes (and the column is empty).
    assert pool_status(p, resolved, old=st, now=T0 + 31, reported=rep)["nextAvailableAt"] == "2027-01-15T09:00:00Z"
    assert "nextAvailableAt" not in pool_status(p, resolved, old=st, now=T0, reported={})


def test_credential_transition_time_is_kept_while_its_state_holds():
    p = pool(("k1", "s", "a"))
    resolved = resolve_pool(p, {"s": secret("s", a=KEY)})
    first = pool_status(p, resolved, old=None, now=T0)
    again = pool_status(p, resolved, old=first, now=T0 + 100)
    assert again == first  # an unchanged pool yields an identical status: nothing to write


def test_invalid_spec_status():
    st = invalid_status(None, "spec.strategy: Input should be 'FillFirst', ...", now=T0, generation=4)
    assert cond(st, "Ready")["reason"] == "InvalidSpec" and st["observedGeneration"] == 4


def test_a_credential_secret_may_have_any_name_a_secret_can_have():
    """A Secret's name is a DNS subdomain (253 characters), as secretRef.name allows: such a Secret was
    read as "unreadable" (the 63-character limit of keyroute's own names) and the key as missing."""
    name = "openai-keys." + "s" * 241
    assert len(name) == 253
    p = pool(("k1", name, "a"))
    st = pool_status(p, resolve_pool(p, {name: secret(name, a=KEY)}), old=None, now=T0)
    assert cond(st, "Ready")["status"] == "True" and st["available"] == 1


def test_invalid_name_status_says_why_and_what_to_do():
    message = chain_name_problem("agents.v1")
    assert message is not None
    assert message.startswith("the name 'agents.v1' cannot work: a ProviderChain name must be")
    assert message.endswith("delete it and create it again under a valid name")
    st = invalid_status(None, message, now=T0, generation=1, reason=INVALID_NAME)
    ready = cond(st, "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "InvalidName", message)
    # A 253-character name is shortened in the message: its length is what matters.
    long = chain_name_problem("a" * 253)
    assert long is not None and "(253 characters)" in long and "a" * 41 not in long


# --- chain status and the config Secret ----------------------------------------------------------


def test_chain_ready_renders_config_with_owner_and_hash():
    c = chain(("openai", "openai"))
    p = pool(("k1", "s", "a"))
    result = render(c, {"openai": p}, {"s": secret("s", a=KEY)})
    st = chain_status(c, result, old=None, now=T0)
    assert cond(st, "Ready")["status"] == "True" and cond(st, "Ready")["reason"] == "AllProvidersRoutable"
    assert cond(st, "FallbackActive")["status"] == "False"
    assert st["config"] == {"name": "agents-keyroute", "hash": result.config.content_hash()}
    assert st["activeProvider"] == "openai"
    sec = config_secret(c, result.config)
    assert sec["metadata"]["ownerReferences"][0] == {
        "apiVersion": "keyroute.dev/v1alpha1",
        "kind": "ProviderChain",
        "name": "agents",
        "controller": True,
        "blockOwnerDeletion": True,
        "uid": "u-1",
    }
    assert secret_hash(sec) == result.config.content_hash() == sec["metadata"]["annotations"][HASH_ANNOTATION]
    assert KEY in base64.b64decode(sec["data"]["config.json"]).decode()  # the Secret is where the key goes
    assert KEY not in str(st)


def test_a_config_secret_is_told_from_other_secrets_by_its_labels_and_name():
    c = chain(("openai", "openai"))
    result = render(c, {"openai": pool(("k1", "s", "a"))}, {"s": secret("s", a=KEY)})
    meta = config_secret(c, result.config)["metadata"]
    assert config_secret_chain(meta) == "agents"
    assert config_secret_chain({**meta, "name": "agents-other"}) is None  # labelled, but not its name
    unmanaged = {**meta, "labels": {"keyroute.dev/chain": "agents"}}
    assert config_secret_chain(unmanaged) is None  # someone else's Secret with our chain label
    assert config_secret_chain({"name": "agents-keyroute"}) is None  # no labels at all
    assert config_secret_chain({"name": "x", "labels": {**meta["labels"], "keyroute.dev/chain": 7}}) is None


def test_chain_with_mismatched_and_missing_pools_is_not_ready():
    c = chain(("openai", "anthropic-keys"), ("openrouter", "nowhere"), ("openai", "openai"))
    anth = pool(("k1", "s", "a"), provider="anthropic")
    anth = anth.model_copy(update={"metadata": anth.metadata.model_copy(update={"name": "anthropic-keys"})})
    result = render(c, {"anthropic-keys": anth, "openai": pool(("k1", "s", "a"))}, {"s": secret("s", a=KEY)})
    st = chain_status(c, result, old=None, now=T0)
    ready = cond(st, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "PoolProviderMismatch"
    assert "bound to provider anthropic" in ready["message"] and "nowhere not found" in ready["message"]
    assert [e.name for e in result.config.entries] == ["openai-2"]


# --- Events --------------------------------------------------------------------------------------


def test_transitions_post_events_only_for_changes():
    p = pool(("k1", "s", "a"), ("k2", "gone", "a"))
    resolved = resolve_pool(p, {"s": secret("s", a=KEY)})
    first = pool_status(p, resolved, old=None, now=T0)
    notes = transitions(None, first)
    assert ("Normal", "CredentialsAvailable") in [(n.type, n.reason) for n in notes]
    assert ("Warning", "SecretNotFound") in [(n.type, n.reason) for n in notes]
    assert transitions(first, pool_status(p, resolved, old=first, now=T0 + 5)) == []
    fixed = pool_status(
        p,
        resolve_pool(p, {"s": secret("s", a=KEY), "gone": secret("gone", a=KEY + "x")}),
        old=first,
        now=T0 + 9,
    )
    reasons = [(n.type, n.reason) for n in transitions(first, fixed)]
    assert ("Normal", "CredentialAvailable") in reasons and ("Normal", "AllCredentialsAvailable") in reasons
    assert all(KEY not in n.message for n in notes)


def test_a_pool_without_a_usable_key_leaves_its_entry_out_with_no_usable_credentials():
    c = chain(("openai", "openai"), ("openrouter", "empty"))
    empty = pool(("o1", "gone", "a"), provider="openrouter")
    empty = empty.model_copy(update={"metadata": empty.metadata.model_copy(update={"name": "empty"})})
    result = render(c, {"openai": pool(("k1", "s", "a")), "empty": empty}, {"s": secret("s", a=KEY)})
    ready = cond(chain_status(c, result, old=None, now=T0), "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NoUsableCredentials")
    assert [e.name for e in result.config.entries] == ["openai"]


def test_a_chain_with_no_routable_entry_says_no_routable_provider_and_names_why():
    """The docs' tables: ``NoRoutableProvider`` when no entry at all can be routed (every request
    of its pods fails), told apart from one entry left out while others still serve."""
    c = chain(("openai", "nowhere"), ("openrouter", "empty"))
    empty = pool(("o1", "gone", "a"), provider="openrouter")
    empty = empty.model_copy(update={"metadata": empty.metadata.model_copy(update={"name": "empty"})})
    result = render(c, {"empty": empty}, {})
    assert result.config.entries == []
    ready = cond(chain_status(c, result, old=None, now=T0), "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NoRoutableProvider")
    assert "nowhere not found" in ready["message"] and "empty" in ready["message"]


def test_a_config_secret_whose_data_was_edited_by_hand_has_no_hash():
    """The hash annotation is trusted only while the data has that hash: a ``kubectl edit`` of the
    data leaves it as it was, and the operator must put the rendered config back."""
    c = chain(("openai", "openai"))
    sec = config_secret(c, render(c, {"openai": pool(("k1", "s", "a"))}, {"s": secret("s", a=KEY)}).config)
    assert secret_hash(sec) is not None
    edited = {**sec, "data": {"config.json": base64.b64encode(b'{"edited": true}').decode()}}
    assert secret_hash(edited) is None
    assert secret_hash({**sec, "data": {"config.json": "not base64!"}}) is None
    assert secret_hash({**sec, "data": {}}) is None
