"""Startup refuses a tampered or missing artifact with one clear log line."""

from __future__ import annotations

from tests.servers import assert_held_but_never_ready


def test_tampered_artifact_stops_startup(fp32_artifact, launcher, spoilable_version) -> None:
    tag, stored = spoilable_version(fp32_artifact.path)
    with open(stored / "tokenizer.json", "a") as fh:
        fh.write(" ")
    server = launcher.start(tag, ready=False)
    line = server.wait_for_line("embedkit refuses to start")
    assert "checksum mismatch for tokenizer.json" in line
    assert_held_but_never_ready(server)


def test_missing_model_stops_startup(launcher) -> None:
    """BentoML itself resolves the service's BentoModel before starting workers and
    exits naming it; our own check (same line shape as above) backs it up."""
    server = launcher.start("all-minilm-l6-v2:doesnotexist", ready=False)
    line = server.wait_for_line("all-minilm-l6-v2:doesnotexist")
    assert "could not be found" in line or "is not in the BentoML model store" in line
    server.proc.wait(timeout=60)
    assert server.proc.returncode != 0
