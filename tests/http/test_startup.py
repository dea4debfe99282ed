"""Startup refuses a tampered or missing artifact with one clear log line."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def assert_held_but_never_ready(server, seconds: float = 5.0) -> None:
    """The refusing server still holds its port but /readyz never answers 200.

    BentoML's arbiter keeps the socket while the refused workers exit, so a probe is
    accepted and gets no answer (a timeout) or a non-200. A closed port fails: it means
    no server ran at all, which would prove nothing about refusing the artifact.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, "the server exited instead of holding its port"
        try:
            status = httpx.get(server.url + "/readyz", timeout=2).status_code
        except httpx.ConnectError as exc:
            pytest.fail(f"port closed ({exc}): no server was running to refuse anything")
        except httpx.TimeoutException:
            status = None  # accepted, no worker to answer
        assert status != 200, "a refused artifact became ready"
        time.sleep(0.5)


def test_tampered_artifact_stops_startup(fp32_artifact, launcher) -> None:
    import bentoml

    from embedkit.model.artifact import register

    tag = register(fp32_artifact)  # a fresh version: the shared one stays intact
    with open(Path(bentoml.models.get(tag).path) / "tokenizer.json", "a") as fh:
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
