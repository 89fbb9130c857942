"""Which metric and label names a PromQL expression uses, and which ones the service exports.

Dashboards and alerts are only useful if every series they select exists; these helpers let the
tests compare the two sets. The PromQL reading is deliberately small: it understands selectors,
ranges, aggregation clauses and function calls, which is all the chart and dashboard use.
"""
from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, generate_latest

from consumer.metrics import Metrics

# Labels that Prometheus adds to every scraped series (ServiceMonitor target labels) and `le`.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "service", "endpoint", "le"}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
            "bool", "offset", "inf", "nan"}
# The only series not exported by the service that the dashboard and the alerts may select, and who
# exports them: what the service cannot say about itself (replicas, restarts, Pending pods, the
# autoscaler, GPU utilisation). Each is named here with the labels used, so a typo still fails.
EXTERNAL_SERIES = {
    "kube_deployment_spec_replicas": "kube-state-metrics",
    "kube_deployment_status_replicas_ready": "kube-state-metrics",
    "kube_pod_container_status_restarts_total": "kube-state-metrics",
    "kube_pod_status_phase": "kube-state-metrics",
    "kube_horizontalpodautoscaler_status_current_replicas": "kube-state-metrics",
    "kube_horizontalpodautoscaler_spec_max_replicas": "kube-state-metrics",
    "DCGM_FI_DEV_GPU_UTIL": "dcgm-exporter",
}
EXTERNAL_LABELS = {"deployment", "phase", "horizontalpodautoscaler"}

# Series names per `# TYPE` line (prometheus_client writes counters with their _total, and the
# _created series as gauges of their own).
SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count"), "info": ("",), "unknown": ("",)}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?")


def exported() -> tuple[set[str], set[str]]:
    """(series names, label names) that a fresh service exposes on /metrics.

    Names come from the exposition text (`# TYPE` lines, so labelled metrics without children
    count too, with the suffixes their type adds); label names from the metric objects.
    """
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    names: set[str] = set()
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.update(name + suffix for suffix in SUFFIXES[kind])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    labels = {label for collector in vars(metrics).values() for label in getattr(collector, "_labelnames", ())}
    return names, labels


def usage(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) used by one PromQL expression."""
    text = _STRING.sub('""', expr)
    labels = {m for sel in _SELECTOR.findall(text) for m in _MATCHER.findall(sel)}
    labels |= {name.strip() for clause in _CLAUSE.findall(text) for name in clause.split(",") if name.strip()}
    text = _CLAUSE.sub(" ", _RANGE.sub(" ", _SELECTOR.sub(" ", text)))
    metrics = {name for name, call in _IDENT.findall(text) if not call and name.lower() not in KEYWORDS}
    return metrics, labels


def grafana_query_usage(query: str) -> tuple[set[str], set[str]]:
    """Like usage(), for Grafana template queries such as label_values(metric{...}, label)."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", query)
    if match:
        metrics, labels = usage(match.group(1))
        return metrics, labels | {match.group(2)}
    return usage(query)
