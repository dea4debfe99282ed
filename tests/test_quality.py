"""Per-segment quality gate: thresholds, failure naming, and a small real gate run (CI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.quality_reports import FAST_EVALUATION as FAST
from tests.quality_reports import quality_report, segment

from embedkit.core.errors import InvalidInput
from embedkit.core.settings import Settings, get_settings
from embedkit.model import toolchain
from embedkit.model.artifact import Artifact, seal
from embedkit.quality import evaluate as evaluation
from embedkit.quality.evaluate import evaluate, measured_key, neighbour_overlap
from embedkit.quality.gate import (
    GateFailure,
    GateThresholds,
    GateVerdict,
    gate,
    load_thresholds,
    with_verdict,
)
from embedkit.quality.report import write_report
from embedkit.quality.segments import build_corpus

TH = GateThresholds(
    spearman_drop_max={"stsb": 0.5, "lang": 1.0, "length": None},
    cosine_p1_min=0.99,
    overlap_min=0.95,
)


# --- gate logic (pure) -------------------------------------------------------------------


def test_gate_approves_only_when_every_segment_holds() -> None:
    ok = quality_report(
        segment("stsb:all", "stsb", 0.4),
        segment("lang:de", "lang", 0.9),
        segment("length:>32", "length", 3.0),
    )  # length drop is not gated
    assert gate(ok, TH).approved


def test_gate_names_each_failing_segment_and_margin() -> None:
    verdict = gate(
        quality_report(
            segment("stsb:all", "stsb", 0.1),
            segment("stsb:file:answer-answer", "stsb", 0.8),
            segment("lang:ja", "lang", 1.5, p1=0.985),
            segment("length:>256 (generated)", "length", None, overlap=0.9),
        ),
        TH,
    )
    assert not verdict.approved
    assert verdict.failing_segments == [
        "lang:ja",
        "length:>256 (generated)",
        "stsb:file:answer-answer",
    ]
    by = {(f.segment, f.metric): f.by for f in verdict.failures}
    assert by[("stsb:file:answer-answer", "spearman_drop")] == pytest.approx(0.3)
    assert by[("lang:ja", "spearman_drop")] == pytest.approx(0.5)
    assert by[("lang:ja", "cosine_p1")] == pytest.approx(0.005)
    assert by[("length:>256 (generated)", "neighbour_overlap")] == pytest.approx(0.05)
    assert "answer-answer: spearman_drop 0.8 > 0.5 (by 0.3)" in verdict.summary()


def test_thresholds_live_in_one_config_file(tmp_path: Path) -> None:
    th = load_thresholds()
    assert th.spearman_drop_max["stsb"] == 0.5 and th.spearman_drop_max["lang"] == 1.0
    assert th.cosine_p1_min == 0.99 and th.overlap_min == 0.95
    bad = tmp_path / "gate.yaml"
    bad.write_text("cosine_p1_min: 2\n")
    with pytest.raises(InvalidInput, match="invalid"):
        load_thresholds(bad)
    with pytest.raises(InvalidInput, match="cannot read"):
        load_thresholds(tmp_path / "missing.yaml")


def test_neighbour_overlap_detects_reordering() -> None:
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    assert neighbour_overlap(q, d, q, d) == 1.0
    assert neighbour_overlap(q, d, q, -d) < 0.5


def test_corpus_segments(fp32_artifact: Artifact) -> None:
    corpus = build_corpus(fp32_artifact.tokenizer_path, languages=("en", "ja"), max_pairs=200)
    names = {s.name for s in corpus.segments}
    assert {
        "stsb:all",
        "stsb:genre:main-forums",
        "stsb:file:answer-answer",
        "stsb:file:track5.en-en",
        "length:<=8",
        "length:>32",
        "length:>256 (generated)",
        "lang:ja",
    } <= names
    long = next(s for s in corpus.segments if s.name == "length:>128 (generated)")
    assert long.gold is None and len(long.s1) >= 10
    with pytest.raises(InvalidInput, match="unknown language"):
        build_corpus(fp32_artifact.tokenizer_path, languages=("xx",))


# --- a small real gate run (every CI run) ---------------------------------------------------


@pytest.fixture(scope="module")
def variants(fused_variant: Artifact, bad_int8_variant: Artifact) -> dict[str, Artifact]:
    # Fused FP32 is the variant that passes on this CPU (no INT8 setting does:
    # docs/quantization.md); it proves the gate can also approve. Both built once per
    # session (tests/conftest.py).
    return {"bad": bad_int8_variant, "good": fused_variant}


def test_bad_variant_is_rejected_naming_segments(
    system_run: None,
    fp32_artifact: Artifact,
    variants: dict[str, Artifact],
    default_model_dir: Path,
    tmp_path: Path,
) -> None:
    report = evaluate(
        variants["bad"],
        fp32=fp32_artifact,
        reference_dir=default_model_dir,
        # The session's persistent cache (tests/conftest.py): the PyTorch reference runs
        # uncached in the end-to-end release (tests/test_release.py).
        cache_dir=get_settings().eval_cache_dir,
        **FAST,
    )
    verdict = gate(report)
    write_report(report, tmp_path, verdict)
    assert not verdict.approved
    failing = verdict.failing_segments
    # s8 + reduce-range breaks fidelity everywhere, not only on average.
    assert {"stsb:all", "stsb:file:answer-answer", "lang:ja", "length:>256 (generated)"} <= set(
        failing
    )
    assert all(f.by > 0 for f in verdict.failures)
    assert {"quality.json", "quality.md", "quality.png"} <= {p.name for p in tmp_path.iterdir()}
    markdown = (tmp_path / "quality.md").read_text()
    assert "lang:ja" in markdown and "**Gate: rejected" in markdown
    with pytest.raises(InvalidInput, match="failed the quality gate"):
        with_verdict(variants["bad"], verdict)


def test_fused_variant_passes_fast_gate(
    system_run: None,
    fp32_artifact: Artifact,
    variants: dict[str, Artifact],
    default_model_dir: Path,
    private_copy: Any,
) -> None:
    report = evaluate(
        variants["good"],
        fp32=fp32_artifact,
        reference_dir=default_model_dir,
        # The session's persistent cache (tests/conftest.py): the PyTorch reference runs
        # uncached in the end-to-end release (tests/test_release.py).
        cache_dir=get_settings().eval_cache_dir,
        **FAST,
    )
    verdict = gate(report)
    assert verdict.approved, verdict.summary()
    fp32_self = report.segment("stsb:all")
    assert fp32_self.spearman_fp32 == pytest.approx(fp32_self.spearman_reference, abs=0.05)
    stamped = seal(with_verdict(private_copy(variants["good"]), verdict))
    assert (
        stamped.manifest.quantization.approved is True and not stamped.manifest.quantization.forced
    )
    Artifact.load(stamped.path)


VNNI_CPU = "flags\t: sse4_2 avx2 fma avx512f avx512bw avx512_vnni"


def test_a_variants_vectors_are_keyed_by_where_they_were_measured(
    fused_variant: Artifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = measured_key(fused_variant, Settings())
    assert measured_key(fused_variant, Settings(port=3999)) == here  # not a numeric setting
    for numeric in ({"graph_optimization_level": "basic"}, {"token_aware_batching": False}):
        assert measured_key(fused_variant, Settings(**numeric)) != here, numeric
    detect_isa = toolchain.detect_isa
    monkeypatch.setattr(toolchain, "detect_isa", lambda: detect_isa(VNNI_CPU))
    assert "avx512-vnni" in measured_key(fused_variant, Settings()) != here


def test_evaluation_reuses_a_variants_vectors_only_where_measured(
    fp32_artifact: Artifact,
    fused_variant: Artifact,
    default_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoded: list[Path] = []
    engine_encode = evaluation._EngineEncoder.encode

    def counted(self: Any, texts: list[str]) -> Any:
        encoded.append(self._artifact.path)
        return engine_encode(self, texts)

    monkeypatch.setattr(evaluation._EngineEncoder, "encode", counted)
    # The reference is not what this tests: the fp32 engine stands in for PyTorch.
    fp32_engine = evaluation._EngineEncoder(fp32_artifact, None)
    monkeypatch.setattr(
        evaluation._ReferenceEncoder,
        "encode",
        lambda self, texts: engine_encode(fp32_engine, texts),
    )
    quick: dict[str, Any] = {
        "groups": ("stsb",),
        "languages": ("en",),
        "max_pairs": 12,
        "retrieval": False,
    }

    def run() -> Any:
        return evaluate(
            fused_variant,
            fp32=fp32_artifact,
            reference_dir=default_model_dir,
            cache_dir=tmp_path,
            **quick,
        )

    first = run()
    assert encoded == [fp32_artifact.path, fused_variant.path]
    encoded.clear()
    assert run().segments == first.segments and encoded == []  # every set from the cache
    detect_isa = toolchain.detect_isa
    monkeypatch.setattr(toolchain, "detect_isa", lambda: detect_isa(VNNI_CPU))
    run()
    assert encoded == [fused_variant.path]  # another CPU level: only the variant again
    encoded.clear()
    own = evaluate(
        fp32_artifact,
        fp32=fp32_artifact,
        reference_dir=default_model_dir,
        cache_dir=tmp_path / "own",
        **quick,
    )
    assert encoded == [fp32_artifact.path]  # the parent as its own variant: encoded once
    assert own.segment("stsb:all").cosine_fp32.min == pytest.approx(1.0)


def test_two_processes_needing_one_set_encode_it_once(tmp_path: Path) -> None:
    """While one evaluation encodes a text set, another that needs the same set waits for
    the cache file instead of encoding it beside it (two workers, two candidates)."""
    import threading

    calls: list[int] = []
    inside = threading.Event()

    class Slow:
        def encode(self, texts: list[str]) -> np.ndarray:
            calls.append(1)
            inside.set()
            threading.Event().wait(0.5)  # the second caller arrives while this one encodes
            return np.array([[1.0, float(len(t))] for t in texts])

    texts, out = ["a", "bb"], []
    first = threading.Thread(
        target=lambda: out.append(evaluation._cached_encode(Slow(), texts, "k", tmp_path))
    )
    first.start()
    inside.wait(5)
    out.append(evaluation._cached_encode(Slow(), texts, "k", tmp_path))
    first.join()
    assert len(calls) == 1 and len(out) == 2 and (out[0] == out[1]).all()


def test_force_is_recorded(bad_int8_variant: Artifact, private_copy: Any) -> None:
    art = private_copy(bad_int8_variant)
    rejected = GateVerdict(
        approved=False,
        segments_checked=1,
        failures=[
            GateFailure(segment="lang:ja", metric="cosine_p1", value=0.9, threshold=0.99, by=0.09)
        ],
    )
    forced = seal(with_verdict(art, rejected, force=True))
    q = forced.manifest.quantization
    assert q.approved is False and q.forced is True
    Artifact.load(forced.path)


def test_reference_must_be_the_artifacts_source(fp32_artifact: Artifact, tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("not the model")
    with pytest.raises(InvalidInput, match="is not the source"):
        evaluate(fp32_artifact, fp32=fp32_artifact, reference_dir=tmp_path, **FAST)
