"""`embedkit bench-rerank` (issue #30): the arithmetic and format of its rows and ratios, the
requests it sends, its one-line refusal of a bad option, and a reranker's release bench
record. The speed itself is measured by running the command (docs/benchmarks/rerank.md),
never asserted here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit_bench import rerank_http as bench

runner = CliRunner()


def test_row_and_ratios_arithmetic() -> None:
    latencies = [0.010] * 18 + [0.050, 0.100]  # 20 requests of 100 pairs in 2 s
    r = bench.row(latencies, 100, 2.0)
    assert r["requests"] == 20 and r["texts_per_s"] == pytest.approx(1000.0)
    assert r["req_per_s"] == pytest.approx(10.0)
    assert r["p50_ms"] == pytest.approx(10.0) and r["p95_ms"] == pytest.approx(50.0)
    local = bench.row([0.005] * 40, 100, 0.5)  # 8000 pairs/s, p50 5 ms
    ratio = bench.ratios(r, local)
    assert ratio["pairs_per_s_http_over_in_process"] == pytest.approx(0.125)
    assert ratio["p50_http_over_in_process"] == pytest.approx(2.0)
    assert math.isnan(bench.row([], 100, 1.0)["p50_ms"])


def test_line_format() -> None:
    r = {**bench.row([0.02, 0.04], 100, 0.5), "errors": 3}
    text = bench.line("/rerank x100 c=1", r)
    assert text.startswith("/rerank x100 c=1")
    assert "400.0 pairs/s" in text and "p50    20.0" in text and "p95    40.0" in text
    assert text.endswith("errors 3")
    assert "errors" not in bench.line("in-process", bench.row([0.01], 100, 0.01))


def test_requests_are_one_query_and_n_documents() -> None:
    groups = bench.rerank_groups(100)
    assert len(groups) == 12 and all(len(docs) == 100 for _, docs in groups)
    assert groups == bench.rerank_groups(100)  # deterministic
    body = json.loads(bench.rerank_bodies(groups[:1], "tiny")[0])
    assert body == {
        "query": groups[0][0],
        "texts": groups[0][1],
        "raw_scores": True,
        "model": "tiny",
    }
    assert "model" not in json.loads(bench.rerank_bodies(groups[:1])[0])


def test_bad_documents_is_one_line_before_any_server() -> None:
    result = runner.invoke(app, ["bench-rerank", "--artifact", "nowhere", "--documents", "0"])
    assert result.exit_code != 0
    assert "--documents must be >= 1" in result.output and "Traceback" not in result.output


def test_a_rerankers_release_record_has_pairs_per_s(
    tiny_cross_encoder: tuple[Path, Artifact], tmp_path: Path
) -> None:
    from embedkit.release import records

    settings = Settings(providers=["CPUExecutionProvider"])
    files, summary = records.write_records(
        tiny_cross_encoder[1], "fp32", tmp_path, bench=True, settings=settings
    )
    data = json.loads(files["bench"].read_text())
    assert data["kind"] == "embedkit-rerank-bench" and set(data["batches"]) == {"1", "32"}
    for b in ("1", "32"):
        assert data["batches"][b]["pairs_per_s"] > 0
        assert summary[f"bench.pairs_per_s_b{b}"] == round(data["batches"][b]["pairs_per_s"], 1)
    assert "profile" not in files


def test_help_names_the_command() -> None:
    res = runner.invoke(app, ["bench-rerank", "--help"])
    assert res.exit_code == 0 and "embedkit bench-rerank" in res.output, res.output
