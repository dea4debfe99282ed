"""The shipped alert rules and Grafana dashboard (deploy/k8s/monitoring), read for tests.

Used by tests/deploy/test_monitoring.py (syntax, promtool, schema, the playbook) and
tests/http/test_operations.py (every metric they name, against a live /metrics).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

MONITORING = Path("deploy/k8s/monitoring")
# Labels Prometheus attaches when scraping (PodMonitor: namespace, pod, track, ...), not
# the service: the rules may group by them.
SCRAPE_LABELS = {"namespace", "pod", "track", "job", "instance", "container", "endpoint_"}
# Grafana's variables, as a plain PromQL value for promtool.
GRAFANA_VARS = {"$__rate_interval": "5m", "$namespace": ".*", "$track": ".*"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


def rules(root: Path) -> list[dict[str, Any]]:
    """The PrometheusRule's rule groups (its spec is a Prometheus rules file)."""
    doc = yaml.safe_load((root / MONITORING / "prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    return list(doc["spec"]["groups"])


def alerts(root: Path) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rules(root) for r in g["rules"] if "alert" in r}


def dashboard(root: Path) -> dict[str, Any]:
    return dict(json.loads((root / MONITORING / "embedkit-dashboard.json").read_text()))


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries
    (``label_values(metric{...}, label)`` reduced to its selector)."""
    out = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {var['name']}: unexpected query {query!r}"
            out.append(match.group(1))
    return out


def to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names in its matcher) for every series selector in ``expr``."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings can hold anything
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\boffset\s+\w+", "", expr)
    found = []
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", expr):
        name, matcher, call = m.groups()
        if call or name.lower() in _KEYWORDS:
            continue  # a function or an operator
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matcher or ""))
        found.append((name, labels))
    return found


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}
