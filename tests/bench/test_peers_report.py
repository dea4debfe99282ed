"""`embedkit bench-peers` without Infinity or wrk: parsing, ratios, table, markdown, errors.

The real run (a venv of its own, two servers, minutes) lives in docs/benchmarks/peers.md;
these check the arithmetic and the entry point's refusals, which need neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.core.errors import ContractViolation, EmbedkitError, InvalidInput
from embedkit_bench import peers

runner = CliRunner()

WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:7997
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    26.81ms    5.24ms  42.81ms   68.69%
  444 requests in 10.00s, 3.55MB read
Requests/sec:     44.40
WRK_JSON {"requests": 104, "duration_us": 2000000, "bytes": 3726568, "status_errors": 4, \
"connect_errors": 0, "read_errors": 1, "write_errors": 0, "timeouts": 2, \
"latency_us": {"mean": 26813.2, "max": 42808, "p50": 26522, "p95": 36561, "p99": 40383}}
"""


def test_parse_wrk_reads_the_json_line_and_refuses_its_absence() -> None:
    data = peers.parse_wrk(WRK_OUTPUT)
    assert data["requests"] == 104 and data["latency_us"]["p95"] == 36561
    with pytest.raises(EmbedkitError, match=r"wrk printed no summary: .*unable to connect"):
        peers.parse_wrk("Running 10s test\nunable to connect to 127.0.0.1:1\n")
    with pytest.raises(EmbedkitError, match="not JSON"):
        peers.parse_wrk('WRK_JSON {"requests": }\n')


def test_phase_row_counts_only_2xx_and_divides_cpu_by_served_requests() -> None:
    bulk = peers.WORKLOADS["batch32-c4"]
    row = peers.phase_row(peers.parse_wrk(WRK_OUTPUT), bulk, server_cpu_s=1.92, wrk_cpu_s=0.096)
    assert row["requests"] == 100  # 104 answers, 4 of them non-2xx
    assert row["errors"] == 4 + 1 + 2  # status + read errors + timeouts
    assert row["req_per_s"] == pytest.approx(50.0)
    assert row["texts_per_s"] == pytest.approx(1600.0)
    assert (row["p50_ms"], row["p95_ms"], row["p99_ms"]) == (26.522, 36.561, 40.383)
    assert row["server_core_ms_per_req"] == pytest.approx(19.2)
    assert row["wrk_core_ms_per_req"] == pytest.approx(0.96)
    single = peers.WORKLOADS["single-c1"]
    unknown = peers.phase_row(
        peers.parse_wrk(WRK_OUTPUT), single, server_cpu_s=None, wrk_cpu_s=None
    )
    assert unknown["server_core_ms_per_req"] is None


def test_long_documents_take_throughput_from_latency_not_a_count_of_three() -> None:
    wrk = {**peers.parse_wrk(WRK_OUTPUT), "requests": 3, "status_errors": 0}
    wrk["duration_us"], wrk["latency_us"] = 24_000_000, {**wrk["latency_us"], "mean": 6.4e6}
    row = peers.phase_row(wrk, peers.WORKLOADS["long64-c1"], server_cpu_s=None, wrk_cpu_s=None)
    assert row["req_per_s_counted"] == pytest.approx(3 / 24)
    assert row["req_per_s"] == pytest.approx(1 / 6.4)  # one client, 6.4 s a request
    assert row["texts_per_s"] == pytest.approx(64 / 6.4)


def test_wrk_command_passes_bodies_and_route_to_the_lua_script(tmp_path) -> None:
    w = peers.WORKLOADS["single-c16"]
    cmd = peers.wrk_command("wrk", "http://127.0.0.1:5", tmp_path / "s.lua", tmp_path / "b", 16, 8)
    assert cmd[:5] == ["wrk", "-t1", "-c16", "-d8s", "--latency"]
    assert cmd[-4:] == ["http://127.0.0.1:5", "--", str(tmp_path / "b"), peers.PATH]
    assert w.concurrency == 16 and w.reference_batch == 16
    script = peers._package_file(peers.WRK_SCRIPT).read_text()
    assert "WRK_JSON" in script and "function done" in script  # shipped as package data
    assert "torch==2.13.0" in peers._package_file(peers.CONSTRAINTS).read_text()


def test_parse_workloads() -> None:
    assert [w.name for w in peers.parse_workloads(None)] == list(peers.WORKLOADS)
    chosen = peers.parse_workloads("batch32-c4, single-c1,batch32-c4")
    assert [w.name for w in chosen] == ["batch32-c4", "single-c1"]
    with pytest.raises(InvalidInput, match="unknown workload single-c2; choose from single-c1"):
        peers.parse_workloads("single-c1,single-c2")


