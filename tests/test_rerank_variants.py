"""A reranker's variants through the gate (issue #30, item 2), on the tiny cross-encoder:
fused FP32 and dynamic INT8 built from its fp32 export, judged per segment (STS genres,
edge cases, pair lengths, ranking groups) by score fidelity and ranking agreement against
the parent; the verdict follows the numbers, a broken variant is refused naming its
segments, and an approved one carries reference scores that serving checks at startup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedkit.core.errors import InvalidInput
from embedkit.core.settings import Settings
from embedkit.model.artifact import MANIFEST, Artifact, ReferenceScores
from embedkit.model.recipe import Recipe
from embedkit.quality import pair_gate
from embedkit.quality.gate import GateThresholds, RerankLimits, load_thresholds, with_verdict
from embedkit.runtime.reference import reference_score_diff
from embedkit.runtime.rerank import Reranker
from embedkit.variants import quantize
from embedkit.variants.staging import staged

CPU = Settings(providers=["CPUExecutionProvider"])
LIMIT = 12  # pairs per STS genre and length bucket: quick, still every segment


@pytest.fixture(scope="module")
def thresholds() -> GateThresholds:
    return load_thresholds()  # the repository's config/quality-gate.yaml, rerank: included


@pytest.fixture(scope="module")
def parent(tiny_cross_encoder: tuple[Path, Artifact]) -> Artifact:
    return tiny_cross_encoder[1]


def _judge(variant: Artifact, parent: Artifact, th: GateThresholds) -> tuple[Any, Any]:
    report = pair_gate.evaluate_pairs(
        variant, fp32=parent, settings=CPU, thresholds=th, limit_per_segment=LIMIT
    )
    return report, pair_gate.gate_pairs(report, th)


def _expected_failures(report: pair_gate.PairQualityReport, lim: RerankLimits) -> set[str]:
    """The failing segments, recomputed from the report's numbers and the limits."""
    bad = set()
    for s in report.segments:
        if max(s.raw_delta_share, s.activated_delta_share) > lim.score_delta_share_max:
            bad.add(s.name)
        if s.pairs >= lim.rank_pairs_min and (s.spearman or -1.0) < lim.spearman_min:
            bad.add(s.name)
        if s.topk_overlap is not None and s.topk_overlap < lim.topk_overlap_min:
            bad.add(s.name)
    return bad


