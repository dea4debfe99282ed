"""scripts/gpu-check's CPU dry run: it must see that there is no GPU and say so, while
rehearsing every stage (real sessions, real contract and gate) on the CPU provider."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedkit.deploy import pools
from embedkit.runtime.session import CUDA, available_providers
from embedkit_bench import gpucheck, transfer

pytestmark = pytest.mark.skipif(
    CUDA in available_providers(), reason="the dry run needs a machine without CUDA"
)


@pytest.fixture(scope="module")
def fp16(fp32_artifact, cached_variant):
    return cached_variant(fp32_artifact, "fp16")


def test_dry_run_says_no_gpu_and_rehearses_every_stage(
    pytestconfig: pytest.Config,
    fp32_artifact,
    fp16,
    default_model_dir: Path,
    tmp_path: Path,
    system_run: None,
) -> None:
    out = tmp_path / "report"
    none = tmp_path / "nothing-sent"
    done = subprocess.run(
        [
            str(pytestconfig.rootpath / "scripts" / "gpu-check"),
            str(out),
            *("--fp32", str(fp32_artifact.path), "--fp16", str(fp16.path)),
            *("--reference", str(default_model_dir)),
            *("--transfer", str(none), "--payload", str(none), "--target", str(none)),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=900,
    )
    assert done.returncode == gpucheck.EXIT_NO_GPU, done.stderr[-2000:]
    assert "NO GPU" in done.stderr
    report = json.loads((out / "gpu-check.json").read_text())
    md = (out / "gpu-check.md").read_text()
    assert report["status"] == "no-gpu" and report["gpu"] is False
    assert md.startswith("# NO GPU: CPU rehearsal only")
    assert "CUDAExecutionProvider not offered" in report["why"]
    stages = report["stages"]
    assert set(stages) == {
        "environment",
        "load artifacts",
        "sessions",
        "contract cpu-rehearsal fp32",
        "gate cpu-rehearsal fp16-variant",
        "throughput",
    }
    assert all(s["ok"] for s in stages.values()), {n: s.get("error") for n, s in stages.items()}
    env = stages["environment"]["result"]
    assert "TensorRT not run" in env["tensorrt"]
    contract = stages["contract cpu-rehearsal fp32"]["result"]
    assert contract["passed"] and contract["parity_vs_torch"]["reference_device"] == "cpu"
    gate = stages["gate cpu-rehearsal fp16-variant"]["result"]
    assert gate["segments"] and all("cosine_p1" in s for s in gate["segments"])
    rows = stages["throughput"]["result"]
    assert set(rows) == {"sts b=1", "sts b=8", "long b=8"}
    assert set(rows["sts b=8"]) == {
        "cpu-rehearsal/fp32/iobinding-off",
        "cpu-rehearsal/fp32/iobinding-on",
        "cpu-rehearsal/fp16-variant",
    }
    assert all(r["texts_per_s"] > 0 for row in rows.values() for r in row.values())
    # What it measured, by content; a rehearsal never vouches for mixing CPU and GPU pools.
    assert report["artifacts"]["fp32"]["model_sha256"] == fp32_artifact.manifest.files["model.onnx"]
    verdict = pools.mixed_verdict(fp32_artifact, report)
    assert not verdict.allowed and "did not pass on a GPU" in verdict.summary()


def test_no_rehearsal_stops_after_saying_so(tmp_path: Path) -> None:
    args = gpucheck.parser().parse_args([str(tmp_path / "r"), "--no-rehearsal"])
    assert gpucheck.run(args) == gpucheck.EXIT_NO_GPU
    report = json.loads((tmp_path / "r" / "gpu-check.json").read_text())
    assert report["status"] == "no-gpu" and list(report["stages"]) == ["environment"]


def test_prepare_refuses_a_partial_transfer(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "x.whl").write_bytes(os.urandom(3000))
    transfer.split([str(tmp_path / "w")], tmp_path / "t", part_bytes=2048)
    next((tmp_path / "t").glob("gpu-part-02/gpu.tar.*")).unlink()
    code = gpucheck.main([str(tmp_path / "r"), "--transfer", str(tmp_path / "t")])
    assert code == gpucheck.EXIT_PREPARE and not (tmp_path / "r").exists()
