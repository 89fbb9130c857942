"""The alerts as Prometheus evaluates them: `promtool check rules` and `promtool test rules` on the rule
file extracted from the rendered chart, so that what is tested is what ships.

The unit tests themselves are tests/deploy/alerts/shelfmatch_test.yaml (promtool's own format); this
module renders the rules next to a copy of it and runs promtool, and checks that every alert the chart
can render has a case that fires and one that must not.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from consumer.metrics import LATENCY_BUCKETS
from tests.deploy.chart import CHART, PROMTOOL, ROOT, one, template, tool

PROMTOOL_TESTS = ROOT / "tests" / "deploy" / "alerts" / "shelfmatch_test.yaml"
# The configuration the promtool tests are written for: the monitoring example, with KEDA on so that
# the autoscaler alert renders too (its HPA is then keda-hpa-shop-shelfmatch).
RULES_VALUES = ("-f", str(CHART / "ci" / "monitoring-values.yaml"),
                "--set", "keda.enabled=true", "--set", "kafka.inputPartitions=4")


def rendered_groups(*extra: str) -> list[dict]:
    result = template(*RULES_VALUES, *extra)
    assert result.returncode == 0, result.stderr
    rule = one(tuple(d for d in yaml.safe_load_all(result.stdout) if d), "PrometheusRule")
    return rule["spec"]["groups"]


def promtool_test(tmp_path: Path, groups: list[dict]) -> subprocess.CompletedProcess[str]:
    """Write the groups as rules.yaml next to a copy of the promtool tests and run them."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    shutil.copy(PROMTOOL_TESTS, tmp_path / PROMTOOL_TESTS.name)
    return subprocess.run([tool(PROMTOOL), "test", "rules", PROMTOOL_TESTS.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rendered_rules(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rendered_groups()}, sort_keys=False))
    result = subprocess.run([tool(PROMTOOL), "check", "rules", "rules.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_unit_tests_pass_on_the_rendered_rules(tmp_path):
    result = promtool_test(tmp_path, rendered_groups())
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_catch_a_dead_letter_alert_without_a_minimum_of_traffic(tmp_path):
    """The promtool tests can fail: without the minimum one bad photo in a quiet window pages."""
    result = promtool_test(tmp_path, rendered_groups("--set", "prometheusRule.alerts.deadLetterRate.minPhotos=0"))
    assert result.returncode != 0
    assert "one bad photo in a quiet window" in result.stdout + result.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_does_not():
    alerts = {r["alert"] for g in rendered_groups() for r in g["rules"]}
    cases = [c for t in yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert alerts - fires == set(), "alerts with no case that fires"
    assert alerts - quiet == set(), "alerts with no case that stays quiet"
    assert (fires | quiet) <= alerts, "cases for alerts the chart does not render"


def test_the_autoscaler_alert_follows_the_autoscaler():
    def hpa_names(*sets: str) -> list[str]:
        args = ["-f", str(CHART / "ci" / "monitoring-values.yaml"), *(a for s in sets for a in ("--set", s))]
        result = template(*args)
        assert result.returncode == 0, result.stderr
        groups = one(tuple(d for d in yaml.safe_load_all(result.stdout) if d), "PrometheusRule")["spec"]["groups"]
        return [r["expr"] for g in groups for r in g["rules"] if r["alert"] == "ShelfmatchAutoscalerAtMaxReplicas"]

    assert hpa_names() == []  # a fixed replica count has no maximum to reach
    (keda,) = hpa_names("keda.enabled=true", "kafka.inputPartitions=4")
    (hpa,) = hpa_names("hpa.enabled=true", "kafka.inputPartitions=4")
    assert 'horizontalpodautoscaler="keda-hpa-shop-shelfmatch"' in keda
    assert 'horizontalpodautoscaler="shop-shelfmatch"' in hpa


def test_latency_buckets_reach_every_latency_an_alert_may_name():
    """histogram_quantile never reads above the top finite bucket, so an alert above it cannot fire."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    latency = schema["properties"]["prometheusRule"]["properties"]["alerts"]["properties"]["latencyP99"]
    assert latency["properties"]["thresholdSeconds"]["exclusiveMaximum"] == LATENCY_BUCKETS[-1]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    threshold = values["prometheusRule"]["alerts"]["latencyP99"]["thresholdSeconds"]
    assert threshold < LATENCY_BUCKETS[-1]
    # A backlog drained after an outage as long as the lag alert's hold (15 minutes) is measured, not capped.
    assert LATENCY_BUCKETS[-1] >= 3600
    result = template("--set", "prometheusRule.enabled=true",
                      "--set", f"prometheusRule.alerts.latencyP99.thresholdSeconds={LATENCY_BUCKETS[-1]}")
    assert result.returncode != 0 and "thresholdSeconds" in result.stderr


@pytest.mark.parametrize("name", ["kube_pod_container_status_restarts_total", "kube_pod_status_phase"])
def test_kube_state_metrics_alerts_select_only_this_releases_pods(name):
    exprs = [r["expr"] for g in rendered_groups() for r in g["rules"] if name in r["expr"]]
    assert exprs
    for expr in exprs:
        assert 'namespace="retail", pod=~"shop-shelfmatch-[a-z0-9]+-[a-z0-9]+"' in expr, expr
