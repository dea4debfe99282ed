"""The rollback drill's verdicts and report on recorded inputs, and its command's bad input.

The drill itself (two image builds, two pods under podman) is a documented long run
(docs/deployment.md, "Rollback drill"), not a CI test; nothing here starts podman.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.core.errors import InvalidInput
from embedkit.deploy import drill
from embedkit.serve.engine.identity import ServedIdentity

STABLE = "all-minilm-l6-v2:owbdq2hkr2wmaax4"
CANDIDATE = "all-minilm-l6-v2:7kxqhkxks6t3kax4"


def header(tag: str) -> str:
    name, _, version = tag.partition(":")
    return ServedIdentity(
        name, version, "fp32", "index-compatible", "fp32", "CPUExecutionProvider", "avx2"
    ).header_value()


def test_only_the_stable_version_answering_passes() -> None:
    ok, detail = drill.only_stable_answers(
        STABLE,
        {"pod embedkit-pod": header(STABLE), "candidate's former address 10.88.0.9": None},
        candidate_pod=None,
    )
    assert ok, detail
    assert f"pod embedkit-pod: X-Embedkit-Model: {STABLE}" in detail
    assert "10.88.0.9: no answer" in detail


@pytest.mark.parametrize(
    ("answers", "candidate_pod", "why"),
    [
        ({"pod embedkit-canary-pod": header(CANDIDATE)}, None, "(NOT stable)"),
        ({"pod embedkit-pod": header(STABLE)}, "embedkit-canary-pod", "still runs"),
        ({"pod embedkit-pod": None}, None, "no pod answered"),
        ({"pod embedkit-pod": "all-minilm-l6-v2"}, None, "not an X-Embedkit-Model header"),
    ],
)
def test_the_candidate_or_silence_fails_the_last_step(
    answers: dict[str, str | None], candidate_pod: str | None, why: str
) -> None:
    ok, detail = drill.only_stable_answers(STABLE, answers, candidate_pod)
    assert not ok
    assert why in detail


@pytest.mark.parametrize(
    ("stable", "candidate", "why"),
    [
        ("all-minilm-l6-v2", CANDIDATE, "--stable: 'all-minilm-l6-v2' is not an exact"),
        (STABLE, "all-minilm-l6-v2:latest", "--candidate: 'all-minilm-l6-v2:latest'"),
        (STABLE, STABLE, "are the same version"),
        (STABLE, "other-model:abc", "are different models"),
    ],
)
def test_tags_must_be_two_versions_of_one_model(stable: str, candidate: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why.replace("(", r"\(")):
        drill.check_tags(stable, candidate)


def _recorded(*oks: bool) -> drill.Drill:
    done = drill.Drill(
        STABLE, CANDIDATE, "2026-11-28 00:00 UTC", {"commit": "abc", "clean": True}, "here"
    )
    done.steps = [
        drill.Step(name, ok, f"{name} detail", 1.0)
        for name, ok in zip(drill.STEPS, oks, strict=False)
    ]
    return done


def test_a_drill_passes_only_with_every_step_done_and_ok() -> None:
    assert _recorded(*[True] * len(drill.STEPS)).passed
    assert not _recorded(*[True] * (len(drill.STEPS) - 1)).passed  # stopped early
    assert not _recorded(True, True, True, True, False, True).passed


runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, ["rollback-drill", *args])


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--stable", STABLE, "--candidate", STABLE], "are the same version"),
        (["--stable", "x", "--candidate", CANDIDATE], "is not an exact model version"),
        (["--ready-timeout", "0"], "--ready-timeout must be positive"),
        (["--trusted-key", "/nonexistent/release.pub"], "is not a file"),
    ],
)
def test_bad_input_is_one_line_before_anything_runs(
    args: list[str], why: str, tmp_path: Path
) -> None:
    key = tmp_path / "release.pub"
    key.write_text("not read")
    base = {"--stable": STABLE, "--candidate": CANDIDATE, "--trusted-key": str(key)}
    for option, value in zip(args[::2], args[1::2], strict=True):
        base[option] = value
    result = _invoke(*[x for pair in base.items() for x in pair], "--workdir", str(tmp_path))
    assert result.exit_code == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and why in errors[0], result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert not (tmp_path / "report.txt").exists()


@pytest.mark.parametrize("passed", [True, False])
def test_the_report_is_printed_written_and_sets_the_exit_code(
    passed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = _recorded(*[True] * (len(drill.STEPS) - 1), passed)
    monkeypatch.setattr(drill, "run_drill", lambda *a, **k: recorded)
    key = tmp_path / "release.pub"
    key.write_text("recorded")
    result = _invoke(
        "--stable", STABLE, "--candidate", CANDIDATE, "--trusted-key", str(key),
        "--workdir", str(tmp_path),
    )  # fmt: skip
    assert result.exit_code == (0 if passed else 1), result.output
    written = (tmp_path / "report.txt").read_text()
    word = "PASSED" if passed else "FAILED"
    assert word in written and word in result.output
    for name in drill.STEPS:
        assert name in written
    assert '"passed": ' + ("true" if passed else "false") in (tmp_path / "report.json").read_text()
