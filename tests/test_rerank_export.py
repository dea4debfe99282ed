"""Rerankers (issue #30): a CrossEncoder directory → recipe (task rerank) → Optimum
sequence-classification export → format-5 manifest → the pair contract, on a tiny random
cross-encoder built offline (tests/tiny_models.py). Each parity check is also shown to fail
when the runtime is broken the way a port would break it (activation skipped, both sides
of a pair cut)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.core.errors import ArtifactError, InputTooLong, InvalidInput, ModelSourceError
from embedkit.core.settings import Settings
from embedkit.model.artifact import MANIFEST, Artifact
from embedkit.model.export import export, load_cross_encoder
from embedkit.model.recipe import Recipe, Source, find_recipe, is_cross_encoder, read_rerank_config
from embedkit.quality import pair_contract
from embedkit.runtime import rerank
from embedkit.runtime.engine import Engine
from embedkit.runtime.rerank import Reranker

CPU = Settings(providers=["CPUExecutionProvider"])
PAIRS = [
    ("A man is playing a guitar.", "A man plays an instrument on stage."),
    ("How do vaccines work?", "自然言語処理は楽しい。 launch day 🚀🔥🎉"),
    ("", ""),
]
runner = CliRunner()


@pytest.fixture(scope="module")
def cross_encoder(tiny_cross_encoder: tuple[Path, Artifact]) -> Any:
    return load_cross_encoder(tiny_cross_encoder[0])


@pytest.fixture(scope="module")
def reranker(tiny_cross_encoder: tuple[Path, Artifact]) -> Reranker:
    return Reranker(tiny_cross_encoder[1], CPU)


# --- recipe and export ------------------------------------------------------------------------


def test_a_cross_encoder_directory_is_a_rerank_recipe(
    tiny_cross_encoder: tuple[Path, Artifact], default_model_dir: Path
) -> None:
    src, _ = tiny_cross_encoder
    assert is_cross_encoder(src) and not is_cross_encoder(default_model_dir)
    assert find_recipe(str(src)).task == "rerank"
    assert find_recipe(str(default_model_dir)).task == "embed"
    config = read_rerank_config(src)
    assert (config.num_labels, config.activation, config.max_seq_length) == (1, "sigmoid", 64)
    assert config.architecture == "BertForSequenceClassification"


def test_activation_follows_the_model_config(tmp_path: Path, default_model_dir: Path) -> None:
    """CrossEncoder's activation_fn as saved (v5: config_sentence_transformers.json) is the
    manifest's; a non-torch path is skipped as CrossEncoder skips it (default Sigmoid)."""
    from tests.tiny_models import build_tiny_cross_encoder

    src = build_tiny_cross_encoder(tmp_path / "identity", default_model_dir, activation="Identity")
    assert read_rerank_config(src).activation == "identity"
    st = src / "config_sentence_transformers.json"
    st.write_text(json.dumps({**json.loads(st.read_text()), "activation_fn": "my.Module"}))
    assert read_rerank_config(src).activation == "sigmoid"


def test_task_and_model_must_agree(
    tiny_cross_encoder: tuple[Path, Artifact], tmp_path: Path, default_model_dir: Path
) -> None:
    src, _ = tiny_cross_encoder
    as_embed = Recipe(name="ce", model_id="ce", source=Source(path=src), task="embed")
    with pytest.raises(ModelSourceError, match="cross-encoder; its recipe needs task: rerank"):
        export(as_embed, tmp_path / "a")
    as_rerank = Recipe(
        name="st", model_id="st", source=Source(path=default_model_dir), task="rerank"
    )
    with pytest.raises(ModelSourceError, match="not a sequence-classification cross-encoder"):
        export(as_rerank, tmp_path / "b")


def test_export_writes_a_format_5_rerank_manifest(
    tiny_cross_encoder: tuple[Path, Artifact], tmp_path: Path
) -> None:
    import onnx

    src, _ = tiny_cross_encoder
    art = export(Recipe.for_directory(src), tmp_path / "art")
    m = art.manifest
    assert (m.task, m.format_version, m.output) == ("rerank", 5, "logits")
    assert m.embedding is None and m.rerank is not None and m.rerank.activation == "sigmoid"
    assert m.source is not None and m.source.path == str(src.resolve())
    assert m.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    graph = onnx.load(str(art.model_path))
    (out,) = graph.graph.output
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == [
        "batch_size",
        1,
    ]
    on_disk = json.loads((art.path / MANIFEST).read_text())
    assert on_disk["task"] == "rerank" and on_disk["source"]["path"] == str(src.resolve())
    with pytest.raises(ArtifactError, match="task: rerank"):
        Engine(art, CPU)  # an embedding engine refuses a reranker by its task


