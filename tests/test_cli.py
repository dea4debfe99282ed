"""The CLI: real commands, one-line errors, non-zero exits, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.quality_reports import FAST_EVALUATION as FAST
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit.quality.segments import GROUPS
from embedkit.runtime.engine import Engine

runner = CliRunner()


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr  # progress lines may precede it; the error is one line
    assert result.stderr.rstrip().endswith(errors[0])
    assert "Traceback" not in result.output + result.stderr
    for needle in needles:
        assert needle in errors[0]


def test_export_missing_model_dir(tmp_path: Path) -> None:
    result = run("export", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert_one_line_error(result, "nope")


def test_export_not_a_sentence_transformers_dir(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    result = run("export", "--model", str(tmp_path / "plain"), "--output", str(tmp_path / "out"))
    assert_one_line_error(result, "not a sentence-transformers model")


def test_export_unsupported_pooling(tmp_path: Path, default_model_dir: Path) -> None:
    import shutil

    src = tmp_path / "m"
    shutil.copytree(default_model_dir, src)
    cfg = json.loads((src / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_lasttoken=True)
    (src / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    result = run("export", "--model", str(src), "--output", str(tmp_path / "out"))
    assert_one_line_error(result, "lasttoken", "not supported")


def test_encode_matches_engine_in_input_order(fp32_artifact: Artifact) -> None:
    texts = ["first line", "", "second, longer line with more tokens", "日本語"]
    result = run("encode", "--model", str(fp32_artifact.path), input="\n".join(texts) + "\n")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 4
    expected = Engine(fp32_artifact, Settings(providers=["CPUExecutionProvider"])).encode(texts)
    np.testing.assert_allclose(np.array(rows), expected, atol=1e-6)


def test_encode_from_file_with_dimensions(fp32_artifact: Artifact, tmp_path: Path) -> None:
    file = tmp_path / "in.txt"
    file.write_text("alpha\nbeta\n")
    result = run("encode", "--model", str(fp32_artifact.path), str(file), "--dimensions", "64")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [len(r) for r in rows] == [64, 64]
    assert np.linalg.norm(rows[0]) == pytest.approx(1.0, abs=1e-5)


def test_encode_bad_inputs(fp32_artifact: Artifact, tmp_path: Path) -> None:
    assert_one_line_error(
        run("encode", "--model", str(fp32_artifact.path), str(tmp_path / "missing.txt")),
        "missing.txt",
    )
    assert_one_line_error(
        run("encode", "--model", str(fp32_artifact.path), str(tmp_path)), "directory"
    )
    assert_one_line_error(
        run("encode", "--model", str(fp32_artifact.path), "--dimensions", "0", input="x\n"),
        "dimensions",
    )
    assert_one_line_error(
        run(
            "encode",
            "--model",
            str(fp32_artifact.path),
            "--no-truncate",
            "--chunk",
            "2",
            input="ok\nfine\nalso ok\n" + "word " * 600 + "\n",
        ),
        "line 4 has",
        "tokens",
    )
    assert_one_line_error(run("encode", "--model", str(tmp_path / "nothing")), "nothing")


def test_info_prints_the_manifest(fp32_artifact: Artifact) -> None:
    result = run("info", str(fp32_artifact.path))
    assert result.exit_code == 0
    assert json.loads(result.stdout)["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_info_refuses_a_tampered_artifact(artifact_copy: Path) -> None:
    data = bytearray((artifact_copy / "model.onnx").read_bytes())
    data[1000] ^= 0xFF
    (artifact_copy / "model.onnx").write_bytes(bytes(data))
    assert_one_line_error(run("info", str(artifact_copy)), "model.onnx", "checksum")


def test_quantize_then_evaluate_rejects_a_bad_variant(
    fp32_artifact: Artifact, tmp_path: Path, system_run: None
) -> None:
    """The CLI faces of quantize and evaluate: a deliberately bad variant exits 1, naming
    its segments."""
    bad = tmp_path / "bad"
    result = run(
        "quantize",
        str(fp32_artifact.path),
        "--output",
        str(bad),
        "--mode",
        "dynamic-int8",
        "--weight-type",
        "s8",
        "--per-tensor",
        "--reduce-range",
    )
    assert result.exit_code == 0, result.stderr
    report = tmp_path / "report"
    assert set(FAST["groups"]) == set(GROUPS)
    result = run(
        "evaluate",
        str(bad),
        "--fp32",
        str(fp32_artifact.path),
        "--out",
        str(report),
        # The gate tests' evaluation, so the vectors are theirs (every group, as the CLI).
        *("--max-pairs", str(FAST["max_pairs"])),
        *(arg for language in FAST["languages"] for arg in ("--language", language)),
        *("--retrieval-docs", str(FAST["retrieval_docs"])),
        *("--retrieval-queries", str(FAST["retrieval_queries"])),
    )
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "rejected" in result.stdout and "stsb:" in result.stdout
    assert (report / "quality.json").is_file() and (report / "quality.png").is_file()
    segments = json.loads((report / "quality.json").read_text())["segments"]
    assert {s["name"] for s in segments if s["group"] == "lang"} == {
        f"lang:{language}" for language in FAST["languages"]
    }
    unknown = run("evaluate", str(bad), "--fp32", str(fp32_artifact.path), "--language", "xx")
    assert_one_line_error(unknown, "unknown language(s) ['xx']")


def test_quantize_unknown_option_is_one_line(fp32_artifact: Artifact, tmp_path: Path) -> None:
    result = run(
        "quantize", str(fp32_artifact.path), "--output", str(tmp_path / "x"), "--mode", "int3"
    )
    assert_one_line_error(result, "int3")


def test_bench_encodings_without_scifact_is_one_line(
    fp32_artifact: Artifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedkit.core.settings import get_settings

    monkeypatch.setenv("EMBEDKIT_EXTENDED_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = run("bench-encodings", "--artifact", str(fp32_artifact.path))
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert_one_line_error(result, "scifact-train", "corpus.jsonl")


def test_configuration_reference_is_current(pytestconfig: pytest.Config) -> None:
    """docs/configuration.md is generated from the settings; regenerate it when they change."""
    result = run("config", "--markdown")
    assert result.exit_code == 0
    doc = pytestconfig.rootpath / "docs" / "configuration.md"
    assert doc.read_text() == result.stdout, (
        "run: embedkit config --markdown > docs/configuration.md"
    )


def test_chunk_retrieval_bad_window_is_one_line() -> None:
    assert_one_line_error(run("chunk-retrieval", "--window", "128"), "--window '128'", "128:32")
