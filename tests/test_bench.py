"""Benchmark, profile, release records, cost and the performance gate (real sessions, small runs).

Speed is never asserted as an absolute: the gate tests check that a candidate
much slower by construction fails (1 thread and token-aware batching off) and that
the default against itself passes; the margins measured on the CI machine are in
docs/benchmarks/perf-gate.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.core import stats
from embedkit.core.errors import InvalidInput
from embedkit.core.settings import get_settings
from embedkit.model.artifact import finalize, register, seal
from embedkit.release import measure as bench
from embedkit.release import perfgate, records
from embedkit.release import profile as profiling
from embedkit.release.pipeline import with_records
from embedkit_bench import cost, roofline
from embedkit_bench import http as bench_http
from embedkit_bench.report import bench_and_report
from embedkit_bench.server import start_service

runner = CliRunner()


def test_bench_writes_json_markdown_and_plots_side_by_side(fp32_artifact, int8_variant, tmp_path):
    pytest.importorskip("sentence_transformers", reason="PyTorch baseline needs the export extra")
    paths = bench_and_report(
        fp32_artifact.path,
        tmp_path,
        variants={"int8": int8_variant.path},
        batch_sizes=(1, 8),
        max_texts=24,
        long_texts=3,
        command="embedkit bench (test)",
    )
    for key in ("json", "markdown", "throughput_png", "variants_png"):
        assert paths[key].is_file(), key
    for key in ("throughput_png", "variants_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(paths["json"].read_text())
    assert set(result["corpora"]) == {"sts", "long"}
    assert result["corpora"]["long"]["corpus"]["mean_tokens"] > 150  # long texts really are long
    names = {bench.TORCH, bench.NAIVE, bench.ENGINE_PLAIN, bench.ENGINE, "engine[int8]"}
    for run in result["corpora"].values():
        assert set(run["batches"]) == {"1", "8"}
        for batch in run["batches"].values():
            assert set(batch["systems"]) == names
            row = batch["systems"][bench.ENGINE]
            assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
            assert row["texts_per_s"] > 0
            assert f"{bench.ENGINE}/{bench.TORCH}" in batch["ratios"]
    assert result["memory"]["peak_rss_mb"] > 100
    assert result["machine"]["cores"] >= 1 and result["machine"]["isa"]["level"]
    # 6 layers × (4·384² + 2·384·1536) weights × 2 FLOPs: all-MiniLM-L6-v2, counted from the graph.
    assert result["model_flops"]["weight_flops_per_token"] == 21_233_664
    assert {r["hardware"] for r in result["cost"]} >= {"cpu-2vcpu", "t4", "h100"}
    md = paths["markdown"].read_text()
    for name in names:
        assert f"| {name} |" in md or f"| **{name}** |" in md
    assert "× naive ORT" in md and "× PyTorch" in md and "% est. peak" in md
    assert "## Cost per 1,000 embeddings" in md and "throughput.png" in md


def test_http_sweep_against_a_started_service(fp32_artifact, starts_server):
    service = start_service(fp32_artifact.path)
    try:
        service.wait_ready()
        texts = bench.sts_stream(200)
        result = bench_http.run_http_bench(
            service.url,
            texts,
            concurrencies=(1, 4),
            seconds=1.5,
            settle_s=0.5,
            bulk_size=8,
        )
    finally:
        service.stop()
    assert not service.home.exists()
    for route in ("interactive", "bulk"):
        rows = result["routes"][route]["concurrency"]
        assert set(rows) == {"1", "4"}
        for row in rows.values():
            assert row["requests"] > 0 and row["errors"] == 0
            assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]


# --- the gate --------------------------------------------------------------------------


def test_gate_passes_the_default_against_itself(fp32_artifact, tmp_path, timed):
    report = tmp_path / "gate.json"
    res = runner.invoke(
        app, ["gate", "--baseline", str(fp32_artifact.path), "--short", "--report", str(report)]
    )
    assert res.exit_code == 0, res.output
    assert "performance gate: PASSED" in res.output
    data = json.loads(report.read_text())
    assert data["passed"] and set(data["throughput"]) == {"1", "32", "128"}


def test_gate_fails_a_deliberately_slow_candidate(fp32_artifact, tmp_path, timed):
    # The configured thresholds, timed at batch 128 only: the slow candidate is slow by
    # construction, and measuring it at every batch size would only cost CI time.
    config = perfgate.load_thresholds().model_dump()
    config.update(throughput_batch_sizes=[128], latency_batch_sizes=[], texts=256, rounds=2)
    path = tmp_path / "perf-gate.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    res = runner.invoke(
        app,
        [
            "gate",
            "--baseline",
            str(fp32_artifact.path),
            "--config",
            str(path),
            "--set",
            "intra_op_threads=1",
            "--set",
            "token_aware_batching=false",
        ],
    )
    assert res.exit_code == 1, res.output
    assert "performance gate: FAILED" in res.output
    assert "FAIL: throughput at batch 128" in res.output  # padding costs most at large batches


def test_gate_fails_a_candidate_without_an_approved_quality_verdict(artifact_copy):
    from embedkit.model.artifact import Artifact

    base = perfgate.load_baseline(artifact_copy)
    fields = base.artifact.manifest.model_dump(mode="json", exclude={"files"})
    rejected_dir = artifact_copy.parent / "rejected"
    shutil.copytree(artifact_copy, rejected_dir)
    fields["quantization"] = {"mode": "dynamic-int8", "approved": False}
    rejected = finalize(rejected_dir, fields)
    th = (
        perfgate.load_thresholds()
        .shortened()
        .model_copy(
            update={
                "texts": 32,
                "rounds": 1,
                "throughput_batch_sizes": [8],
                "latency_batch_sizes": [],
            }
        )
    )
    cand = perfgate.Config("rejected", Artifact.load(rejected.path), get_settings())
    result = perfgate.run_gate(base, cand, th)
    assert not result.passed
    assert any("no approved quality verdict (rejected)" in f for f in result.failures)


def test_gate_config_and_records_reject_bad_input(tmp_path):
    bad = tmp_path / "perf.yaml"
    bad.write_text("throughput_drop_max: 2\n")
    with pytest.raises(InvalidInput, match="invalid"):
        perfgate.load_thresholds(bad)
    with pytest.raises(InvalidInput, match="unknown settings: nope"):
        perfgate.settings_from_record({"settings": {"nope": 1}})
    assert (
        perfgate.settings_from_record({"settings": {"intra_op_threads": 1}}).intra_op_threads == 1
    )
    res = runner.invoke(app, ["gate", "--baseline", str(tmp_path), "--set", "threads"])
    assert res.exit_code == 1 and "error:" in res.output


# --- profile, release records, info ------------------------------------------------------


def test_profile_ranks_operators_and_keeps_the_trace(fp32_artifact, tmp_path):
    report = profiling.profile(
        {"fp32": fp32_artifact.path}, tmp_path, batch_sizes=(8,), max_batches=2
    )
    summary = report["variants"]["fp32"]["8"]
    assert Path(summary["trace"]).is_file()  # the raw Chrome trace is kept
    ops = summary["top_ops"]
    assert ops and abs(sum(o["share"] for o in ops) - 1) < 0.2
    assert ops == sorted(ops, key=lambda o: o["ms"], reverse=True)
    assert "MatMul" in {o["op"] for o in ops[:3]}  # a transformer encoder is matmul-bound
    assert (tmp_path / "profile.md").read_text().count("| fp32 |") == 1


def test_release_records_are_stored_and_shown_by_info(fp32_artifact, tmp_path):
    import bentoml

    from embedkit.model.artifact import Artifact

    shutil.copytree(fp32_artifact.path, tmp_path / "art")
    art = Artifact.load(tmp_path / "art")
    files, summary = records.write_records(art, "fp32", tmp_path / "records")
    art = seal(with_records(art, files, {"performance": summary}))
    tag = register(art, labels={"variant": "fp32", "role": "default"})
    res = runner.invoke(app, ["info", tag])
    assert res.exit_code == 0, res.output
    listed = {
        line.split(":")[0].strip()
        for line in res.output.split("records:")[1].splitlines()
        if ":" in line
    }
    assert {"runtime", "bench", "profile"} <= listed
    stored = Path(bentoml.models.get(tag).path)
    runtime = json.loads((stored / "records" / "runtime.json").read_text())
    assert runtime["variant"] == "fp32" and runtime["settings"]["intra_op_threads"] >= 1
    assert json.loads((stored / "records" / "profile.json").read_text())["variants"]["fp32"]["32"][
        "top_ops"
    ]
    metadata = bentoml.models.get(tag).info.metadata
    texts_per_s = metadata["bench.texts_per_s_b32"]
    assert isinstance(texts_per_s, float) and texts_per_s > 0
    assert metadata["runtime.variant"] == "fp32"
    # The gate restores the baseline's recorded runtime parameters.
    base = perfgate.load_baseline(tag)
    assert base.settings.intra_op_threads == runtime["settings"]["intra_op_threads"]


# --- pure functions -------------------------------------------------------------------------


def test_cost_and_roofline_arithmetic(tmp_path):
    assert cost.per_1k(3.6, 1.0) == pytest.approx(1.0)  # $3.60/h at 1 text/s → $1 per 1k
    table = cost.load_prices()
    rows = cost.cost_rows({"engine (b32)": 100.0}, 2, table)
    by_hw = {r["hardware"]: r for r in rows if r["config"] == "engine (b32)"}
    assert by_hw["cpu-16vcpu"]["texts_per_s"] == pytest.approx(800.0)
    assert all(r["throughput_source"] for r in rows)
    bad = tmp_path / "prices.yaml"
    bad.write_text("hardware: {t4: {kind: gpu, hourly_usd: 1}}\n")  # no price_source
    with pytest.raises(InvalidInput):
        cost.load_prices(bad)
    assert roofline.cpu_ghz("cpu MHz\t\t: 2000.0\ncpu MHz\t\t: 3000.0\n") == pytest.approx(2.5)
    flops = {
        "available": True,
        "weight_flops_per_token": 1e6,
        "attention_flops_per_token_per_position": 10,
    }
    got = roofline.achieved(1000.0, flops, 100.0, peak_gflops=2.02)
    assert got["gflops"] == pytest.approx(1.001) and got["share_of_peak"] == pytest.approx(
        1.001 / 2.02
    )


def test_percentiles_are_nearest_rank_real_values() -> None:
    calls = [float(v) for v in range(1, 101)]  # 1..100 ms
    assert stats.percentiles(reversed(calls)) == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert stats.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert stats.percentile([1.0, 2.0], 50) == 1.0  # a value that was measured, never 1.5
    assert stats.percentile([7.0], 99) == 7.0
    assert stats.percentile([float(v) for v in range(100)], 7) == 6.0  # 7.000…01 in floats
    assert stats.percentiles([]) == {"p50": None, "p95": None, "p99": None}


# --- the commands behind scripts/ -------------------------------------------------------


@pytest.mark.parametrize("command", ["bench-engine", "bench-http", "soak", "build-bento"])
def test_script_commands_have_help(command: str) -> None:
    res = runner.invoke(app, [command, "--help"])
    assert res.exit_code == 0, res.output
    assert f"embedkit {command}" in res.output


def test_script_commands_fail_on_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["build-bento", "--model-tag", "m:v1", "--variant", "tpu"])
    assert res.exit_code == 2 and "'tpu' is not one of batch, cpu, gpu" in res.output
    res = runner.invoke(app, ["build-bento", "--model-tag", "m:latest", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "error: model tag 'm:latest' must name" in res.output
    res = runner.invoke(app, ["bench-engine", str(tmp_path), "--batch-sizes", "1,x"])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output
    res = runner.invoke(app, ["bench-http", "--url", "http://127.0.0.1:9", "--env", "NOEQUALS"])
    assert res.exit_code == 1 and "--env takes KEY=VALUE" in res.output
    res = runner.invoke(app, ["soak", "--url", "http://example.com", "--seconds", "1"])
    assert res.exit_code == 1 and "loopback only" in res.output


def test_memory_criterion_tells_a_leak_from_a_noisy_warm_up() -> None:
    """The soak's RSS verdict (bench.loadtest): a warm-up that levels off with the arena's
    +-4 % swings passes; a steady leak of 12 % over the run fails, as does one big jump."""
    from collections.abc import Sequence

    from embedkit_bench import loadtest as lt

    def verdict(samples_mb: Sequence[float]) -> bool:
        report = lt.summarize([], 60.0, rss=[int(mb * 2**20) for mb in samples_mb])
        return lt.memory_levels_off(report)

    swing = [0, 20, -15, 25, -20, 10, 0, -25] * 8  # MB, like a 120 s soak's samples
    warm_then_flat = [550 + min(i, 10) * 5 + swing[i] for i in range(64)]
    leak = [550 * (1 + 0.12 * i / 63) + swing[i] / 4 for i in range(64)]
    jump = [550.0] * 16 + [800.0] * 48
    assert verdict(warm_then_flat)
    assert not verdict(leak)
    assert not verdict(jump)
    assert lt.summarize([], 1.0, rss=[1, 2]).rss_growth is None  # too few samples: unjudged


def test_corpus_sizing_and_table_arithmetic(tmp_path: Path) -> None:
    from embedkit_bench import corpus_throughput as bench_corpus

    # 100 M documents at 25 docs/s per core in 24 h: 1e8 / (25 * 86,400) = 46.3 -> 47 cores.
    assert bench_corpus.sizing(25.0, 100_000_000, 24) == 47
    assert bench_corpus.sizing(100.0, 360_000, 1) == 1
    rows = [
        bench_corpus.Row("embed-corpus", "local", 2, 100, 5.0, 40.0),
        bench_corpus.Row("reembed", "HTTP", 2, 100, 9.0, 10.0),
    ]
    table = bench_corpus.markdown(rows, command="embedkit bench-corpus x")
    # 1e8 / (20 * 86,400) = 57.9 -> 58 cores in a day; 1e8 / (20 * 604,800) = 8.3 -> 9 in a week
    assert "| embed-corpus | local | 2 | 100 | 5.0 | 40.0 | 20.0 | 58 | 9 |" in table
    assert "| reembed | HTTP | 2 | 100 | 9.0 | 10.0 | 5.0 | 232 | 34 |" in table
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y"}\n')
    assert bench_corpus.first_documents(corpus, 1, tmp_path / "one.jsonl") == 1
    assert (tmp_path / "one.jsonl").read_text() == '{"_id": "a", "text": "x"}\n'
    with pytest.raises(InvalidInput, match="no such corpus"):
        bench_corpus.first_documents(tmp_path / "none.jsonl", 1, tmp_path / "o.jsonl")