def test_info_shows_task_and_source_path(
    tiny_cross_encoder: tuple[Path, Artifact], fp32_artifact: Artifact, tmp_path: Path
) -> None:
    src, _ = tiny_cross_encoder
    result = runner.invoke(app, ["export", "--model", str(src), "--output", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "(task: rerank)" in result.stdout
    shown = json.loads(runner.invoke(app, ["info", str(tmp_path / "a")]).stdout)
    assert shown["task"] == "rerank" and shown["source"]["path"] == str(src.resolve())
    # An embedding manifest leaves format 5's fields out of its file (format 4, as it was)
    # and reads as embed; info still says so.
    assert "task" not in json.loads((fp32_artifact.path / MANIFEST).read_text())
    assert fp32_artifact.manifest.task == "embed" and fp32_artifact.manifest.format_version == 4
    embed = json.loads(runner.invoke(app, ["info", str(fp32_artifact.path)]).stdout)
    assert embed["task"] == "embed"


def test_a_rerank_manifest_below_format_5_is_refused(
    tiny_cross_encoder: tuple[Path, Artifact], tmp_path: Path
) -> None:
    import shutil

    shutil.copytree(tiny_cross_encoder[1].path, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / MANIFEST).read_text())
    (tmp_path / "a" / MANIFEST).write_text(json.dumps({**raw, "format_version": 4}))
    with pytest.raises(ArtifactError, match="task rerank needs manifest format 5"):
        Artifact.load(tmp_path / "a")


# --- the runtime --------------------------------------------------------------------------------


def test_scores_match_cross_encoder_predict(reranker: Reranker, cross_encoder: Any) -> None:
    import torch

    raw = reranker.score(PAIRS, raw=True)
    assert raw.shape == (len(PAIRS),) and raw.dtype == np.float32
    assert np.ptp(raw) > 1e-2  # the tiny model tells pairs apart (else parity proves nothing)
    want_raw = cross_encoder.predict(PAIRS, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(raw, want_raw, atol=1e-4)
    np.testing.assert_allclose(reranker.score(PAIRS), cross_encoder.predict(PAIRS), atol=1e-4)
    np.testing.assert_allclose(reranker.score(PAIRS), 1 / (1 + np.exp(-raw)), atol=1e-6)


def test_only_the_document_is_cut(reranker: Reranker) -> None:
    tok = reranker.tokenizer
    query = "what is " * 20
    (row,), (types,), cut = tok.encode_pairs([(query, "word " * 200)])
    (frame,), _, _ = tok.encode_pairs([(query, "")], truncate=False)
    assert cut == 1 and len(row) == tok.max_length
    assert row[: len(frame) - 1] == frame[:-1]  # the whole query, then the document's start
    assert set(types[: len(frame) - 1]) == {0} and set(types[len(frame) - 1 :]) == {1}
    with pytest.raises(InputTooLong, match=r"pair 1: the query takes .*a query is never cut"):
        reranker.score([("a", "b"), ("what is " * 40, "b")])
    with pytest.raises(InputTooLong, match="truncation is off"):
        reranker.score([(query, "word " * 200)], truncate=False)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ("query", "pairs must be a list"),
        ([], "must not be an empty list"),
        ([("q",)], r"pairs\[0\] must be a \[query, document\] pair"),
        ([("q", "d"), ("q", 3)], r"pairs\[1\] must hold two strings"),
    ],
)
def test_bad_pairs_are_refused_by_name(reranker: Reranker, pairs: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        reranker.score(pairs)


# --- the pair contract ----------------------------------------------------------------------------


def test_pair_contract_passes(tiny_cross_encoder: tuple[Path, Artifact]) -> None:
    src, art = tiny_cross_encoder
    report = pair_contract.validate(
        art, reference_dir=src, limit_per_segment=8, shape_batches=(1, 2, 7)
    )
    assert report["passed"], {k: report.get(k, {}).get("passed") for k in pair_contract.CHECKS}
    segments = report["parity"]["segments"]
    for name in ("edge/empty", "edge/emoji", "edge/cjk", "edge/over_limit", "edge/long_query"):
        assert segments[name]["passed"] and segments[name]["count"] > 0
    assert report["truncation"]["query_too_long"].startswith("refused")
    assert report["shapes"]["seq_lens"] == [1, 2, 16, 64]


def test_parity_fails_when_the_activation_is_skipped(
    reranker: Reranker, cross_encoder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    segments = {"pairs": PAIRS}
    assert pair_contract.check_parity(reranker, cross_encoder, segments)["passed"]
    monkeypatch.setattr(rerank, "activate", lambda raw, _activation: raw)
    result = pair_contract.check_parity(reranker, cross_encoder, segments)
    stats = result["segments"]["pairs"]
    assert not result["passed"]
    assert stats["raw_max_abs_diff"] <= 1e-4 < stats["activated_max_abs_diff"]


def test_parity_fails_when_both_sides_are_cut(
    tiny_cross_encoder: tuple[Path, Artifact], cross_encoder: Any
) -> None:
    """Cutting the longer side first (CrossEncoder's own default) cuts a long query: the
    long-query segment and the truncation check catch it; short queries cannot."""
    broken = Reranker(tiny_cross_encoder[1], CPU)
    tok = broken.tokenizer
    segments = pair_contract.parity_segments(tok, limit=2)
    for side, t in tok._pairs_by_side.items():
        t.enable_truncation(tok.max_length, strategy="longest_first", direction=side)
    result = pair_contract.check_parity(
        broken, cross_encoder, {k: segments[k] for k in ("sts/main-news", "edge/long_query")}
    )
    assert result["segments"]["sts/main-news"]["passed"]
    assert not result["segments"]["edge/long_query"]["passed"]
    assert not pair_contract.check_truncation(broken)["query_whole"]


# --- the release pipeline and the CLI ---------------------------------------------------------


def test_release_build_of_a_reranker(
    tiny_cross_encoder: tuple[Path, Artifact], tmp_path: Path, system_run: None
) -> None:
    from embedkit.model.artifact import seal
    from embedkit.release.pipeline import build

    src, _ = tiny_cross_encoder
    built = build(Recipe.for_directory(src), workdir=tmp_path, limit_per_segment=2)
    ((name, art, _, approved),) = built.versions
    assert name == "fp32" and approved and built.report["passed"]
    art = seal(art)
    on_disk = json.loads((art.path / MANIFEST).read_text())
    assert on_disk["task"] == "rerank" and on_disk["parity"]["passed"]
    assert on_disk["parity"]["segments"]["edge/long_query"]["activated_max_abs_diff"] <= 1e-4
    assert (art.path / on_disk["records"]["validation"]).is_file()


def test_validate_cli_runs_the_pair_contract(tiny_cross_encoder: tuple[Path, Artifact]) -> None:
    src, art = tiny_cross_encoder
    result = runner.invoke(
        app, ["validate", str(art.path), "--reference", str(src), "--limit", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "parity edge/long_query" in result.stdout and "truncation" in result.stdout
    assert "PASSED" in result.stdout


def test_release_registers_a_reranker_that_info_shows_by_name(
    tiny_cross_encoder: tuple[Path, Artifact], tmp_path: Path, system_run: None
) -> None:
    """Export → pair contract → records (runtime only: no vectors to bench) → register;
    ``embedkit info NAME`` finds it in the model store with its task and source."""
    from embedkit.release.pipeline import release

    src, _ = tiny_cross_encoder
    recipe = Recipe(
        name="tiny-reranker", model_id="tiny/reranker", source=Source(path=src), task="rerank"
    )
    done = release(recipe, workdir=tmp_path, limit_per_segment=2, bench=False)
    assert done.tag.startswith("tiny-reranker:") and done.artifact.manifest.task == "rerank"
    result = runner.invoke(app, ["info", "tiny-reranker"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout[: result.stdout.index("records:")])
    assert shown["task"] == "rerank" and shown["source"]["path"] == str(src.resolve())
    assert set(shown["records"]) >= {"validation", "runtime", "release"}
