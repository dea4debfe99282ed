"""INT8 search tools: SmoothQuant pass, per-node sensitivity, committed ranking, mixed precision."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embedkit.core.errors import InvalidInput
from embedkit.model.artifact import Artifact
from embedkit.runtime.engine import Engine
from embedkit.variants import quantize, ranking, sensitivity, smoothquant, staging

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
FIRST_FFN_OUT = "/0/encoder/layer.0/output/dense/MatMul"
FIRST_QUERY = "/0/encoder/layer.0/attention/self/query/MatMul"


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return sensitivity.held_out_sentences(48)


def test_held_out_sentences_avoid_the_calibration_sample(data_dir: Path) -> None:
    calib = staging.read_calibration_sentences(data_dir / "stsbenchmark" / "sts-train.csv", 512)
    held = sensitivity.held_out_sentences(200)
    assert len(held) == 200 and not set(held) & set(calib)


def test_smoothquant_is_exact_in_fp32(
    fp32_artifact: Artifact, tmp_path: Path, sentences: list[str]
) -> None:
    feeds = staging.SentenceCalibrationReader(fp32_artifact, sentences[:32])
    record = smoothquant.smooth(fp32_artifact.model_path, tmp_path / "s.onnx", feeds, alpha=0.7)
    assert record["groups"] == 24 and record["matmuls"] == 36  # Q/K/V share one input
    assert not (tmp_path / "s.probe.onnx").exists()
    import shutil

    shutil.copytree(fp32_artifact.path, tmp_path / "art")
    shutil.copyfile(tmp_path / "s.onnx", tmp_path / "art" / "model.onnx")
    smoothed = Artifact(tmp_path / "art", fp32_artifact.manifest)  # same manifest, new graph
    got = Engine(smoothed).encode(sentences)
    want = Engine(fp32_artifact).encode(sentences)
    assert np.abs(got - want).max() < 1e-4
    with pytest.raises(InvalidInput, match="alpha"):
        smoothquant.smooth(fp32_artifact.model_path, tmp_path / "x.onnx", feeds, alpha=1.5)


def test_sensitivity_ranks_the_ffn_output_above_a_query_projection(
    fp32_artifact: Artifact, tmp_path: Path, sentences: list[str]
) -> None:
    got = sensitivity.measure(
        fp32_artifact,
        sentences,
        nodes=[FIRST_QUERY, FIRST_FFN_OUT],
        workdir=tmp_path,
        per_channel=True,
        reduce_range=not quantize.detect_isa().vnni,
    )
    assert [s.node for s in got] == [FIRST_FFN_OUT, FIRST_QUERY]
    assert got[0].mean_drop > 0 and 0.9 < got[0].p1_cosine < 1.0


def test_committed_rankings_match_the_exported_graph(fp32_artifact: Artifact) -> None:
    """One ranking per ISA level it was measured on, each covering the graph's MatMuls."""
    graph = quantize.weight_matmuls(fp32_artifact.model_path)
    by_isa = ranking.load_rankings()[fp32_artifact.manifest.model_id]
    assert "avx2" in by_isa
    for isa, entry in by_isa.items():
        assert sorted(entry["nodes"]) == sorted(graph)  # every weight MatMul ranked, once
        nodes, source = ranking.most_sensitive(fp32_artifact.manifest.model_id, graph, 3, isa)
        assert source == "measured" and nodes == entry["nodes"][:3]
    nodes, source = ranking.most_sensitive(MODEL_ID, graph, 3, "some-other-isa")
    assert source.startswith("measured on ") and "none committed for some-other-isa" in source


def test_ranking_falls_back_by_name(caplog: pytest.LogCaptureFixture) -> None:
    graph = [f"/0/encoder/layer.{i}/{p}/MatMul" for i in (1, 0) for p in ("output/dense", "x")]
    nodes, source = ranking.most_sensitive("some/other-model", graph, 2, "avx2")
    assert nodes == [
        "/0/encoder/layer.0/output/dense/MatMul",
        "/0/encoder/layer.1/output/dense/MatMul",
    ]
    assert source.startswith("fallback: no committed ranking") and "fallback" in caplog.text
    # The measured #2 (layer.4's FFN input projection) is not in this graph.
    nodes, source = ranking.most_sensitive(MODEL_ID, graph, 2, "avx2")
    assert source.startswith("fallback: ranked node") and nodes[0] == graph[2]
    assert ranking.most_sensitive(MODEL_ID, graph, 0, "avx2") == ([], "none")


def test_mixed_precision_and_smoothquant_are_recorded(
    fp32_artifact: Artifact, tmp_path: Path, sentences: list[str]
) -> None:
    art = quantize.build_variant(
        fp32_artifact,
        "dynamic-int8",
        tmp_path / "v",
        per_channel=True,
        reduce_range=not quantize.detect_isa().vnni,
        keep_fp32=2,
        smoothquant_alpha=0.7,
        size=64,
    )
    s = art.manifest.quantization.settings
    graph = quantize.weight_matmuls(fp32_artifact.model_path)
    kept, source = ranking.most_sensitive(MODEL_ID, graph, 2, quantize.detect_isa().level)
    assert s["ranking"] == source and source.startswith("measured") and s["excluded_nodes"] == 2
    assert s["kept_fp32"] == kept
    assert s["smoothquant"]["alpha"] == 0.7 and s["calibration"]["size"] == 64
    import onnx

    graph = onnx.load(str(art.model_path))
    assert sum(n.op_type == "MatMulInteger" for n in graph.graph.node) == 34
    cos = sensitivity.cosines(
        Engine(art).encode(sentences), Engine(fp32_artifact).encode(sentences)
    )
    assert cos.min() > 0.97  # a sanity bound; the per-segment gate judges quality
    with pytest.raises(InvalidInput, match="keep_fp32"):
        quantize.build_variant(fp32_artifact, "dynamic-int8", tmp_path / "w", keep_fp32=-1)