def _row(rps: float, per: int, p50: float, errors: int = 0) -> dict[str, object]:
    return {
        "requests": int(rps * 10), "errors": errors, "seconds": 10.0,
        "req_per_s": rps, "texts_per_s": rps * per,
        "p50_ms": p50, "p95_ms": 2 * p50, "p99_ms": 3 * p50,
        "server_core_ms_per_req": 4.0, "wrk_core_ms_per_req": 0.1,
    }  # fmt: skip


def _report() -> dict[str, Any]:
    workloads = [peers.WORKLOADS["single-c1"], peers.WORKLOADS["batch32-c4"]]
    rounds = [
        {
            "single-c1": {"embedkit": _row(110, 1, 8.5), "infinity": _row(88, 1, 11.0)},
            "batch32-c4": {"embedkit": _row(12, 32, 300), "infinity": _row(8, 32, 480)},
        },
        {
            "single-c1": {"embedkit": _row(104, 1, 9.0), "infinity": _row(80, 1, 12.0, 3)},
            "batch32-c4": {"embedkit": _row(13, 32, 290), "infinity": _row(6.5, 32, 500)},
        },
    ]
    reference = [
        {
            "sts-b1": {"batch": 1, "texts_per_s": 200.0, "p50_ms": 4.3},
            "sts-b32": {"batch": 32, "texts_per_s": 416.0, "p50_ms": 70.0},
        },
        {
            "sts-b1": {"batch": 1, "texts_per_s": 208.0, "p50_ms": 4.1},
            "sts-b32": {"batch": 32, "texts_per_s": 416.0, "p50_ms": 72.0},
        },
    ]
    return {
        "date": "2026-11-27T21:00:00+00:00",
        "machine": {"cpu": "AMD EPYC 9R14", "cores": 2, "isa": {"level": "avx512"}},
        "load_average": {"1m": 1.0, "5m": 1.0, "15m": 1.0},
        "settings": {"rounds": 2, "seconds_per_phase": 10, "long_phase_s": 30, "settle_s": 2},
        "model": {"name": "all-minilm-l6-v2", "source": "gt==0.1.0", "max_tokens": 256},
        "systems": {
            "embedkit": {
                "version": "0.1.0",
                "url": "started by the benchmark",
                "intra_op_threads": 2,
                "env": {},
                "onnxruntime": "1.32.0",
            },
            "infinity": {
                "versions": {"infinity-emb": "0.0.78"},
                "engine": "optimum",
                "intra_op_threads": "ORT default",
            },
        },
        "corpora": {"sts": "STS test", "long": "SciFact"},
        "parity": {
            "texts": 64,
            "min_cosine": 0.9999991,
            "mean_cosine": 0.9999998,
            "threshold": 0.999,
        },
        "rounds": rounds,
        "in_process": reference,
        "summary": peers.summarize(rounds, reference, workloads),
    }


def test_summary_ranges_ratios_and_share_of_in_process() -> None:
    summary = _report()["summary"]
    single = summary["single-c1"]
    assert single["embedkit"]["req_per_s"] == [104, 110]
    assert single["infinity"]["errors"] == 3
    # Ratios are per round (110/88, 104/80), never max over min across rounds.
    assert single["ratio"] == pytest.approx([1.25, 1.3])
    # Each round against its own in-process figure: 110/200 and 104/208.
    assert single["embedkit"]["of_in_process"] == pytest.approx([0.5, 0.55])
    bulk = summary["batch32-c4"]
    assert bulk["ratio"] == pytest.approx([1.5, 2.0])
    assert bulk["in_process"] == {"batch": 32, "texts_per_s": [416.0, 416.0], "p50_ms": [70, 72]}


def test_table_and_markdown_say_what_was_run() -> None:
    report = _report()
    rows = peers.table_rows(report["summary"])
    assert len(rows) == 2 and all(len(r) == len(peers.TABLE_COLUMNS) for r in rows)
    single, bulk = rows
    assert single[:4] == ["1 text/req, c=1", "104–110 req/s", "80–88 req/s", "1.25–1.30×"]
    assert "3 errors" in single[5]
    assert single[6] == "50–55 / 38–44 % of b1"
    assert bulk[1] == "384–416 texts/s (12.0–13.0 req/s)"
    md = peers.markdown(report, command="scripts/bench-peers --rounds 2", note="shakedown run")
    for needle in (
        "> shakedown run",
        "2026-11-27",
        "AMD EPYC 9R14",
        "`scripts/bench-peers --rounds 2`",
        "infinity-emb 0.0.78",
        "onnxruntime 1.32.0",
        "min cosine 0.999999",
        "| sts-b32 | 416.0 | 70.0–72.0 |",
    ):
        assert needle in md, needle
    assert md.count("\n| 1 text/req, c=1 |") == 1


