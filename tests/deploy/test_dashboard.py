"""The Grafana dashboard and the Prometheus alerts select only series the service really exports."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.deploy.chart import CHART, ROOT, of_kind, one, render, template
from tests.deploy.promql import EXTERNAL_LABELS, EXTERNAL_SERIES, TARGET_LABELS, exported, grafana_query_usage, usage

DASHBOARD = ROOT / "deploy" / "grafana" / "shelfmatch.json"
CHART_DASHBOARD = CHART / "dashboards" / "shelfmatch.json"
OPERATIONS = ROOT / "docs" / "operations.md"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def known() -> tuple[set[str], set[str]]:
    """The service's series and labels, and the named external ones (tests/deploy/promql.py)."""
    metrics, labels = exported()
    return metrics | set(EXTERNAL_SERIES), labels | TARGET_LABELS | EXTERNAL_LABELS


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return out


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query."""
    return [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]


def _unknown(exprs, known, read=usage) -> list[str]:
    metrics, labels = known
    problems = []
    for where, expr in exprs:
        used_metrics, used_labels = read(expr)
        if not used_metrics:
            problems.append(f"{where}: selects no metric: {expr}")
        problems += [f"{where}: metric {m} is not exported" for m in sorted(used_metrics - metrics)]
        problems += [f"{where}: label {label} does not exist" for label in sorted(used_labels - labels)]
    return problems


def test_the_chart_copy_is_byte_identical_to_the_source():
    assert CHART_DASHBOARD.read_bytes() == DASHBOARD.read_bytes(), "run `make chart-sync`"


def test_the_dashboard_configmap_carries_the_dashboard():
    docs = render("monitoring-values.yaml")
    (configmap,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert json.loads(configmap["data"]["shelfmatch.json"]) == json.loads(DASHBOARD.read_text())


def test_panel_queries_use_only_exported_metrics_and_labels(dashboard, known):
    problems = _unknown(_exprs(dashboard), known)
    assert not problems, "\n".join(problems)


def test_template_variables_use_only_exported_metrics(dashboard, known):
    queries = [(v["name"], v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
               for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert queries
    problems = _unknown(queries, known, read=grafana_query_usage)
    assert not problems, "\n".join(problems)


def test_the_metric_check_catches_a_name_the_service_does_not_export(known):
    """The checks above can fail: a misspelt metric and a misspelt label are both reported."""
    exprs = [("typo", 'sum by (reasons) (rate(shelfmatch_dead_letter_total{job="x"}[5m]))')]
    assert _unknown(exprs, known) == ["typo: metric shelfmatch_dead_letter_total is not exported",
                                      "typo: label reasons does not exist"]


def test_the_metric_check_catches_a_series_that_is_not_on_the_external_list(known):
    exprs = [("node", 'sum(rate(node_cpu_seconds_total{namespace="x"}[5m]))')]
    assert _unknown(exprs, known) == ["node: metric node_cpu_seconds_total is not exported"]


def test_external_series_are_scoped_to_the_release(dashboard):
    """kube-state-metrics and dcgm-exporter series carry no job of ours: namespace and the
    Deployment's name (or its pods' names) select this release."""
    external = "|".join(EXTERNAL_SERIES)
    selector = re.compile(rf"(?:{external})\{{([^}}]*)\}}")
    found = [(where, m) for where, expr in _exprs(dashboard) for m in selector.findall(expr)]
    assert len(found) >= 4
    for where, selector in found:
        assert 'namespace="$namespace"' in selector, where
        assert 'deployment="$job"' in selector or 'pod=~"$job-[a-z0-9]+-[a-z0-9]+"' in selector, where


@pytest.mark.parametrize(("subject", "pattern"), [
    ("throughput", r"rate\(shelfmatch_photos_total"),
    ("end-to-end p50", r"histogram_quantile\(0\.5, .*shelfmatch_end_to_end_latency_seconds_bucket"),
    ("end-to-end p95", r"histogram_quantile\(0\.95, .*shelfmatch_end_to_end_latency_seconds_bucket"),
    ("end-to-end p99", r"histogram_quantile\(0\.99, .*shelfmatch_end_to_end_latency_seconds_bucket"),
    ("per-stage latency", r"by \(le, stage\) \(rate\(shelfmatch_stage_latency_seconds_bucket"),
    ("batch size", r"shelfmatch_batch_size_(sum|bucket)"),
    ("lag per partition", r"by \(topic, partition\) \(shelfmatch_consumer_lag_records"),
    ("dead letters by reason", r"sum by \(reason\) \(rate\(shelfmatch_dead_letters_total"),
    ("GPU memory", r"shelfmatch_gpu_memory_bytes"),
    ("GPU utilisation", r"DCGM_FI_DEV_GPU_UTIL"),
    ("desired replicas", r"kube_deployment_spec_replicas"),
    ("ready replicas", r"kube_deployment_status_replicas_ready"),
    ("container restarts", r"increase\(kube_pod_container_status_restarts_total"),
])
def test_the_dashboard_has_a_panel_for(dashboard, subject, pattern):
    assert any(re.search(pattern, expr) for _, expr in _exprs(dashboard)), subject


def test_panels_are_well_formed(dashboard):
    check_well_formed(dashboard, uid="shelfmatch")


def check_well_formed(dashboard: dict, *, uid: str) -> None:
    """Unique panel ids inside the 24-column grid; every query panel described, on the dashboard's
    datasource variable (its targets too); the dashboard's uid, and the datasource variable first."""
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]
    assert dashboard["uid"] == uid and dashboard["templating"]["list"][0]["type"] == "datasource"


