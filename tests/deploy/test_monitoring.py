"""The alerts and dashboard that ship (deploy/k8s/monitoring): valid, behaving, documented.

- promtool (scripts/promtool: Debian's `prometheus` package unpacked on first use) checks
  the rules' syntax and runs tests/deploy/alert-scenarios.yaml: each alert fires on the
  symptom it exists for and stays quiet on a healthy (or deliberately excluded) case.
  Where no promtool can be had the promtool tests skip and say why; the schema checks
  below still run.
- The kustomization renders; its ConfigMap passes strict Kubernetes validation; the
  PodMonitor selects the Deployment's pods on a port they have.
- Every alert names a playbook section (runbook_url) whose text names the alert back.
- The dashboard's panels each query something, through the chosen data source; every
  query passes promtool's parser.
Whether the metrics they name exist is checked against a live server in
tests/http/test_operations.py.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from tests import monitoring
from tests.deploy.test_manifests import K8S_VERSIONS, of_kind, render

SEVERITIES = {"critical", "warning"}


@pytest.fixture(scope="module")
def root(pytestconfig: pytest.Config) -> Path:
    return pytestconfig.rootpath


def promtool(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(root / "scripts" / "promtool"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode == 3:
        pytest.skip(f"no promtool: {done.stderr.strip()}")
    return done


def write_rules(tmp_path: Path, groups: list[dict[str, Any]]) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


# --- the rules ------------------------------------------------------------------------------


def test_rules_pass_promtool_check(root: Path, tmp_path: Path) -> None:
    path = write_rules(tmp_path, monitoring.rules(root))
    done = promtool(root, "check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(monitoring.alerts(root))} rules found" in done.stdout


def test_promtool_check_catches_a_broken_rule(root: Path, tmp_path: Path) -> None:
    groups = copy.deepcopy(monitoring.rules(root))
    groups[0]["rules"][0]["expr"] = "sum by (namespace (rate(x[5m]))"
    done = promtool(root, "check", "rules", str(write_rules(tmp_path, groups)))
    assert done.returncode != 0


def scenarios(root: Path, tmp_path: Path, groups: list[dict[str, Any]]) -> Path:
    """alert-scenarios.yaml beside the rules, each expected alert's annotations filled in
    from its rule."""
    write_rules(tmp_path, groups)
    annotations = {r["alert"]: r["annotations"] for g in groups for r in g["rules"]}
    tests = yaml.safe_load((root / "tests" / "deploy" / "alert-scenarios.yaml").read_text())
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            for alert in check["exp_alerts"]:
                alert["exp_annotations"] = annotations[check["alertname"]]
    path = tmp_path / "scenarios.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    return path


def test_every_alert_fires_on_its_symptom_and_not_when_healthy(root: Path, tmp_path: Path) -> None:
    path = scenarios(root, tmp_path, monitoring.rules(root))
    done = promtool(root, "test", "rules", str(path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    cases = yaml.safe_load(path.read_text())["tests"]
    fired = {c["alertname"] for t in cases for c in t["alert_rule_test"] if c["exp_alerts"]}
    assert fired == set(monitoring.alerts(root)), "alerts without a firing scenario"


def test_scenarios_catch_a_wrong_threshold(root: Path, tmp_path: Path) -> None:
    groups = copy.deepcopy(monitoring.rules(root))
    rule = next(r for g in groups for r in g["rules"] if r["alert"] == "EmbedkitHighErrorRate")
    rule["expr"] = rule["expr"].replace("> 0.01", "> 0.5")
    done = promtool(root, "test", "rules", str(scenarios(root, tmp_path, groups)))
    assert done.returncode != 0 and "EmbedkitHighErrorRate" in done.stdout + done.stderr


def test_every_alert_has_severity_summary_and_runbook(root: Path) -> None:
    for name, rule in monitoring.alerts(root).items():
        assert re.fullmatch(r"Embedkit[A-Z]\w+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        assert "for" in rule, f"{name}: say how long (0m included) the symptom must last"


def _sections(playbook: str) -> dict[str, str]:
    """GitHub anchor of each `## ` heading → that section's text."""
    out: dict[str, str] = {}
    for part in re.split(r"^## ", playbook, flags=re.M)[1:]:
        heading, _, body = part.partition("\n")
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out[anchor] = body
    return out


def test_each_alert_is_documented_in_the_section_its_runbook_names(root: Path) -> None:
    sections = _sections((root / "docs" / "playbook.md").read_text())
    for name, rule in monitoring.alerts(root).items():
        doc, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert doc == "docs/playbook.md", name
        assert anchor in sections, f"{name}: no section #{anchor} in docs/playbook.md"
        assert f"`{name}`" in sections[anchor], f"{name}: not named in playbook #{anchor}"


# --- the kustomization ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(root: Path) -> list[dict[str, Any]]:
    return render(root / "deploy" / "k8s" / "monitoring")


def test_monitoring_renders_rule_monitor_and_dashboard(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == ["ConfigMap", "PodMonitor", "PrometheusRule"]
    for doc in rendered:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["kind"]
            continue  # CRDs: no schema in kubernetes-validate; promtool checks the rules
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    (board,) = of_kind(rendered, "ConfigMap")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_pod_monitor_scrapes_the_deployments_metrics_port(
    rendered: list[dict[str, Any]], root: Path
) -> None:
    (monitor,) = of_kind(rendered, "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    for overlay in ("cpu", "gpu", "canary"):
        for dep in of_kind(render(root / "deploy" / "k8s" / "overlays" / overlay), "Deployment"):
            pod = dep["spec"]["template"]
            assert selector.items() <= pod["metadata"]["labels"].items(), overlay
            ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
            assert endpoint["port"] in ports, overlay


# --- the dashboard ----------------------------------------------------------------------------


def test_dashboard_panels_query_through_the_chosen_datasource(root: Path) -> None:
    board = monitoring.dashboard(root)
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    assert board["uid"] == "embedkit"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for p in graphs:
        assert p["title"] and p["targets"], p["id"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and monitoring.metric_names(t["expr"]), p["title"]


def test_dashboard_queries_pass_promtool(root: Path, tmp_path: Path) -> None:
    """Each query as a recording rule: promtool parses it as Prometheus would."""
    queries = monitoring.dashboard_queries(monitoring.dashboard(root))
    records = [
        {"record": f"dashboard:query_{i}", "expr": monitoring.to_promql(q)}
        for i, q in enumerate(queries)
    ]
    path = write_rules(tmp_path, [{"name": "dashboard", "rules": records}])
    done = promtool(root, "check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (pod, le) (rate(a_total{x="{b}", y=~"c|d"}[5m])) / on (pod) '
        "histogram_quantile(0.95, b_bucket) > 1 and c offset 15m or vector(0)"
    )
    assert monitoring.selectors(expr) == [
        ("a_total", {"x", "y"}),
        ("b_bucket", set()),
        ("c", set()),
    ]


def test_scripts_promtool_is_executable(root: Path) -> None:
    assert shutil.which(str(root / "scripts" / "promtool"))
