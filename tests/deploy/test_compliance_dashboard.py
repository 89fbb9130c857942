"""The compliance dashboard selects only series the service really exports, like the operations one."""
from __future__ import annotations

import json
import re

import pytest

from tests.deploy.chart import CHART, ROOT, of_kind, render
from tests.deploy.promql import TARGET_LABELS, exported
from tests.deploy.test_dashboard import _exprs, _unknown, check_well_formed

DASHBOARD = ROOT / "deploy" / "grafana" / "shelfmatch-compliance.json"
CHART_DASHBOARD = CHART / "dashboards" / "shelfmatch-compliance.json"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def known() -> tuple[set[str], set[str]]:
    metrics, labels = exported()
    return metrics, labels | TARGET_LABELS


def test_the_chart_copy_is_byte_identical_to_the_source():
    assert CHART_DASHBOARD.read_bytes() == DASHBOARD.read_bytes(), "run `make chart-sync`"


def test_the_dashboard_configmap_carries_both_dashboards():
    docs = render("monitoring-values.yaml")
    (configmap,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert json.loads(configmap["data"]["shelfmatch-compliance.json"]) == json.loads(DASHBOARD.read_text())
    assert "shelfmatch.json" in configmap["data"]


def test_panel_queries_use_only_exported_metrics_and_labels(dashboard, known):
    problems = _unknown(_exprs(dashboard), known)
    assert not problems, "\n".join(problems)


def test_status_values_in_queries_are_the_statuses_events_carry(dashboard):
    from consumer.messages import FACING_STATUSES

    used = {v for _, expr in _exprs(dashboard) for v in re.findall(r'status!?="([^"]+)"', expr)}
    assert used and used <= set(FACING_STATUSES)


@pytest.mark.parametrize(("subject", "pattern"), [
    ("facings by status", r"sum by \(status\) \(rate\(shelfmatch_facings_total"),
    ("compliance score", r'status="ok".*/ clamp_min\(.*status="unknown"'),
    ("planogram rejections by reason", r"sum by \(reason\) \(increase\(shelfmatch_planogram_rejections_total"),
    ("cameras with a planogram", r"shelfmatch_planograms\{"),
    ("frames refused", r"bad-boxes\|bad-region\|frame-too-small"),
])
def test_the_dashboard_has_a_panel_for(dashboard, subject, pattern):
    assert any(re.search(pattern, expr) for _, expr in _exprs(dashboard)), subject


def test_panels_are_well_formed(dashboard):
    check_well_formed(dashboard, uid="shelfmatch-compliance")