def _baseline_report() -> dict[str, Any]:
    """``_report`` with a second embedkit server (the baseline) in both rounds."""
    report = _report()
    workloads = [peers.WORKLOADS["single-c1"], peers.WORKLOADS["batch32-c4"]]
    baseline_rows = [
        {"single-c1": _row(55, 1, 17.0), "batch32-c4": _row(6, 32, 600)},
        {"single-c1": _row(52, 1, 18.0, 1), "batch32-c4": _row(6.5, 32, 580)},
    ]
    for round_rows, rows in zip(report["rounds"], baseline_rows, strict=True):
        for name, row in rows.items():
            round_rows[name]["baseline"] = row
    baseline_reference = [
        {"sts-b1": {"batch": 1, "texts_per_s": 100.0, "p50_ms": 9.0},
         "sts-b32": {"batch": 32, "texts_per_s": 200.0, "p50_ms": 160.0}},
        {"sts-b1": {"batch": 1, "texts_per_s": 104.0, "p50_ms": 8.8},
         "sts-b32": {"batch": 32, "texts_per_s": 208.0, "p50_ms": 150.0}},
    ]  # fmt: skip
    report["systems"]["embedkit"] |= {"artifact": "/m/default", "variant": "openvino-bf16"}
    report["systems"]["baseline"] = {
        "artifact": "/m/fp32",
        "variant": "fp32",
        "url": "started by the benchmark",
    }
    report["parity_baseline"] = {**report["parity"], "min_cosine": 1.0, "mean_cosine": 1.0}
    report["in_process_baseline"] = baseline_reference
    report["summary"] = peers.summarize(
        report["rounds"], report["in_process"], workloads, baseline_reference
    )
    return report


def test_without_a_baseline_there_is_no_second_table() -> None:
    report = _report()
    assert all("baseline" not in e and "vs_baseline" not in e for e in report["summary"].values())
    assert peers.baseline_rows(report["summary"]) == []
    md = peers.markdown(report)
    assert "baseline" not in md and "who goes first alternates by round" in md


def test_baseline_ratios_are_per_round_and_its_share_is_of_its_own_engine() -> None:
    summary = _baseline_report()["summary"]
    single, bulk = summary["single-c1"], summary["batch32-c4"]
    assert single["baseline"]["req_per_s"] == [52, 55] and single["baseline"]["errors"] == 1
    # Round by round: 110/55 and 104/52; 55/88 and 52/80; the default's own ratio unchanged.
    assert single["vs_baseline"] == pytest.approx([2.0, 2.0])
    assert single["baseline_ratio"] == pytest.approx([0.625, 0.65])
    assert single["ratio"] == pytest.approx([1.25, 1.3])
    # 55/100 and 52/104: against the baseline's engine, not the default's (200, 208).
    assert single["baseline"]["of_in_process"] == pytest.approx([0.5, 0.55])
    assert single["embedkit"]["of_in_process"] == pytest.approx([0.5, 0.55])
    assert bulk["vs_baseline"] == pytest.approx([2.0, 2.0])  # 12/6, 13/6.5
    assert bulk["baseline_ratio"] == pytest.approx([0.75, 1.0])  # 6/8, 6.5/6.5
    assert bulk["baseline"]["of_in_process"] == pytest.approx([0.96, 1.0])  # 192/200, 208/208


