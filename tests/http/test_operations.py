"""Operating the service, against one real server: `embedkit reembed` and the shipped
alerts and dashboard.

The server asks for CUDA first on this CPU-only onnxruntime (non-strict), so it serves on
the CPU — the same vectors — and exports `embedkit_provider_fallback_total`, which an
alert names. `embedkit reembed` is killed with SIGKILL mid-run twice and resumed: every
document ends up in the output exactly once, each vector equal to the in-process engine's
at the HTTP parity tolerance. Bad lines are named and skipped or stop the run; an output
made by another served identity is refused. Every metric the alert rules and the
dashboard name is then looked up in this server's /metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests import monitoring
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.model import evaldata
from embedkit.serve.engine.identity import HEADER
from embedkit_bench import loadtest as lt

# Counted only when their event happens (a refused model, a refused variant, a tenant over
# its quota): this server has none, so they are checked against the declared metrics; the
# tests named show them in a live server's metrics.
EVENT_ONLY = {
    "embedkit_model_load_failures_total": "tests/faults/test_faults.py",
    "embedkit_variant_refusals_total": "tests/http/test_served_class.py",
    "embedkit_quota_rejections_total": "tests/http/test_tenants.py",
    "embedkit_quota_store_up": "tests/test_quota_store.py",  # only with EMBEDKIT_QUOTA_STORE
}


@pytest.fixture(scope="module")
def server(fallback_server):
    """The session's server with CUDA asked for first (the CPU serves after a fallback)."""
    return fallback_server


@pytest.fixture(scope="module")
def served_header(server) -> str:
    return str(httpx.post(server.url + "/embed", json={"texts": ["x"]}, timeout=60).headers[HEADER])


def sentences(n: int) -> list[str]:
    seen = dict.fromkeys(
        s.strip() for p in evaldata.sts("test") for s in (p.sentence1, p.sentence2) if s.strip()
    )
    return list(seen)[:n]


def write_corpus(path: Path, texts: list[str]) -> list[str]:
    ids = [f"s{i}" for i in range(len(texts))]
    path.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts, strict=True))
    )
    return ids


