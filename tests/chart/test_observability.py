"""The chart's alerts and dashboard: valid for promtool, tested with its unit tests, linked to the
runbook, and querying only metrics (and labels) the code exports.

promtool is ``KEYROUTE_PROMTOOL``, else ``.tools/promtool/promtool`` (``./dev test`` extracts it from
Debian's ``prometheus`` package with ``tools/fetch_promtool.sh``), else the one on ``PATH``. Without it these tests skip on a developer's machine and FAIL
when ``CI`` is set: alerts nobody evaluated are not tested alerts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from keyroute.controller.metrics import OperatorMetrics
from keyroute.sidecar.metrics import Metrics
from tests.chart.test_chart import CHART, ROOT, SCENARIOS, HelmRunner, of_kind, one, rendered
from tests.chart.test_chart import helm as helm  # the session fixture: helm, rendering the chart

HERE = Path(__file__).resolve().parent
RUNBOOK = ROOT / "docs" / "runbook.md"
# The chart has no default for it (a guessed address would be a dead link): the tests give one.
RUNBOOK_URL = "https://runbooks.example/keyroute/runbook.md"
# Labels Prometheus itself attaches to every scraped series (the Prometheus Operator's monitors add
# namespace, pod, container, service, endpoint; every scrape has job and instance).
TARGET_LABELS = {"namespace", "pod", "container", "service", "endpoint", "job", "instance"}


def promtool() -> str:
    fetched = ROOT / ".tools" / "promtool" / "promtool"  # tools/fetch_promtool.sh, run by ./dev test
    path = os.environ.get("KEYROUTE_PROMTOOL") or (str(fetched) if fetched.exists() else shutil.which("promtool"))
    if path:
        return path
    message = (
        "promtool not found: `./dev test` extracts it from Debian's prometheus package "
        "(tools/fetch_promtool.sh), or put it on PATH, or set KEYROUTE_PROMTOOL=/path/to/promtool"
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def rule_groups(helm: HelmRunner) -> list[dict[str, Any]]:
    rule = one(rendered(helm, "certmanager-container"), "PrometheusRule")
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def default_rule_groups(helm: HelmRunner) -> list[dict[str, Any]]:
    """The rules as the default values render them (what tests/chart/alerts_test.yaml expects)."""
    objs = helm.template({"metrics": {"prometheusRule": {"enabled": True, "runbookURL": RUNBOOK_URL}}})
    groups: list[dict[str, Any]] = one(objs, "PrometheusRule")["spec"]["groups"]
    return groups


def alerts(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for g in groups for r in g["rules"] if "alert" in r]


def write_rules(groups: list[dict[str, Any]], where: Path) -> Path:
    path = where / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


# --- promtool --------------------------------------------------------------------------------------


def test_promtool_checks_the_rules(helm: HelmRunner, tmp_path: Path) -> None:
    tool = promtool()
    for groups in (rule_groups(helm), default_rule_groups(helm)):
        out = subprocess.run(
            [tool, "check", "rules", str(write_rules(groups, tmp_path))],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"SUCCESS: {len(alerts(groups))} rules found" in out.stdout


def test_promtool_unit_tests_of_every_alert(helm: HelmRunner, tmp_path: Path) -> None:
    tool = promtool()
    write_rules(default_rule_groups(helm), tmp_path)
    tests = HERE / "alerts_test.yaml"
    shutil.copy(tests, tmp_path / tests.name)
    out = subprocess.run(
        [tool, "test", "rules", tests.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # Every alert has at least one case where it fires.
    cases = yaml.safe_load(tests.read_text())["tests"]
    firing = {t["alertname"] for g in cases for t in g["alert_rule_test"] if t["exp_alerts"]}
    assert firing == {a["alert"] for a in alerts(default_rule_groups(helm))}


# --- the rules themselves ----------------------------------------------------------------------------


REQUIRED_ALERTS = {
    "KeyrouteCredentialPoolEmpty",  # a pool with no usable credential
    "KeyrouteChainExhausted",  # agents got 503
    "KeyrouteFallbackActiveTooLong",
    "KeyrouteCredentialRejected",  # a revoked key someone must replace
    "KeyrouteSidecarReportsDropped",
    "KeyrouteSidecarReportsRejected",  # RBAC missing
    "KeyrouteOperatorDown",
    "KeyrouteOperatorNotReconciling",
    "KeyrouteWebhookRefusals",
}


def test_every_alert_says_what_and_links_its_runbook_section(helm: HelmRunner) -> None:
    rules = alerts(rule_groups(helm))
    names = {r["alert"] for r in rules}
    assert names >= REQUIRED_ALERTS
    sections = set(re.findall(r"^### (Keyroute\w+)$", RUNBOOK.read_text(), re.MULTILINE))
    assert sections == names, "docs/runbook.md must have one ### section per alert"
    base = RUNBOOK_URL
    for r in rules:
        annotations = r["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, r["alert"]
        # GitHub's anchor of a "### KeyrouteX" heading is its text in lower case.
        assert annotations["runbook_url"] == f"{base}#{r['alert'].lower()}"
        assert r["labels"]["severity"] in {"critical", "warning"}


def test_alert_settings_come_from_the_values(helm: HelmRunner) -> None:
    objs = helm.template(
        {
            "metrics": {
                "prometheusRule": {
                    "enabled": True,
                    "fallbackActiveFor": "2h",
                    "poolEmptyFor": "10m",
                    "runbookURL": "https://docs.example/keyroute/runbook.html",
                    "additionalAlertLabels": {"team": "llm"},
                }
            }
        }
    )
    rules = {r["alert"]: r for r in alerts(one(objs, "PrometheusRule")["spec"]["groups"])}
    assert rules["KeyrouteFallbackActiveTooLong"]["for"] == "2h"
    assert "2h" in rules["KeyrouteFallbackActiveTooLong"]["annotations"]["summary"]
    assert rules["KeyrouteCredentialPoolEmpty"]["for"] == "10m"
    for r in rules.values():
        assert r["labels"]["team"] == "llm"
        assert r["annotations"]["runbook_url"].startswith("https://docs.example/keyroute/runbook.html#")


# --- every metric queried is exported ----------------------------------------------------------------


def exported() -> dict[str, set[str]]:
    """Series name -> label names, for every metric the sidecar and the operator define."""
    out: dict[str, set[str]] = {"up": set()}
    defined: list[tuple[str, set[str], str]] = []
    for owner in (Metrics(), OperatorMetrics()):
        for metric in vars(owner).values():
            if isinstance(metric, MetricWrapperBase):
                defined.append((metric._name, set(metric._labelnames), metric._type))
            elif callable(getattr(metric, "describe", None)):
                # A collector of its own (the sidecar's per-request series): its families, as described.
                for family in metric.describe():
                    defined.append((family.name, set(family._labelnames), family.type))
    for name, labels, kind in defined:
        if kind == "counter":
            out[name + "_total"] = labels
        elif kind == "histogram":
            out[name + "_bucket"] = labels | {"le"}
            out[name + "_sum"] = out[name + "_count"] = labels
        else:
            out[name] = labels
    return out


_SELECTOR = re.compile(r"\b(keyroute_\w+|up)\b\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def check_query(expr: str, where: str, known: dict[str, set[str]]) -> list[str]:
    problems: list[str] = []
    used: set[str] = set()
    for m in _SELECTOR.finditer(expr):
        name = m[1]
        if name not in known:
            problems.append(f"{where}: {name} is not exported")
            continue
        used |= known[name]
        for label in _MATCHER.findall(m[2] or ""):
            if label not in known[name] | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {label}")
    for group in _GROUPING.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if label not in used | TARGET_LABELS:
                problems.append(f"{where}: grouping by {label}, which none of its metrics has")
    return problems


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CHART / "dashboards" / "keyroute.json").read_text())
    return data


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"]))
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"variable {var['name']}", var["definition"]))
    return out


def test_alerts_and_dashboard_query_only_exported_metrics_and_labels(helm: HelmRunner) -> None:
    known = exported()
    queries = [(f"alert {r['alert']}", r["expr"]) for r in alerts(rule_groups(helm))] + dashboard_queries()
    problems = [p for where, expr in queries for p in check_query(expr, where, known)]
    assert problems == []
    # And the check itself catches a misspelt metric or label.
    assert check_query("rate(keyroute_token_total[5m])", "x", known)
    assert check_query('sum by (pool) (keyroute_tokens_total{credentail="a"})', "x", known)


def test_dashboard_covers_what_an_sre_looks_for() -> None:
    text = " ".join(expr for _, expr in dashboard_queries())
    for metric in (
        "keyroute_requests_total",  # traffic and errors by provider and class
        "keyroute_operator_chain_fallback_active",  # fallback state per chain
        "keyroute_operator_credential_state",  # credential states per pool
        "keyroute_tokens_total",  # tokens per credential
        "keyroute_sidecar_overhead_seconds_bucket",
        "keyroute_reports_total",  # reporter health
        "keyroute_operator_reconciles_total",
        "keyroute_webhook_admissions_total",
    ):
        assert metric in text, metric
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_configmap_is_labelled_for_grafanas_sidecar(helm: HelmRunner) -> None:
    objs = rendered(helm, "certmanager-container")
    cm = one(objs, "ConfigMap", "kr-keyroute-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(cm["data"]["keyroute.json"]) == dashboard()
    assert not [o for o in of_kind(rendered(helm, "default"), "ConfigMap") if "dashboard" in o["metadata"]["name"]]
    assert "dashboards" in SCENARIOS["certmanager-container"]["metrics"]


def test_alerts_without_a_runbook_url_are_refused_with_what_to_set(helm: HelmRunner) -> None:
    out = helm.run("template", "r", "--namespace", "ns", values={"metrics": {"prometheusRule": {"enabled": True}}})
    assert out.returncode != 0
    assert "metrics.prometheusRule.runbookURL: set it to where docs/runbook.md is published" in out.stderr
