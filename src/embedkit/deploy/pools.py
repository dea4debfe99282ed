"""Serving pools on Kubernetes: what a release's records allow the manifests to compose.

Two pieces of ``deploy/k8s`` are generated from a release instead of written by hand,
because what they say must come from a measurement, never from a label:

* **ISA affinity** (:func:`isa_patch`): a gated variant (INT8, fused) holds only on the CPU
  ISA level its verdict was measured on — serving refuses it elsewhere
  (``serve.startup.refusal``) — so its pool's pods get a required node affinity to
  ``embedkit.dev/isa-level=<level>``; fp32 holds everywhere and gets none.
* **The mixed composition** (:func:`mixed_verdict`): the cpu and gpu pools behind one
  Service only when the GPU check (``scripts/gpu-check``, :mod:`embedkit_bench.gpucheck`)
  measured the GPU providers' vectors against the CPU provider's for *this* model
  (its model.onnx sha256) and *this* precision, and they passed.

``embedkit pools isa`` and ``embedkit pools mixed`` write the patches into the overlays;
without ``overlays/mixed/parity-verdict.yaml`` the mixed overlay does not render.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embedkit.core.errors import InvalidInput
from embedkit.model import toolchain
from embedkit.model.artifact import MODEL_FILE, Artifact

ISA_LABEL = "embedkit.dev/isa-level"  # node label the operator (or NFD) sets per ISA level
VERDICT_ANNOTATION = "embedkit.dev/parity-verdict"
GPU_CHECK_RECORD = "gpu_check"  # key in the manifest's records
# Providers the gpu overlay lists ahead of the CPU (strict: it never serves from the CPU);
# the verdict must cover each, since a pod serves from whichever attaches.
GPU_CONFIGS = ("tensorrt", "cuda")
TRT_PROVIDER = "TensorrtExecutionProvider"


# --- ISA affinity ------------------------------------------------------------------------


def isa_level(artifact: Artifact) -> str | None:
    """The ISA level ``artifact`` is bound to (its gate verdict's), None for fp32."""
    q = artifact.manifest.quantization
    if q.mode == "none":
        return None
    if q.measured_on is None:
        raise InvalidInput(
            f"{artifact.tag or artifact.path} ({q.mode}) records no ISA level its verdict was "
            "measured on (manifest format 1): serving refuses it everywhere; re-release it"
        )
    return q.measured_on.isa


def node_affinity(level: str) -> dict[str, Any]:
    """A pod's required node affinity to nodes labelled ``embedkit.dev/isa-level=level``."""
    term = {"key": ISA_LABEL, "operator": "In", "values": [level]}
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [term]}]
            }
        }
    }


def isa_patch(artifact: Artifact, deployment: str = "embedkit") -> dict[str, Any]:
    """A strategic-merge patch for ``deployment``: a required node affinity to the artifact's
    ISA level, or (fp32) none — ``affinity: null`` also clears one a parent overlay set."""
    level = isa_level(artifact)
    affinity = node_affinity(level) if level is not None else None
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment,
            "annotations": {ISA_LABEL: level or "any", "embedkit.dev/model": _label(artifact)},
        },
        "spec": {"template": {"spec": {"affinity": affinity}}},
    }


def release_job_patch(level: str, job: str = "embedkit-release") -> dict[str, Any]:
    """The release Job's patch (deploy/k8s/jobs/release): its pod runs only on nodes of
    ``level``, so the variants it gates — and the default it picks — are measured on the
    CPU that pool serves from (a build machine's ISA may not be the serving one)."""
    if level not in toolchain.ISA_LEVELS:
        raise InvalidInput(f"ISA level {level!r} is none of {', '.join(toolchain.ISA_LEVELS)}")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job, "annotations": {ISA_LABEL: level}},
        "spec": {"template": {"spec": {"affinity": node_affinity(level)}}},
    }


# --- the mixed composition ---------------------------------------------------------------


@dataclass
class MixedVerdict:
    """Whether the cpu and gpu pools may serve ``model`` behind one Service."""

    model: str
    precision: str
    allowed: bool
    reasons: list[str] = field(default_factory=list)  # why not (empty when allowed)
    device: str | None = None
    measured: dict[str, Any] = field(default_factory=dict)  # per GPU config: the figures

    def summary(self) -> str:
        if self.allowed:
            figures = "; ".join(
                f"{c} max|Δ| {m['max_abs_diff']:.2e}, min cos {m['min_cosine']:.6f}"
                for c, m in self.measured.items()
            )
            return (
                f"{self.model} {self.precision}: GPU ({self.device}) vs CPU parity passed — "
                f"{figures}"
            )
        return f"{self.model} {self.precision}: no mixed pools — " + "; ".join(self.reasons)