def _zero_initializer(src: Path, dst: Path, pattern: str) -> dict[str, Any]:
    """A deliberately broken variant: every weight whose name contains ``pattern`` zeroed
    (a layer's feed-forward output dropped)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    hits = []
    for init in model.graph.initializer:
        if pattern in init.name:
            zero = np.zeros_like(numpy_helper.to_array(init))
            init.CopyFrom(numpy_helper.from_array(zero, init.name))
            hits.append(init.name)
    if not hits:  # optimum names MatMul weights onnx::MatMul_NNN: find the node instead
        weights = {
            n.input[1] for n in model.graph.node if n.op_type == "MatMul" and pattern in n.name
        }
        for init in model.graph.initializer:
            if init.name in weights:
                zero = np.zeros_like(numpy_helper.to_array(init))
                init.CopyFrom(numpy_helper.from_array(zero, init.name))
                hits.append(init.name)
    assert hits, f"no weight matches {pattern!r}"
    onnx.save(model, str(dst))
    return {"broken": hits}


def test_segments_cover_genres_edges_lengths_and_ranking_groups(parent: Artifact) -> None:
    segs = pair_gate.evaluation_segments(Reranker(parent, CPU).tokenizer, limit=LIMIT)
    names = set(segs)
    assert {"sts/main-news", "sts/main-captions", "sts/main-forums"} <= names
    assert {"edge/empty", "edge/emoji", "edge/cjk", "edge/over_limit", "edge/long_query"} <= names
    lengths = {n for n in names if n.startswith("len/")}
    assert "len/cut" in lengths and len(lengths) >= 3, lengths
    groups = pair_gate.ranking_groups()
    for name, (queries, docs) in groups.items():
        assert name in names and len(segs[name]) == len(queries) * len(docs)
        assert len(docs) >= 3 * 10  # a top-10 must be a real choice


def test_topk_overlap_and_spearman_arithmetic() -> None:
    parent = np.array([[5.0, 4, 3, 2, 1], [1, 2, 3, 4, 5]])
    same = parent + 0.5
    swapped = np.array([[1.0, 4, 3, 2, 5], [1, 2, 3, 4, 5]])  # query 0's best falls out
    assert pair_gate.topk_overlap(parent, same, 2) == 1.0
    assert pair_gate.topk_overlap(parent, swapped, 2) == pytest.approx((1 / 2 + 1) / 2)
    assert pair_gate.spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)
    assert pair_gate.spearman(np.arange(5.0), np.zeros(5)) is None


def test_fused_and_int8_are_judged_as_their_numbers_say(
    parent: Artifact, thresholds: GateThresholds, tmp_path: Path
) -> None:
    lim = thresholds.rerank_limits()
    presets = quantize.rerank_presets()
    assert set(presets) >= {"fused-fp32"} and any(k.startswith("dynamic-int8") for k in presets)
    for name in ("fused-fp32", next(k for k in presets if k.startswith("dynamic-int8"))):
        options = dict(presets[name])
        variant = quantize.build_variant(
            parent, options.pop("kind"), tmp_path / name, write=False, **options
        )
        report, verdict = _judge(variant, parent, thresholds)
        failing = _expected_failures(report, lim)
        assert set(verdict.failing_segments) == failing, (name, verdict.summary())
        assert verdict.approved == (not failing)
        assert verdict.compatibility == ("index-compatible" if not failing else "rejected")
        if name == "fused-fp32":  # the same arithmetic, reordered: nothing moves
            assert verdict.approved, verdict.summary()
            assert max(s.raw_max_abs_diff for s in report.segments) < 1e-3
        assert {s.name for s in report.segments if s.topk_overlap is not None} == set(
            pair_gate.ranking_groups()
        )
        files = pair_gate.write_pair_report(report, tmp_path / f"{name}.quality", verdict)
        data = json.loads(files["json"].read_text())
        assert data["verdict"]["compatibility"] == verdict.compatibility
        assert "rank/main-news" in files["markdown"].read_text()


def test_a_broken_variant_is_refused_naming_its_segments(
    parent: Artifact, thresholds: GateThresholds, tmp_path: Path
) -> None:
    """A layer's feed-forward output weights zeroed: scores move and rankings change, and
    the gate says where."""
    broken = staged(
        parent,
        tmp_path / "broken",
        lambda src, dst: _zero_initializer(src, dst, "layer.0/output/dense"),
        "fused-fp32",
        False,
    )
    _, verdict = _judge(broken, parent, thresholds)
    assert not verdict.approved and verdict.compatibility == "rejected"
    assert verdict.failing_segments and any(
        s.startswith(("sts/", "rank/")) for s in verdict.failing_segments
    )
    summary = verdict.summary()
    assert "rejected" in summary and verdict.failing_segments[0] in summary
    assert "a reranker has no index" in (verdict.why_not_reindex or "")


def test_limits_at_the_edge(parent: Artifact, thresholds: GateThresholds) -> None:
    """The same report passes limits it meets and fails one tightened past its numbers."""
    report, verdict = _judge(parent, parent, thresholds)  # the parent against itself
    assert verdict.approved
    worst = min(s.spearman for s in report.segments if s.spearman is not None)
    assert worst == pytest.approx(1.0)
    tight = thresholds.rerank_limits().model_copy(update={"score_delta_share_max": -1e-9})
    strict = thresholds.model_copy(update={"rerank": tight})
    failed = pair_gate.gate_pairs(report, strict)
    assert not failed.approved and len(failed.failing_segments) == len(report.segments)


def test_a_gate_config_without_rerank_limits_refuses_before_building(
    parent: Artifact, tmp_path: Path
) -> None:
    from embedkit.release.pipeline import run_pair_candidates

    th = GateThresholds(spearman_drop_max={}, cosine_p1_min=0.99, overlap_min=0.95)
    with pytest.raises(InvalidInput, match="no rerank: section"):
        run_pair_candidates(parent, tmp_path, thresholds=th)
    assert not any(tmp_path.iterdir())


def test_reference_scores_are_stamped_and_checked(
    parent: Artifact, thresholds: GateThresholds, tmp_path: Path
) -> None:
    from embedkit.serve.engine.reranker import _reproduces_scores

    variant = quantize.build_variant(parent, "fused-fp32", tmp_path / "fused", write=False)
    _, verdict = _judge(variant, parent, thresholds)
    stamped = with_verdict(variant, verdict, name="fused-fp32", thresholds=thresholds)
    ref = stamped.manifest.reference_scores
    assert isinstance(ref, ReferenceScores) and stamped.manifest.reference is None
    assert ref.max_abs_diff == thresholds.rerank_limits().reference_abs_max
    assert stamped.manifest.quantization.compatibility == "index-compatible"
    scorer = Reranker(stamped, CPU, judging=True)
    assert reference_score_diff(scorer, ref) <= ref.max_abs_diff
    assert _reproduces_scores(scorer, stamped.manifest) is None
    off = ref.model_copy(update={"scores": [s + 0.01 for s in ref.scores]})
    tampered = stamped.manifest.model_copy(update={"reference_scores": off})
    refused = _reproduces_scores(scorer, tampered)
    assert refused is not None and refused[0] == "reference_scores"


def test_release_build_with_variants(
    tiny_cross_encoder: tuple[Path, Artifact], tmp_path: Path, system_run: None
) -> None:
    """`embedkit release --variants` for a reranker: fused and INT8 gated, approved ones
    registered with their verdict, quality report and reference scores; a forced broken
    preset would be the only way a rejected one gets in."""
    from embedkit.model.artifact import seal
    from embedkit.release.pipeline import build

    src, _ = tiny_cross_encoder
    built = build(
        Recipe.for_directory(src),
        workdir=tmp_path,
        limit_per_segment=4,
        variants=True,
        presets={"fused-fp32": {"kind": "fused-fp32"}},
        candidate_options={"rounds": 1},
    )
    names = [name for name, *_ in built.versions]
    assert names == ["fp32", "fused-fp32"], names
    assert built.summary and "fused-fp32 | index-compatible" in built.summary
    _, fused, speed, approved = built.versions[1]
    assert approved and speed is not None and speed > 0
    fused = seal(fused)
    on_disk = json.loads((fused.path / MANIFEST).read_text())
    assert on_disk["format_version"] == 5 and on_disk["task"] == "rerank"
    assert on_disk["quantization"]["compatibility"] == "index-compatible"
    assert len(on_disk["reference_scores"]["scores"]) == len(on_disk["reference_scores"]["pairs"])
    assert {"quality.json", "quality.markdown"} <= set(on_disk["records"])


def test_evaluation_bounds_for_a_reranker_are_refused_before_export(
    tiny_cross_encoder: tuple[Path, Artifact], tmp_path: Path
) -> None:
    """The embedding corpus's bounds mean nothing for a reranker: named, not ignored."""
    from embedkit.release.pipeline import VariantsConfig, build

    options = VariantsConfig.model_validate({"evaluation": {"max_pairs": 20}}).candidate_options()
    with pytest.raises(InvalidInput, match="no evaluation option max_pairs"):
        build(
            Recipe.for_directory(tiny_cross_encoder[0]),
            workdir=tmp_path,
            variants=True,
            candidate_options=options,
        )
    assert not any(tmp_path.iterdir())


