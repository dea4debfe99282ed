"""Compatibility classes: the gate's rule, retrieval scoring, planted variants through the
real evaluation, the manifest's format and binding, and what the Embedder serves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.planted import plant, stamped
from tests.quality_reports import FAST_EVALUATION as FAST
from tests.quality_reports import quality_report, segment

from embedkit.core import metrics
from embedkit.core.errors import ArtifactError
from embedkit.core.settings import Settings, get_settings
from embedkit.model import toolchain
from embedkit.model.artifact import MANIFEST, Artifact, finalize
from embedkit.quality import retrieval
from embedkit.quality.evaluate import evaluate
from embedkit.quality.gate import GateThresholds, GateVerdict, gate
from embedkit.quality.report import report_markdown
from embedkit.quality.retrieval import RetrievalMetrics, RetrievalResult, RetrievalSet
from embedkit.serve.engine.embedder import EmbedderCore
from embedkit.serve.engine.startup import refusal

TH = GateThresholds(
    spearman_drop_max={"stsb": 0.5, "lang": 1.0, "length": None},
    cosine_p1_min=0.99,
    overlap_min=0.95,
)


def _retrieval(ndcg_drop: float, recall_drop: float) -> RetrievalResult:
    return RetrievalResult(
        dataset="scifact-train",
        documents=100,
        queries=10,
        fp32=RetrievalMetrics(ndcg_at_10=60.0, recall_at_100=90.0),
        variant=RetrievalMetrics(ndcg_at_10=60.0 - ndcg_drop, recall_at_100=90.0 - recall_drop),
    )


def _with_retrieval(report: Any, result: RetrievalResult | None, note: str | None = None) -> Any:
    return report.model_copy(update={"retrieval": result, "retrieval_note": note})


# --- the rule (pure) --------------------------------------------------------------------------


def test_classes_strictest_first() -> None:
    strict = quality_report(segment("stsb:all", "stsb", 0.1))
    assert gate(_with_retrieval(strict, None, "absent"), TH).compatibility == "index-compatible"

    far = quality_report(segment("stsb:all", "stsb", 0.1, p1=0.97, overlap=0.9))
    verdict = gate(_with_retrieval(far, _retrieval(0.4, 0.9)), TH)
    assert verdict.compatibility == "reindex" and not verdict.approved
    assert "only for an index built with this variant" in verdict.summary()

    lost = gate(_with_retrieval(far, _retrieval(1.3, 0.2)), TH)
    assert lost.compatibility == "rejected"
    assert "retrieval:scifact-train: ndcg_at_10_drop 1.3 > 1 (by 0.3)" in lost.summary()

    no_data = gate(_with_retrieval(far, None, "retrieval data /x lacks corpus.jsonl"), TH)
    assert no_data.compatibility == "rejected"
    assert no_data.why_not_reindex == "no retrieval scores (retrieval data /x lacks corpus.jsonl)"

    spearman = quality_report(segment("stsb:all", "stsb", 0.8, p1=0.97))
    worse = gate(_with_retrieval(spearman, _retrieval(0.0, 0.0)), TH)
    assert worse.compatibility == "rejected" and "Spearman fails on stsb:all" in worse.summary()


def test_a_verdict_without_a_class_takes_it_from_approval() -> None:
    assert GateVerdict(approved=True, failures=[], segments_checked=1).compatibility == (
        "index-compatible"
    )
    assert GateVerdict(approved=False, failures=[], segments_checked=1).compatibility == "rejected"


def test_rank_metrics_follow_beir_definitions() -> None:
    data = RetrievalSet(
        name="t",
        doc_ids=["a", "b", "c"],
        docs=["", "", ""],
        query_ids=["q1", "q2"],
        queries=["", ""],
        qrels={"q1": {"a": 1}, "q2": {"b": 1, "c": 1}},
    )
    docs = np.eye(3, dtype=np.float32)
    # q1 ranks a first (nDCG 1); q2 ranks c, a, b: DCG 1 + 1/log2(4), ideal 1 + 1/log2(3).
    queries = np.array([[1.0, 0.2, 0.1], [0.5, 0.1, 0.9]], dtype=np.float32)
    ndcg, recall = retrieval.rank_metrics(queries, docs, data)
    q2 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    assert ndcg == pytest.approx((1 + q2) / 2 * 100, abs=1e-3)
    assert recall == 100.0


def test_beir_loader_bounded_and_optional(scifact: Path, tmp_path: Path) -> None:
    assert "lacks corpus.jsonl" in (retrieval.missing_reason(tmp_path) or "")
    data = retrieval.load_beir(scifact, max_docs=200, max_queries=20)
    assert len(data.queries) == 20 and len(data.docs) == 200
    judged = {d for q in data.query_ids for d in data.qrels[q]}
    assert judged <= set(data.doc_ids)  # the bounded corpus keeps every judged document


@pytest.fixture(scope="module")
def model_tag(fp32_artifact: Artifact) -> str:
    """The fp32 artifact registered afresh for this module: the newest version with its
    checksum in the store, so the parent :func:`find_parent` must pick."""
    from embedkit.model.artifact import register

    return register(fp32_artifact)


# --- planted variants through the real evaluation ------------------------------------------


@pytest.fixture(scope="module")
def planted(fp32_artifact: Artifact, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("planted")
    return {k: plant(fp32_artifact, k, root / k) for k in ("copy", "rotated", "damaged")}


@pytest.fixture(scope="module")
def scifact(pytestconfig: pytest.Config) -> Path:
    """The SciFact slice shipped with the tests (tests/data/scifact-slice/README.md), so the
    classes are tested from a bare clone; the full set is the release's optional data."""
    return pytestconfig.rootpath / "tests" / "data" / "scifact-slice"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("copy", "index-compatible"), ("rotated", "reindex"), ("damaged", "rejected")],
)
def test_gate_classes_planted_variants(
    kind: str,
    expected: str,
    planted: dict[str, Artifact],
    fp32_artifact: Artifact,
    default_model_dir: Path,
    scifact: Path,
    system_run: None,
) -> None:
    report = evaluate(
        planted[kind],
        fp32=fp32_artifact,
        reference_dir=default_model_dir,
        retrieval_dir=scifact,
        cache_dir=get_settings().eval_cache_dir,  # the session's: reference vectors once
        **FAST,
    )
    verdict = gate(report)
    assert verdict.compatibility == expected, verdict.summary()
    assert report.retrieval is not None and report.retrieval.documents == 300
    assert "#### Retrieval: scifact-slice, 300 documents, 40 queries" in report_markdown(report)
    if kind == "rotated":  # a rotation keeps every cosine between vectors: same retrieval
        assert report.retrieval.ndcg_drop == pytest.approx(0, abs=0.01)
        assert {f.metric for f in verdict.failures} == {"cosine_p1"}
    if kind == "damaged":
        assert "Spearman fails on" in (verdict.why_not_reindex or "")


