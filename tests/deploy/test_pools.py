"""Pools that coexist: cpu and gpu in one namespace, the mixed composition only with a measured
parity verdict, ISA-bound variants pinned to their level's nodes, the canary's own Service.

Rendered with ``kubectl kustomize`` and checked with the schemas and invariant checks of
tests/deploy/test_manifests.py. The GPU check reports fed to the mixed check are written
here (no GPU on these machines): a real CPU rehearsal report is refused in
tests/test_gpucheck.py.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from tests.deploy.test_manifests import (
    COMMON_CHECKS,
    K8S_VERSIONS,
    TRACK,
    Doc,
    check_canary,
    check_cpu,
    check_gpu,
    ident,
    of_kind,
    problems_in,
    render,
    selects,
)
from tests.planted import plant, stamped
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.core.errors import InvalidInput
from embedkit.deploy import pools
from embedkit.model.artifact import Artifact
from embedkit.release.pipeline import attach_gpu_check

POOL = "embedkit.dev/pool"
TRAFFIC = "embedkit.dev/traffic"
runner = CliRunner()


@pytest.fixture()
def tree(pytestconfig: pytest.Config, tmp_path: Path) -> Path:
    """A private copy of deploy/k8s to generate patches into."""
    dest = tmp_path / "k8s"
    shutil.copytree(pytestconfig.rootpath / "deploy" / "k8s", dest)
    (dest / "overlays" / "mixed" / "parity-verdict.yaml").unlink(missing_ok=True)
    return dest


def pod_labels(dep: Doc) -> dict[str, str]:
    return dep["spec"]["template"]["metadata"]["labels"]


def selector(doc: Doc) -> dict[str, str]:
    spec = doc["spec"]["selector"]
    return spec.get("matchLabels", spec) if doc["kind"] != "Service" else spec


def selected(doc: Doc, docs: list[Doc]) -> set[str]:
    """Names of the Deployments whose pods ``doc`` (a Service or PDB) selects."""
    return {
        d["metadata"]["name"]
        for d in of_kind(docs, "Deployment")
        if selects(selector(doc), pod_labels(d))
    }


def strictly_valid(docs: list[Doc]) -> None:
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


# --- cpu and gpu in one namespace ---------------------------------------------------------


def test_cpu_and_gpu_pools_render_without_collisions(tree: Path) -> None:
    cpu, gpu = render(tree / "overlays" / "cpu"), render(tree / "overlays" / "gpu")
    canary = render(tree / "overlays" / "canary")
    together = cpu + gpu + canary
    ids = [(d["kind"], d["metadata"]["name"]) for d in together]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    pools_of = {d["metadata"]["name"]: pod_labels(d)[POOL] for d in of_kind(together, "Deployment")}
    assert pools_of == {"embedkit": "cpu", "embedkit-gpu": "gpu", "embedkit-canary": "cpu"}
    for docs, pool in ((cpu, "cpu"), (gpu, "gpu")):
        assert {d["metadata"]["labels"][POOL] for d in docs} == {pool}
        kinds = {d["kind"] for d in docs}
        assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
        for doc in of_kind(docs, "Service") + of_kind(docs, "PodDisruptionBudget"):
            # Judged against every Deployment of the namespace: only its own pool's.
            reach = {pools_of[name] for name in selected(doc, together)}
            assert reach == {pool}, f"{ident(doc)} selects pools {reach}"
        for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
            target = hpa["spec"]["scaleTargetRef"]["name"]
            assert pools_of[target] == pool, f"{ident(hpa)} scales {target}"
    # Each pool still passes every invariant as deployed beside the other.
    assert problems_in(cpu, (*COMMON_CHECKS, check_cpu)) == []
    assert problems_in(gpu, (*COMMON_CHECKS, check_gpu)) == []


def test_canary_takes_no_user_traffic_until_it_joins(tree: Path) -> None:
    cpu = render(tree / "overlays" / "cpu")
    canary = render(tree / "overlays" / "canary")
    joined = render(tree / "overlays" / "canary-join")
    stable_service = next(s for s in of_kind(cpu, "Service") if s["metadata"]["name"] == "embedkit")
    assert selected(stable_service, cpu + canary) == {"embedkit"}
    (own,) = of_kind(canary, "Service")
    assert selected(own, cpu + canary) == {"embedkit-canary"}
    # Step 3: the same objects (rollback deletes the same names), pods now behind `embedkit`.
    assert sorted(map(ident, joined)) == sorted(map(ident, canary))
    assert selected(stable_service, cpu + joined) == {"embedkit", "embedkit-canary"}
    assert problems_in(cpu + joined, (*COMMON_CHECKS, check_cpu, check_canary)) == []
    strictly_valid(joined)


# --- the mixed composition ------------------------------------------------------------------


PARITY = {"passed": True, "max_abs_diff": 3.1e-6, "min_cosine": 0.9999999}
CONTRACT = {"ok": True, "result": {"passed": True, "parity_vs_cpu": PARITY}}


def gpu_report(artifact: Artifact, **change: Any) -> dict[str, Any]:
    """A gpu-check.json as scripts/gpu-check writes it after a passing run on a GPU."""
    report: dict[str, Any] = {
        "status": "passed",
        "gpu": True,
        "artifacts": {"fp32": {"model_sha256": artifact.manifest.files["model.onnx"]}},
        "stages": {
            "environment": {"ok": True, "result": {"device": "NVIDIA H100 80GB HBM3"}},
            "contract cuda fp32": copy.deepcopy(CONTRACT),
            "contract tensorrt fp32": copy.deepcopy(CONTRACT),
        },
    }
    report.update(change)
    return report


def test_mixed_renders_only_with_a_measured_parity_verdict(
    tree: Path, artifact_copy: Path, tmp_path: Path
) -> None:
    mixed = tree / "overlays" / "mixed"
    with pytest.raises(pytest.fail.Exception, match=r"parity-verdict\.yaml"):
        render(mixed)  # no verdict file: kustomize refuses
    args = ["pools", "mixed", str(artifact_copy), "--k8s", str(tree)]
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "records no GPU check" in res.output, res.output

    art = Artifact.load(artifact_copy)
    refused = {
        "rehearsal": (gpu_report(art, status="no-gpu", gpu=False), "did not pass on a GPU"),
        "another model": (
            gpu_report(art, artifacts={"fp32": {"model_sha256": "0" * 64}}),
            "not this model's",
        ),
        "TensorRT never ran": (
            {**gpu_report(art), "stages": {"contract cuda fp32": CONTRACT}},
            "no fp32 contract on tensorrt",
        ),
    }
    for what, (report, reason) in refused.items():
        path = tmp_path / f"{what}.json"
        path.write_text(json.dumps(report))
        res = runner.invoke(app, [*args, "--gpu-check", str(path)])
        assert res.exit_code == 1 and reason in res.output, (what, res.output)
        assert not (mixed / "parity-verdict.yaml").exists()
    bad = gpu_report(art)
    bad["stages"]["contract cuda fp32"]["result"]["parity_vs_cpu"].update(
        passed=False, max_abs_diff=2e-3
    )
    assert "cuda: fp32 contract or parity" in pools.mixed_verdict(art, bad).summary()

    # Recorded with the release (a mismatching report is refused there too), then judged.
    good = tmp_path / "gpu-check.json"
    good.write_text(json.dumps(gpu_report(art)))
    with pytest.raises(InvalidInput, match="run the GPU check on this artifact"):
        attach_gpu_check(art, tmp_path / "another model.json")
    attach_gpu_check(art, good)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    docs = render(mixed)
    strictly_valid(docs)
    (service,) = docs
    assert "parity passed" in service["metadata"]["annotations"][pools.VERDICT_ANNOTATION]
    assert service["metadata"]["annotations"]["embedkit.dev/gpu-precision"] == "fp32"
    # Beside both pools: one more Service, reaching the stable pods of both, nothing else.
    fleet = render(tree / "overlays" / "cpu") + render(tree / "overlays" / "gpu")
    ids = [ident(d) for d in fleet + docs]
    assert len(ids) == len(set(ids))
    assert selected(service, fleet) == {"embedkit", "embedkit-gpu"}
    assert selected(service, render(tree / "overlays" / "canary")) == set()


# --- ISA affinity ------------------------------------------------------------------------------


def test_isa_bound_variant_gets_node_affinity_to_its_level(
    fp32_artifact: Artifact, artifact_copy: Path, tree: Path, tmp_path: Path
) -> None:
    variant = stamped(
        fp32_artifact,
        plant(fp32_artifact, "copy", tmp_path / "copy"),
        tmp_path / "int8",
        "index-compatible",
        isa="avx512-vnni",
    )
    res = runner.invoke(app, ["pools", "isa", str(variant.path), "--k8s", str(tree)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["pools", "isa", str(artifact_copy), "--overlay", "canary", "--k8s", str(tree)]
    )
    assert res.exit_code == 0, res.output

    def pod(docs: list[Doc], track: str) -> Doc:
        return next(d for d in of_kind(docs, "Deployment") if pod_labels(d)[TRACK] == track)

    cpu, canary = render(tree / "overlays" / "cpu"), render(tree / "overlays" / "canary")
    strictly_valid(cpu + canary)
    stable = pod(cpu, "stable")
    assert stable["metadata"]["annotations"][pools.ISA_LABEL] == "avx512-vnni"
    affinity = stable["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [
        {"key": pools.ISA_LABEL, "operator": "In", "values": ["avx512-vnni"]}
    ]
    # The fp32 candidate runs anywhere: its patch clears the affinity the cpu overlay set.
    candidate = pod(canary, "canary")
    assert candidate["metadata"]["annotations"][pools.ISA_LABEL] == "any"
    assert "affinity" not in candidate["spec"]["template"]["spec"]
    assert problems_in(cpu, (*COMMON_CHECKS, check_cpu)) == []
    with pytest.raises(InvalidInput, match="manifest format 1"):
        unbound = variant.manifest.quantization.model_copy(update={"measured_on": None})
        manifest = variant.manifest.model_copy(update={"quantization": unbound})
        pools.isa_level(Artifact(variant.path, manifest))
