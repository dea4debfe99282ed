"""`embedkit canary` against real servers: it promotes the same release and rolls back a
planted candidate whose vectors differ beyond the gate although its label says
index-compatible; a reindex variant or another model is refused on identity alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.planted import plant, stamped
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.deploy.canary import TextSet, rule_for, run_canary
from embedkit.model.artifact import Artifact, register
from embedkit.serve.engine.identity import ServedIdentity

runner = CliRunner()
SMALL = ["--pairs", "48", "--long", "3", "--batch-size", "16"]
# Two servers of one machine, interleaved: latency is not what these tests judge.
LOOSE = ["--max-p95-ratio", "100"]


@pytest.fixture(scope="module")
def planted(launcher, fp32_artifact: Artifact, tmp_path_factory: pytest.TempPathFactory):
    """The `rotated` graph (every vector 0.980 cosine from fp32's) stamped index-compatible:
    a label the measured vectors contradict."""
    root = tmp_path_factory.mktemp("canary")
    rotated = plant(fp32_artifact, "rotated", root / "rotated")
    art = stamped(fp32_artifact, rotated, root / "stamped", "index-compatible")
    return launcher.start(register(art))


def test_same_release_is_promoted(server) -> None:
    res = runner.invoke(
        app, ["canary", "--stable", server.url, "--candidate", server.url, *SMALL, *LOOSE]
    )
    assert res.exit_code == 0, res.output
    assert "same version: identical vectors" in res.output and "PROMOTE" in res.output
    assert "max |Δ| per coordinate" in res.output


def test_planted_candidate_is_rolled_back(server, planted) -> None:
    result = run_canary(server.url, planted.url, texts=TextSet.default(48, 3), max_p95_ratio=100)
    assert result.rule.startswith("index-compatible variant")
    assert result.candidate.identity and result.candidate.identity.variant == (
        "planted-index-compatible"
    )
    assert not result.passed
    failed = {what for what, _, ok in result.checks if not ok}
    assert "p1 cosine to stable" in failed  # cos(0.2) = 0.980 < 0.99
    assert not result.stable.errors and not result.candidate.errors
    res = runner.invoke(
        app, ["canary", "--stable", server.url, "--candidate", planted.url, *SMALL, *LOOSE]
    )
    assert res.exit_code == 1 and "ROLL BACK" in res.output and "p1 cosine" in res.output


def test_reindex_or_another_model_never_shares_the_index() -> None:
    stable = ServedIdentity(
        "all-minilm-l6-v2", "v1", "fp32", "index-compatible", "fp32", "CPUExecutionProvider", "avx2"
    )
    reindex = ServedIdentity(
        "all-minilm-l6-v2", "v2", "int8", "reindex", "fp32", "CPUExecutionProvider", "avx2"
    )
    other = ServedIdentity(
        "bge-small", "v1", "fp32", "index-compatible", "fp32", "CPUExecutionProvider", "avx2"
    )
    for candidate, why in ((reindex, "class reindex"), (other, "another model")):
        rule, refused = rule_for(stable, candidate)
        assert rule == "refused" and refused and why in refused
        assert "separate Service" in refused and "re-index" in refused


def test_bad_urls_get_one_line(server, tmp_path: Path) -> None:
    res = runner.invoke(app, ["canary", "--stable", "localhost:3000", "--candidate", server.url])
    assert res.exit_code == 1 and "is not an http(s) URL" in res.output
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    res = runner.invoke(app, ["canary", "--stable", server.url, "--candidate", closed])
    assert res.exit_code == 1 and "no answer on /info" in res.output
    assert "Traceback" not in res.output
