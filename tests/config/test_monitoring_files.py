"""The chart's monitoring files: the Prometheus rules (``helm/alerts/portal-rules.yaml``) and the
Grafana dashboard (``helm/dashboards/portal.json``) use only metric families and labels that
``/metrics`` exposes, and their two templates render them (``helm-python-sdk``, no helm binary),
only when enabled."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from tests.live import REPO

HELM = REPO / "helm"
RULES = HELM / "alerts" / "portal-rules.yaml"
DASHBOARD = HELM / "dashboards" / "portal.json"
# Label names of the portal's families (common brief, "Shared names"); django-prometheus' too.
LABELS = {
    "portal_model_call_seconds": {"tier", "endpoint", "le"},
    "portal_model_ttft_seconds": {"tier", "endpoint", "le"},
    "portal_model_tokens": {"tier", "kind"},
    "portal_turns": {"status", "error_code"},
    "portal_queue_depth": {"queue", "broker"},
    "portal_ingestion_documents": {"status"},
    "portal_budget_blocks": {"code"},
    "portal_tool_calls": {"tool", "status"},
    "portal_approvals_pending": set(),
    "portal_approvals_oldest_pending_seconds": set(),
    "portal_model_endpoint_up": {"endpoint", "tier"},
    "django_http_requests_total_by_view_transport_method": {"view", "transport", "method"},
}
# PromQL words that look like metric names in the expressions below.
PROMQL_WORDS = {"sum", "max", "min", "by", "rate", "increase", "deriv", "absent", "and", "or", "unless",
                "histogram_quantile", "clamp_min", "le", "on", "without", "query", "first", "value"}


def _exposed_series_names() -> dict[str, str]:
    """Series names ``/metrics`` can expose, mapped to their family (``_total`` of counters,
    ``_bucket``/``_count``/``_sum`` of histograms), including families with no sample yet."""
    response = Client(HTTP_HOST="10.0.0.1").get("/metrics")
    assert response.status_code == 200
    names: dict[str, str] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        for suffix in suffixes:
            names[family.name + suffix] = family.name
    return names


def _metric_names(expr: str) -> set[str]:
    """Identifiers of ``expr`` that name series: not PromQL functions, keywords or label names."""
    without_matchers = re.sub(r"\{[^}]*\}", "{}", expr)
    without_groupings = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_matchers)
    without_strings = re.sub(r'"[^"]*"', "", without_groupings)
    words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", without_strings))
    calls = set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*\(", without_strings))
    return {w for w in words - calls - PROMQL_WORDS if "_" in w and not re.fullmatch(r"\d+[smhd]", w)}


def _labels_used(expr: str) -> set[str]:
    used: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"([a-z_][a-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used |= {label.strip() for label in grouping.split(",") if label.strip()}
    return used


def _check(expr: str, exposed: dict[str, str]) -> None:
    names = _metric_names(expr)
    assert names, f"no metric in {expr!r}"
    unknown = names - set(exposed)
    assert not unknown, f"{expr!r} uses {unknown}, which /metrics does not expose"
    allowed = set().union(*(LABELS[exposed[name]] for name in names))
    assert _labels_used(expr) <= allowed, f"{expr!r} uses labels {_labels_used(expr) - allowed}"


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


@pytest.mark.django_db
def test_every_alert_expression_uses_exposed_families_and_their_labels() -> None:
    exposed = _exposed_series_names()
    rules = _rules()
    assert {rule["alert"] for rule in rules} >= {"PortalNoModelEndpointHealthy", "PortalTurnFailureRateHigh",
                                                 "PortalQueueDepthGrowing", "PortalApprovalWaitingOverAnHour"}
    for rule in rules:
        _check(rule["expr"], exposed)
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]


def test_the_rules_say_what_they_promise() -> None:
    by_name = {rule["alert"]: rule for rule in _rules()}
    assert "portal_model_endpoint_up" in by_name["PortalNoModelEndpointHealthy"]["expr"]
    assert "portal_turns_total" in by_name["PortalTurnFailureRateHigh"]["expr"]
    assert "deriv(portal_queue_depth" in by_name["PortalQueueDepthGrowing"]["expr"]
    assert re.search(r"portal_approvals_oldest_pending_seconds\)\s*>\s*3600",
                     by_name["PortalApprovalWaitingOverAnHour"]["expr"])


@pytest.mark.django_db
def test_every_dashboard_query_uses_exposed_families_and_their_labels() -> None:
    exposed = _exposed_series_names()
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    families: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"].strip("${}") in variables
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            _check(target["expr"], exposed)
            families |= {exposed[name] for name in _metric_names(target["expr"])}
    assert {f for f in LABELS if f.startswith("portal_")} <= families  # every portal family is charted


def _monitoring_chart(tmp_path: Path, values: str) -> Any:
    """A chart of the helpers and the two monitoring templates with their files (the whole chart
    needs production values that are not these tests' business)."""
    from helm_python.chart import Chart

    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    shutil.copy(HELM / "Chart.yaml", chart / "Chart.yaml")
    for template in ("_helpers.tpl", "prometheusrule.yaml", "grafana-dashboard.yaml"):
        shutil.copy(HELM / "templates" / template, chart / "templates" / template)
    shutil.copytree(HELM / "alerts", chart / "alerts")
    shutil.copytree(HELM / "dashboards", chart / "dashboards")
    (chart / "values.yaml").write_text(values, encoding="utf-8")
    return Chart.load(chart)


def _manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def test_the_templates_render_the_rules_and_the_dashboard_when_enabled(tmp_path: Path) -> None:
    chart = _monitoring_chart(tmp_path, "monitoring:\n  prometheusRule:\n    enabled: false\n"
                                        "  grafanaDashboard:\n    enabled: false\n")
    assert _manifests(chart.render(None, name="rel", namespace="ops")) == []

    rendered = chart.render({"monitoring": {"prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
                                            "grafanaDashboard": {"enabled": True}}}, name="rel", namespace="ops")

    by_kind = {doc["kind"]: doc for doc in _manifests(rendered)}
    rule = by_kind["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == yaml.safe_load(RULES.read_text(encoding="utf-8"))
    config_map = by_kind["ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["portal.json"]) == json.loads(DASHBOARD.read_text(encoding="utf-8"))


def test_the_templates_render_nothing_without_monitoring_values(tmp_path: Path) -> None:
    chart = _monitoring_chart(tmp_path, "{}\n")
    assert _manifests(chart.render(None, name="rel", namespace="ops")) == []