def done_chunks(out: Path) -> int:
    try:
        state = json.loads((out / "reembed.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(last - first + 1 for first, last in state["done"])


def reembed_process(corpus: Path, out: Path, url: str) -> subprocess.Popen[bytes]:
    args = [str(corpus), "--out", str(out), "--url", url, "--chunk-size", "8"]
    return subprocess.Popen(
        [sys.executable, "-m", "embedkit.cli", "reembed", *args],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def kill_after(proc: subprocess.Popen[bytes], out: Path, chunks: int) -> int:
    """SIGKILL ``proc`` once the checkpoint records ``chunks`` chunks; how many it held."""
    deadline = time.monotonic() + 120
    while done_chunks(out) < chunks:
        assert proc.poll() is None, f"reembed ended before the kill: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    return done_chunks(out)


def read_output(out: Path) -> tuple[list[str], np.ndarray]:
    ids, rows = [], []
    shards: dict[str, np.ndarray] = {}
    for line in (out / "index.jsonl").read_text().splitlines():
        entry = json.loads(line)
        ids.append(entry["id"])
        shard = shards.setdefault(entry["file"], np.load(out / entry["file"]))
        rows.append(shard[entry["row"]])
    return ids, np.array(rows)


def test_reembed_killed_twice_and_resumed_embeds_every_document_once(
    server, served_header: str, fp32_artifact, tmp_path: Path
) -> None:
    from embedkit.runtime.engine import Engine

    texts = sentences(800)
    ids = write_corpus(tmp_path / "corpus.jsonl", texts)
    out = tmp_path / "out"
    total = len(texts) // 8
    held = 0
    for at_least in (5, 25):  # two crashes, the second after a resume
        held = kill_after(
            reembed_process(tmp_path / "corpus.jsonl", out, server.url), out, at_least
        )
        assert held < total, "killed too late to test anything"
    state = json.loads((out / "reembed.json").read_text())
    assert not state["complete"]

    final = reembed_process(tmp_path / "corpus.jsonl", out, server.url)
    stdout, stderr = final.communicate(timeout=600)
    assert final.returncode == 0, stderr.decode()[-2000:]
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    # Only what the checkpoint lacked was sent again (chunks written but not yet
    # recorded at the kill are redone, their files replaced).
    assert summary["chunks_resumed"] >= held
    assert summary["embedded"] == len(texts) - 8 * summary["chunks_resumed"]
    assert summary["documents"] == len(texts) and summary["rejected"] == 0

    got_ids, got = read_output(out)
    assert got_ids == ids  # each document once, in input order
    assert len(list((out / "chunks").glob("*.npy"))) == total
    assert not list((out / "chunks").glob(".*.tmp"))  # a killed run's half-files are gone
    want = Engine(fp32_artifact).encode(texts)
    assert np.abs(got - want).max() <= lt.TOLERANCE
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.99999
    for side in (out / "chunks").glob("*.json"):
        assert json.loads(side.read_text())["served"] == served_header
    assert json.loads((out / "reembed.json").read_text())["served"] == served_header


BAD = {5: "{oops", 12: '{"id": "s1", "text": "the same id again"}', 13: '{"id": "x"}'}


def bad_corpus(path: Path) -> None:
    lines = [json.dumps({"id": f"s{i}", "text": t}) for i, t in enumerate(sentences(20))]
    for lineno, raw in BAD.items():
        lines.insert(lineno - 1, raw)
    path.write_text("\n".join(lines) + "\n")


def test_reembed_skips_bad_lines_naming_each(server, tmp_path: Path) -> None:
    bad_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "out"
    args = ["reembed", str(tmp_path / "corpus.jsonl"), "--out", str(out), "--url", server.url]
    result = CliRunner().invoke(app, [*args, "--chunk-size", "4"])
    assert result.exit_code == 0, result.output
    for lineno in BAD:
        assert f"corpus.jsonl line {lineno}: " in result.output
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"].split(" ")[0]) for r in rejects] == [
        (5, "not"),
        (12, "duplicate"),
        (13, "no"),
    ]
    ids, vectors = read_output(out)
    assert ids == [f"s{i}" for i in range(20)] and vectors.shape == (20, 384)


def test_reembed_stops_on_a_bad_line_when_told(server, tmp_path: Path) -> None:
    bad_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "out"
    args = ["reembed", str(tmp_path / "corpus.jsonl"), "--out", str(out), "--url", server.url]
    result = CliRunner().invoke(app, [*args, "--chunk-size", "4", "--on-bad-line", "stop"])
    assert result.exit_code == 1
    assert "error: " in result.output and "corpus.jsonl line 5: not JSON" in result.output
    assert json.loads((out / "reembed.json").read_text())["done"] == [[0, 0]]
    assert not (out / "index.jsonl").exists()


def test_reembed_refuses_output_of_another_served_identity(server, tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus.jsonl", sentences(6))
    out = tmp_path / "out"
    args = ["reembed", str(tmp_path / "corpus.jsonl"), "--out", str(out), "--url", server.url]
    assert CliRunner().invoke(app, args).exit_code == 0
    checkpoint = out / "reembed.json"
    state = json.loads(checkpoint.read_text())
    state["identity"]["version"] = "0000older0000"  # as if an older release made it
    checkpoint.write_text(json.dumps(state))
    shard = (out / "chunks" / "00000000.npy").read_bytes()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "made with all-minilm-l6-v2:0000older0000" in result.output
    assert "vectors of two models must not mix" in result.output
    assert (out / "chunks" / "00000000.npy").read_bytes() == shard


# --- the alerts and the dashboard --------------------------------------------------------------


def declared() -> dict[str, set[str]]:
    """Sample names of our metrics as core/metrics.py declares them → their label names."""
    from embedkit.core import metrics

    m = metrics.get()
    out: dict[str, set[str]] = {}
    for field in m.__dataclass_fields__:
        metric = getattr(m, field)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        for suffix in suffixes.get(metric._type, [""]):
            out[metric._name + suffix] = set(metric._labelnames) | (
                {"le"} if suffix == "_bucket" else set()
            )
    return out


def test_every_metric_in_the_rules_and_dashboard_is_exported(
    server, pytestconfig: pytest.Config
) -> None:
    for path, body in (("/embed", ["a"]), ("/embed/query", ["b"]), ("/embed", [])):
        httpx.post(server.url + path, json={"texts": body}, timeout=60)
    live: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            live.setdefault(sample.name, set()).update(sample.labels)
    known = declared()
    root = pytestconfig.rootpath
    exprs = [r["expr"] for r in monitoring.alerts(root).values()]
    exprs += monitoring.dashboard_queries(monitoring.dashboard(root))
    missing, wrong_labels = [], []
    for expr in exprs:
        for name, labels in monitoring.selectors(expr):
            if name in live:
                have = live[name]
            elif name in EVENT_ONLY and name in known:
                have = known[name]
            else:
                missing.append(name)
                continue
            wrong_labels += [f"{name}{{{x}}}" for x in labels - have - monitoring.SCRAPE_LABELS]
    assert not missing, f"not in a live server's /metrics: {sorted(set(missing))}"
    assert not wrong_labels, f"labels these metrics do not carry: {sorted(set(wrong_labels))}"
    assert "embedkit_provider_fallback_total" in live  # this server fell back on purpose