# --- Alerts ------------------------------------------------------------------------------------

REQUIRED_ALERTS = {"ShelfmatchConsumerLagHigh", "ShelfmatchDeadLetterRateHigh", "ShelfmatchLatencyP99High",
                   "ShelfmatchNoEventsPublished", "ShelfmatchUnreadableBatch", "ShelfmatchPipelineStalled",
                   "ShelfmatchPublishRetries", "ShelfmatchCommitFailures", "ShelfmatchCrashLooping",
                   "ShelfmatchPodPending"}


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    rule = one(render("monitoring-values.yaml"), "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_the_required_alerts_exist(rules):
    assert {r["alert"] for r in rules} >= REQUIRED_ALERTS


def test_alert_expressions_use_only_exported_metrics_and_labels(rules, known):
    problems = _unknown([(r["alert"], r["expr"]) for r in rules], known)
    assert not problems, "\n".join(problems)


def test_alerts_are_scoped_to_the_release(rules):
    for rule in rules:
        for selector in re.findall(r"shelfmatch_\w+\{([^}]*)\}", rule["expr"]):
            assert 'namespace="retail"' in selector and 'job="shop-shelfmatch"' in selector, rule["alert"]


def test_every_alert_has_severity_summary_and_a_runbook_section(rules):
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in OPERATIONS.read_text().splitlines() if line.startswith("#")
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor in headings, f"{rule['alert']}: docs/operations.md has no section #{anchor}"


def test_alert_thresholds_come_from_values():
    docs = render("monitoring-values.yaml")
    assert "> 10000" in _rule(docs, "ShelfmatchConsumerLagHigh")["expr"]
    result = template("-f", str(CHART / "ci" / "monitoring-values.yaml"),
                      "--set", "prometheusRule.alerts.consumerLag.threshold=250",
                      "--set", "prometheusRule.alerts.latencyP99.enabled=false")
    assert result.returncode == 0, result.stderr
    docs = tuple(d for d in yaml.safe_load_all(result.stdout) if d)
    assert "> 250" in _rule(docs, "ShelfmatchConsumerLagHigh")["expr"]
    assert _rule(docs, "ShelfmatchLatencyP99High") is None


def _rule(docs, name):
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"] if r["alert"] == name]
    return rules[0] if rules else None


def _no_events_rule(*sets: str) -> dict:
    args = ["-f", str(CHART / "ci" / "monitoring-values.yaml")]
    for s in sets:
        args += ["--set", s]
    result = template(*args)
    assert result.returncode == 0, result.stderr
    return _rule(tuple(d for d in yaml.safe_load_all(result.stdout) if d), "ShelfmatchNoEventsPublished")


def test_no_events_alert_fires_on_a_stall_even_when_the_lag_gauge_is_frozen():
    # A stalled publish stops fetching, so the lag gauge keeps its last value (about 0 for a pod that
    # kept up): the alert must also look at readiness, which a stalled publish turns off.
    expr = _no_events_rule()["expr"]
    assert re.search(r"max by \(namespace\) \(shelfmatch_ready\{[^}]*\}\) == 0", expr), expr
    assert "absent(shelfmatch_ready" in expr and "[5m]" in expr


def test_no_events_alert_does_not_page_a_release_that_keda_scaled_to_zero():
    scaled_to_zero = _no_events_rule("keda.enabled=true", "kafka.inputPartitions=4", "keda.minReplicaCount=0")
    assert "absent(" not in scaled_to_zero["expr"]
    assert "absent(" in _no_events_rule("keda.enabled=true", "kafka.inputPartitions=4")["expr"]
    assert "[15m]" in _no_events_rule("prometheusRule.alerts.noEventsPublished.window=15m")["expr"]