def test_baseline_table_and_markdown() -> None:
    report = _baseline_report()
    # The first table is the one a run without a baseline prints.
    assert peers.table_rows(report["summary"]) == peers.table_rows(_report()["summary"])
    rows = peers.baseline_rows(report["summary"])
    assert all(len(r) == len(peers.BASELINE_COLUMNS) for r in rows)
    assert rows == [
        ["1 text/req, c=1", "104–110 req/s", "52–55 req/s", "2.00×", "0.62–0.65×",
         "1.25–1.30×", "17.0–18.0 / 34.0–36.0, 1 errors", "50–55 % of b1", "4.00"],
        ["32 texts/req, c=4", "384–416 texts/s (12.0–13.0 req/s)",
         "192–208 texts/s (6.0–6.5 req/s)", "2.00×", "0.75–1.00×", "1.50–2.00×",
         "580.0–600.0 / 1160.0–1200.0", "96–100 % of b32", "4.00"],
    ]  # fmt: skip
    md = peers.markdown(report, command="scripts/bench-peers --baseline-artifact /m/fp32")
    for needle in (
        "# embedkit and a baseline beside Infinity, one run",
        "embedkit serves openvino-bf16 (/m/default); baseline: a second embedkit server, "
        "same settings, serving fp32 (/m/fp32)",
        "the order (embedkit, baseline, Infinity) rotates by one each round",
        "through embedkit and Infinity: min cosine 0.999999",
        "## embedkit (openvino-bf16) beside the baseline (fp32), same run",
        "| workload | embedkit | baseline | embedkit ÷ baseline | baseline ÷ Infinity | "
        "embedkit ÷ Infinity |",
        "| 1 text/req, c=1 | 104–110 req/s | 52–55 req/s | 2.00× | 0.62–0.65× | 1.25–1.30× |",
        "Parity of the baseline: the same 64 texts through it and Infinity: min cosine 1.000000",
        "| sts-b32 | 200.0–208.0 | 150.0–160.0 |",  # the baseline's engine
        "| sts-b32 | 416.0 | 70.0–72.0 |",  # the default's engine, as before
    ):
        assert needle in md, needle
    assert md.count("\n| 1 text/req, c=1 |") == 2  # once per table


def test_rounds_rotate_the_order_of_every_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each server gets the same settle + measured turn per workload; who goes first
    rotates by round (with two servers it alternates, as before a baseline existed)."""
    calls: list[tuple[str, str]] = []

    def fake_wrk(wrk: str, target: peers.Target, *_: object) -> dict[str, Any]:
        calls.append(("wrk", target.name))
        return {"req_per_s": 1.0, "texts_per_s": 1.0, "p50_ms": 1.0, "p95_ms": 1.0, "errors": 0}

    monkeypatch.setattr(peers, "run_wrk", fake_wrk)
    monkeypatch.setattr(peers, "_settle", lambda _w, t, *_: calls.append(("settle", t.name)))
    monkeypatch.setattr(peers, "wait_idle", lambda pid: 0.0)
    w = peers.WORKLOADS["single-c1"]
    plan = peers.PhasePlan("wrk", Path("s.lua"), {w.name: Path("b")}, 1, 1, "m")
    names = ("embedkit", "baseline", "infinity")
    targets = {n: peers.Target(n, f"http://{n}", None) for n in names}
    refs: dict[str, peers.Reference] = {
        "embedkit": lambda: {"a": {}},
        "baseline": lambda: {"b": {}},
    }
    results, measured = peers.alternate(plan, targets, [w], 3, references=refs, say=print)
    assert calls[6:12] == [(k, n) for n in ("baseline", "infinity", "embedkit")
                           for k in ("settle", "wrk")]  # fmt: skip
    assert [calls[6 * r][1] for r in range(3)] == list(names)
    assert measured == {"embedkit": [{"a": {}}] * 3, "baseline": [{"b": {}}] * 3}
    assert all(set(r[w.name]) == set(names) for r in results)

    calls.clear()
    two = {n: targets[n] for n in peers.SYSTEMS}
    results, measured = peers.alternate(plan, two, [w], 2, references={}, say=print)
    assert [n for k, n in calls if k == "wrk"] == ["embedkit", "infinity", "infinity", "embedkit"]
    assert measured == {}


def test_cosine_parity() -> None:
    a = np.eye(3, 4)
    assert peers.cosine_parity(a, a * 2) == {"texts": 3, "min_cosine": 1.0, "mean_cosine": 1.0}
    b = a.copy()
    b[1] *= -1
    assert peers.cosine_parity(a, b)["min_cosine"] == pytest.approx(-1.0)
    with pytest.raises(ContractViolation, match="different shapes"):
        peers.cosine_parity(a, a[:2])


def _one_line_error(args: list[str], needle: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert "Traceback" not in res.output


def test_bench_peers_refuses_bad_input_on_one_line() -> None:
    res = runner.invoke(app, ["bench-peers", "--help"])
    assert res.exit_code == 0 and "embedkit bench-peers" in res.output
    _one_line_error(["bench-peers", "--workloads", "single-c1,nope"], "unknown workload nope")
    _one_line_error(["bench-peers", "--url", "http://example.com"], "loopback only")
    _one_line_error(["bench-peers", "--url", "http://127.0.0.1:9"], "no server answers at")
    _one_line_error(["bench-peers", "--env", "NOEQUALS"], "--env takes KEY=VALUE")
