"""The conversion contract: each check passes on the real export and fails when it should."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedkit.core.errors import ArtifactError
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact, finalize
from embedkit.quality import contract
from embedkit.runtime.engine import Engine

CPU = Settings(providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def engine(fp32_artifact: Artifact) -> Engine:
    return Engine(fp32_artifact, CPU)


def test_operator_inventory(fp32_artifact: Artifact) -> None:
    section = contract.check_operators(fp32_artifact, CPU)
    assert section["passed"] and section["cpu_session"] == "ok"
    assert section["opsets"]["ai.onnx"] == fp32_artifact.manifest.opset
    assert "ai.onnx::MatMul" in section["ops"]
    assert set(section["gpu_unsupported_ops"]) == {
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
    }
    assert section["gpu_unsupported_ops"]["CUDAExecutionProvider"] == []


def test_operator_check_fails_on_a_broken_graph(artifact_copy: Path) -> None:
    (artifact_copy / "model.onnx").write_bytes(b"not an onnx graph")
    broken = finalize(
        artifact_copy, Artifact.read_manifest(artifact_copy).model_dump(exclude={"files"})
    )
    with pytest.raises(ArtifactError, match=r"model\.onnx is not an ONNX graph") as info:
        contract.check_operators(broken, CPU)
    assert "\n" not in str(info.value)


def test_version_ranges() -> None:
    assert contract._version_covered(["14+", "13", "[7, 12]"], 18)
    assert contract._version_covered(["[7, 12]"], 9)
    assert not contract._version_covered(["[7, 12]"], 13)
    assert contract._version_covered(["11"], 11) and not contract._version_covered(["11"], 12)


def test_shape_matrix_small(engine: Engine) -> None:
    section = contract.check_shapes(engine, batches=(1, 7))
    assert section["passed"]
    assert {c["seq_len"] for c in section["cells"]} >= {
        1,
        2,
        127,
        128,
        129,
        256,
        ">256 (truncated)",
    }


def test_shape_matrix_runs_each_graph_shape_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cells are the runs the engine plans; a shape an earlier cell ran is not run again."""
    ran: list[tuple[int, ...]] = []
    real_run = engine.runner.run

    def counted(ids: np.ndarray, *rest: Any) -> np.ndarray:
        ran.append(ids.shape)
        return real_run(ids, *rest)

    monkeypatch.setattr(engine.runner, "run", counted)
    section = contract.check_shapes(engine, batches=(32, 128))
    assert section["passed"]
    cells = {(c["batch"], c["seq_len"]): c for c in section["cells"]}
    budget = engine.settings.max_batch_tokens
    assert cells[128, 256]["runs"] == cells[32, 256]["runs"] == [[budget // 256, 256]]
    assert cells[128, 1]["runs"] == [[engine.settings.max_sub_batch_size, 1]]
    matrix = ran[:-1]  # the last run is the truncated overlong cell
    assert (
        len(matrix)
        == len(set(matrix))
        == len({tuple(r) for c in section["cells"][:-1] for r in c["runs"]})
    )


def test_batch_invariance(engine: Engine) -> None:
    texts = ["short", "a much longer sentence " * 12, "", "中文", "mid length text here"]
    section = contract.check_batch_invariance(engine, texts)
    assert section["passed"], section


def test_parity_passes_on_every_segment(engine: Engine, reference) -> None:
    segments = contract.parity_segments("test", limit=40)
    assert any(k.startswith("sts/") for k in segments) and "edge/long_256" in segments
    report = contract.check_parity(engine, reference, segments)
    assert report["passed"], {k: v for k, v in report["segments"].items() if not v["passed"]}
    assert report["overall"]["min_cosine"] >= contract.MIN_COSINE


def test_parity_catches_a_wrong_manifest(artifact_copy: Path, reference) -> None:
    # Same graph, but the manifest forgets to normalise: vectors drift from the reference.
    fields = Artifact.read_manifest(artifact_copy).model_dump(exclude={"files"})
    fields["embedding"]["normalize"] = False
    wrong = finalize(artifact_copy, fields)
    report = contract.check_parity(Engine(wrong, CPU), reference, {"sample": ["one text", "two"]})
    assert not report["passed"]
    assert report["segments"]["sample"]["max_abs_diff"] > contract.MAX_ABS_DIFF


def test_compare_statistics() -> None:
    a = np.eye(3, dtype=np.float32)
    stats = contract.compare(a, a)
    assert stats["min_cosine"] == pytest.approx(1.0) and stats["max_abs_diff"] == 0.0
    b = a.copy()
    b[1] = [0, 0, 1]
    assert contract.compare(a, b)["worst_index"] == 1
