"""`embedkit bench-peers` without Infinity or wrk: parsing, ratios, table, markdown, errors.

The real run (a venv of its own, two servers, minutes) lives in docs/benchmarks/peers.md;
these check the arithmetic and the entry point's refusals, which need neither.
"""

from __future__ import annotations

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