def test_serving_refuses_a_variant_whose_reference_scores_differ(
    parent: Artifact, thresholds: GateThresholds, tmp_path: Path
) -> None:
    """The real startup path of a served reranker: an approved variant serves; the same
    variant whose stored reference scores this machine does not reproduce is refused (one
    metric) and its fp32 parent, found in the store by checksum, serves instead."""
    from embedkit.core import metrics
    from embedkit.model.artifact import amend, register, seal
    from embedkit.serve.engine.reranker import RerankerCore

    register(parent)
    variant = quantize.build_variant(parent, "fused-fp32", tmp_path / "fused", write=False)
    _, verdict = _judge(variant, parent, thresholds)
    stamped = with_verdict(variant, verdict, name="fused-fp32", thresholds=thresholds)
    good = RerankerCore(seal(stamped), CPU)
    assert good.identity.variant == "fused-fp32" and good.identity.refused is None

    ref = stamped.manifest.reference_scores
    assert ref is not None
    off = ref.model_copy(update={"scores": [s + 0.01 for s in ref.scores]})
    tampered = seal(amend(stamped, {"reference_scores": off.model_dump(mode="json")}))
    counter = metrics.get().variant_refusals.labels(variant="fused-fp32", reason="reference_scores")
    before = float(counter._value.get())
    core = RerankerCore(tampered, CPU)
    assert core.identity.variant == "fp32" and core.artifact.path != tampered.path
    assert "reference scores are not reproduced" in (core.identity.refused or "")
    assert float(counter._value.get()) == before + 1


def test_release_registers_an_approved_reranker_variant(
    tiny_cross_encoder: tuple[Path, Artifact], tmp_path: Path, system_run: None
) -> None:
    """Through publish: each version's records (a reranker's bench is pairs/s), the variant
    naming its written parent, both registered; `embedkit info` shows the variant's class."""
    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.model.recipe import Source
    from embedkit.release.pipeline import release

    recipe = Recipe(
        name="tiny-reranker-variants",
        model_id="tiny/reranker",
        source=Source(path=tiny_cross_encoder[0]),
        task="rerank",
    )
    done = release(
        recipe,
        workdir=tmp_path,
        limit_per_segment=4,
        variants=True,
        presets={"fused-fp32": {"kind": "fused-fp32"}},
        candidate_options={"rounds": 1},
    )
    by_name = {v.name: v for v in done.versions}
    assert set(by_name) == {"fp32", "fused-fp32"} and by_name["fused-fp32"].approved
    shown = CliRunner().invoke(app, ["info", by_name["fused-fp32"].tag])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout[: shown.stdout.index("records:")])
    assert info["quantization"]["compatibility"] == "index-compatible"
    assert info["parent"] and info["reference_scores"]["pairs"]
    assert {"bench", "quality.json", "runtime"} <= set(info["records"])
    assert info["performance"]["bench.pairs_per_s_b32"] > 0