def test_without_retrieval_data_nothing_is_reindex(
    planted: dict[str, Artifact],
    fp32_artifact: Artifact,
    default_model_dir: Path,
    tmp_path: Path,
    system_run: None,
) -> None:
    report = evaluate(
        planted["rotated"],
        fp32=fp32_artifact,
        reference_dir=default_model_dir,
        retrieval_dir=tmp_path,
        cache_dir=get_settings().eval_cache_dir,
        **FAST,
    )
    verdict = gate(report)
    assert report.retrieval is None and verdict.compatibility == "rejected"
    assert "lacks corpus.jsonl" in (verdict.why_not_reindex or "")
    assert "Retrieval: none (retrieval data" in report_markdown(report)


# --- manifest: format, binding, reference vectors ------------------------------------------


def test_stamp_records_class_binding_and_reference(
    fp32_artifact: Artifact, planted: dict[str, Artifact], tmp_path: Path
) -> None:
    art = stamped(fp32_artifact, planted["rotated"], tmp_path / "r", "reindex")
    m = Artifact.load(art.path).manifest
    assert m.format_version == 4 and m.compatibility == "reindex"
    assert m.variant == "planted-reindex"
    assert m.quantization.measured_on is not None
    assert m.quantization.measured_on.isa == toolchain.detect_isa().level
    assert m.reference is not None and len(m.reference.vectors[0]) == 384
    assert m.summary()["compatibility"] == "reindex"