def served_gpu_precision(artifact: Artifact) -> str:
    """What the gpu overlay's pods compute in: TensorRT FP16 where the manifest records the
    gate's approval (``EMBEDKIT_TRT_FP16`` is on by default), else fp32."""
    return "trt-fp16" if artifact.manifest.approval("trt-fp16", TRT_PROVIDER) else "fp32"


def load_gpu_check(artifact: Artifact, report: Path | None = None) -> dict[str, Any]:
    """The GPU check report: ``report``, else the one recorded with the release."""
    if report is None:
        rel = artifact.manifest.records.get(GPU_CHECK_RECORD)
        if rel is None:
            raise InvalidInput(
                f"{_label(artifact)} records no GPU check: run scripts/gpu-check on it and "
                "record its gpu-check.json (embedkit.release.pipeline.attach_gpu_check), or pass "
                "--gpu-check FILE"
            )
        report = artifact.path / rel
    try:
        data = json.loads(Path(report).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read the GPU check report {report}: {exc}") from exc
    if not isinstance(data, dict) or "stages" not in data:
        raise InvalidInput(f"{report} is not a gpu-check.json (no stages)")
    return data


def mixed_verdict(artifact: Artifact, report: dict[str, Any]) -> MixedVerdict:
    """Judge a GPU check report for ``artifact`` at the precision the gpu pool serves.

    Allowed only if the report ran on a GPU, on this very model (model.onnx sha256), every
    provider the gpu overlay may serve from (TensorRT and CUDA) passed the fp32 contract
    including parity with the CPU provider's vectors (the fp32 tolerance), and — for
    TensorRT FP16 — the FP16 quality gate approved it in that run.
    """
    precision = served_gpu_precision(artifact)
    verdict = MixedVerdict(_label(artifact), precision, allowed=False)
    reasons = verdict.reasons
    if report.get("status") != "passed" or not report.get("gpu"):
        reasons.append(
            f"the GPU check did not pass on a GPU (status {report.get('status')!r}; a CPU "
            "rehearsal proves nothing about GPU vectors)"
        )
    if artifact.manifest.quantization.mode != "none":
        reasons.append(
            f"{artifact.manifest.variant} is a CPU variant; the gpu pool serves fp32 graphs "
            "only (mix an fp32 release)"
        )
    measured_sha = (report.get("artifacts") or {}).get("fp32", {}).get("model_sha256")
    want_sha = artifact.manifest.files.get(MODEL_FILE, "")
    if measured_sha != want_sha:
        reasons.append(
            f"the GPU check measured model.onnx sha256 {str(measured_sha)[:12]}…, not this "
            f"model's {want_sha[:12]}…"
        )
    environment = report.get("stages", {}).get("environment", {}).get("result") or {}
    verdict.device = environment.get("device")
    stages = report.get("stages", {})
    for config in GPU_CONFIGS:
        stage = stages.get(f"contract {config} fp32")
        if stage is None:
            reasons.append(f"the GPU check has no fp32 contract on {config} (not run there)")
            continue
        result = stage.get("result") or {}
        parity = result.get("parity_vs_cpu") or {}
        if not (stage.get("ok") and result.get("passed") and parity.get("passed")):
            reasons.append(
                f"{config}: fp32 contract or parity with the CPU provider failed "
                f"(max|Δ| {parity.get('max_abs_diff')}, min cos {parity.get('min_cosine')})"
            )
        else:
            verdict.measured[config] = {
                k: parity[k] for k in ("max_abs_diff", "min_cosine") if k in parity
            }
    if precision == "trt-fp16":
        stage = stages.get("gate tensorrt trt-fp16") or {}
        if not (stage.get("ok") and (stage.get("result") or {}).get("approved")):
            reasons.append("TensorRT FP16 serves, but the GPU check's FP16 gate did not approve it")
    verdict.allowed = not reasons
    return verdict


def verdict_patch(verdict: MixedVerdict, service: str = "embedkit-mixed") -> dict[str, Any]:
    """The mixed overlay's ``parity-verdict.yaml``: the verdict as annotations."""
    if not verdict.allowed:
        raise InvalidInput(verdict.summary())
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service,
            "annotations": {
                VERDICT_ANNOTATION: verdict.summary(),
                "embedkit.dev/model": verdict.model,
                "embedkit.dev/gpu-precision": verdict.precision,
            },
        },
    }


def write_patch(patch: dict[str, Any], path: Path, why: str) -> Path:
    """``patch`` as YAML at ``path`` under a one-line header saying what generated it."""
    path.write_text(f"# Generated by {why}; regenerate, do not edit.\n" + yaml.safe_dump(patch))
    return path


def _label(artifact: Artifact) -> str:
    return artifact.tag or f"{artifact.manifest.name} ({artifact.path})"