def test_format_1_loads_and_unknown_formats_are_refused(artifact_copy: Path) -> None:
    manifest = json.loads((artifact_copy / MANIFEST).read_text())
    manifest["format_version"] = 1  # as released before classes existed
    (artifact_copy / MANIFEST).write_text(json.dumps(manifest))
    old = Artifact.load(artifact_copy)
    assert old.manifest.compatibility == "index-compatible"  # an fp32 export
    assert refusal(old.manifest, Settings(), isa="avx2", runtimes={"onnxruntime": "1"}) is None
    variant = old.manifest.model_copy(
        update={
            "quantization": old.manifest.quantization.model_copy(
                update={"mode": "dynamic-int8", "approved": True}
            )
        }
    )
    reason = refusal(variant, Settings(), isa="avx2", runtimes={"onnxruntime": "1"})
    assert reason is not None and reason[0] == "format"
    assert "manifest format 1 records no measurement binding" in reason[1]

    manifest["format_version"] = 6
    (artifact_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest format 6 is not one this embedkit reads"):
        Artifact.load(artifact_copy)


# --- what the Embedder serves (real ORT sessions, no HTTP) ----------------------------------


def _refusals(reason: str) -> float:
    value = metrics.get().variant_refusals.labels(variant="planted-reindex", reason=reason)
    return float(value._value.get())


def test_embedder_serves_a_reindex_variant_only_when_named(
    fp32_artifact: Artifact, planted: dict[str, Artifact], model_tag: str, tmp_path: Path
) -> None:
    art = stamped(fp32_artifact, planted["rotated"], tmp_path / "r", "reindex")
    before = _refusals("reindex_not_named")
    core = EmbedderCore(art, Settings())
    assert core.identity.variant == "fp32" and core.identity.compatibility == "index-compatible"
    assert "class reindex serves only when named" in (core.identity.refused or "")
    assert core.artifact.tag == model_tag  # the parent, found by checksum in the store
    assert _refusals("reindex_not_named") == before + 1

    named = EmbedderCore(art, Settings(variant="planted-reindex"))
    assert named.identity.compatibility == "reindex" and named.identity.precision == "fp32"
    assert named.identity.refused is None
    assert "class=reindex" in named.identity.header_value()
    assert named.info()["identity"]["variant"] == "planted-reindex"


def test_embedder_refuses_a_variant_measured_on_another_isa(
    fp32_artifact: Artifact, planted: dict[str, Artifact], model_tag: str, tmp_path: Path
) -> None:
    other = "amx" if toolchain.detect_isa().level != "amx" else "avx2"
    art = stamped(fp32_artifact, planted["copy"], tmp_path / "c", "index-compatible", isa=other)
    core = EmbedderCore(art, Settings())
    assert core.artifact.tag == model_tag and core.identity.variant == "fp32"
    assert f"measured on ISA level {other}" in (core.identity.refused or "")
    vectors = core.engine.encode(["the parent serves"])
    assert vectors.shape == (1, 384)


def test_embedder_refuses_unreproduced_reference_vectors(
    fp32_artifact: Artifact, planted: dict[str, Artifact], model_tag: str, tmp_path: Path
) -> None:
    art = stamped(fp32_artifact, planted["copy"], tmp_path / "c", "index-compatible")
    fields = art.manifest.model_dump(mode="json", exclude={"files"})
    fields["reference"]["vectors"][0] = [-x for x in fields["reference"]["vectors"][0]]
    tampered = finalize(art.path, fields)
    core = EmbedderCore(tampered, Settings())
    assert core.artifact.tag == model_tag
    assert "reference vectors are not reproduced" in (core.identity.refused or "")


def test_variant_label_is_registered(fp32_artifact: Artifact, model_tag: str) -> None:
    import bentoml

    labels = bentoml.models.get(model_tag).info.labels
    assert labels["variant"] == "fp32" and labels["compatibility"] == "index-compatible"
