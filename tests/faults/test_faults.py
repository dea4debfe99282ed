"""Fault injection against real servers: each fault a test, each with its visible signal.

- a tampered artifact (one flipped byte in the graph) never serves: startup refused,
  one log line, ``embedkit_model_load_failures_total``;
- signatures required: an unsigned artifact is refused, a signed one serves;
- a missing execution provider: fallback shown in /info and metrics, or refusal in
  strict mode;
- the Embedder worker killed mid-load: in-flight requests succeed or fail cleanly
  (OpenAI error body), BentoML restarts the worker and the service recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from tests.servers import CUDA_FIRST, assert_held_but_never_ready, engine_worker

from embedkit_bench import loadtest as lt

MODEL = "all-minilm-l6-v2"
REFUSED = "embedkit refuses to start"


def counters(name: str) -> dict[str, float]:
    """A counter summed from BentoML's prometheus multiprocess dir (cleaned at each
    `bentoml serve` start, so it holds only the latest server's processes): what a
    scrape would show, readable even when no worker is up to serve /metrics."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=os.environ["BENTOML_HOME"] + "/prometheus_multiproc_dir")
    out: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                key = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[key] = out.get(key, 0.0) + sample.value
    return out


def fresh_version(artifact_dir: Path) -> tuple[str, Path]:
    """Register ``artifact_dir`` as a new model version; its tag and store path."""
    import bentoml

    from embedkit.model.artifact import Artifact, register

    tag = register(Artifact.load(artifact_dir, verify=False))
    return tag, Path(bentoml.models.get(tag).path)


def embed_one(url: str, text: str) -> np.ndarray:
    r = httpx.post(url + "/embed/query", json={"texts": [text]}, timeout=60)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["embeddings"][0], np.float32)


# --- integrity and trust ------------------------------------------------------------------


def test_one_flipped_byte_in_the_graph_refuses_startup(
    fp32_artifact, launcher, spoilable_version
) -> None:
    tag, stored = spoilable_version(fp32_artifact.path)
    graph = stored / "model.onnx"
    with open(graph, "r+b") as fh:  # one bit of one weight byte, mid-file
        fh.seek(graph.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))
    server = launcher.start(tag, ready=False)
    line = server.wait_for_line(REFUSED)
    assert "checksum mismatch for model.onnx" in line and "refusing to load" in line
    assert_held_but_never_ready(server)
    failures = counters("embedkit_model_load_failures_total")
    assert failures.get("reason=checksum_mismatch", 0) >= 1, failures


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from embedkit.model import signing

    d = tmp_path_factory.mktemp("keys")
    signing.generate_keypair(d / "release.key", d / "release.pub")
    return d / "release.key", d / "release.pub"


def test_signature_required_refuses_unsigned_serves_signed(
    fp32_artifact,
    launcher,
    keys,
    corpus,
    tmp_path,
) -> None:
    import shutil

    from embedkit.model import signing

    private, public = keys
    env = {"EMBEDKIT_REQUIRE_SIGNATURE": "true", "EMBEDKIT_TRUSTED_KEYS": json.dumps([str(public)])}
    unsigned, _ = fresh_version(fp32_artifact.path)
    refused = launcher.start(unsigned, env, ready=False)
    line = refused.wait_for_line(REFUSED)
    assert "is not signed" in line
    assert_held_but_never_ready(refused)
    assert counters("embedkit_model_load_failures_total").get("reason=signature_error", 0) >= 1

    copy = tmp_path / "signed"
    shutil.copytree(fp32_artifact.path, copy)
    signing.sign(copy, private)
    signed, _ = fresh_version(copy)
    server = launcher.start(signed, env)
    got = embed_one(server.url, corpus.texts[0])
    want = corpus.expected([0], dimensions=None, normalize=True)[0]
    assert np.abs(got - want).max() <= lt.TOLERANCE
    assert httpx.get(server.url + "/info", timeout=30).json()["tag"] == signed


# --- execution providers ---------------------------------------------------------------------


def test_missing_provider_falls_back_visibly(fallback_server) -> None:
    """CUDA asked for first on a CPU-only onnxruntime: CPU serves, and says so."""
    server = fallback_server
    provider = httpx.get(server.url + "/info", timeout=30).json()["provider"]
    assert provider["fallback"] is True and provider["active"][0] == "CPUExecutionProvider"
    assert "CUDAExecutionProvider" in provider["reason"]
    assert re.search(
        r'embedkit_provider_fallback_total\{active="CPUExecutionProvider",'
        r'requested="CUDAExecutionProvider"\} [1-9]',
        server.metrics(),
    ), "fallback not counted"
    assert "execution provider fallback" in server.log_text()
    embed_one(server.url, "still serving on CPU")


def test_missing_provider_in_strict_mode_refuses_startup(model_tag, launcher) -> None:
    env = {"EMBEDKIT_PROVIDERS": CUDA_FIRST, "EMBEDKIT_STRICT_PROVIDERS": "true"}
    server = launcher.start(model_tag, env, ready=False)
    line = server.wait_for_line(REFUSED)
    assert "strict provider routing" in line and "CUDAExecutionProvider" in line
    assert_held_but_never_ready(server)


# --- a worker killed under load -----------------------------------------------------------------


@pytest.mark.parametrize("topology", ["single", "split"])
def test_engine_worker_killed_mid_load_restarts_and_recovers(
    topology, model_tag, launcher, corpus
) -> None:
    server = launcher.start(model_tag, {"EMBEDKIT_TOPOLOGY": topology})
    victim = engine_worker(server).pid

    async def scenario() -> list[lt.Outcome]:
        load = asyncio.create_task(
            lt.closed_loop(server.url, corpus, duration_s=12, concurrency=4, model=MODEL)
        )
        await asyncio.sleep(3)
        os.kill(victim, signal.SIGKILL)
        return await load

    out = asyncio.run(scenario())
    # In flight during the kill: answered right, or a clean error in our shape — never a
    # wrong vector, a dropped connection or a foreign body.
    assert sum(o.wrong for o in out) == 0
    # split: the front outlives the Embedder and answers in our shape. single: the killed
    # worker held the connections, which reset (what a crashed pod does) — still never a
    # foreign body, and the listening socket (the arbiter's) keeps taking new ones.
    reset_ok = topology == "single"
    bad = [
        o
        for o in out
        if o.status != 200 and ((o.status == 0 and not reset_ok) or o.error == "non-openai-body")
    ]
    assert not bad, bad[:5]
    assert sum(o.status == 0 for o in out) <= 4  # at most the requests in flight at the kill
    assert {o.status for o in out} <= {200, 429, 500, 503, 504} | ({0} if reset_ok else set())
    # BentoML restarts the worker; the service answers correctly again.
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(AssertionError, httpx.HTTPError):
            got = embed_one(server.url, corpus.texts[1])
            break
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(1)
    assert engine_worker(server).pid != victim and server.proc.poll() is None
    assert (
        np.abs(got - corpus.expected([1], dimensions=None, normalize=True)[0]).max() <= lt.TOLERANCE
    )
    # Normal service again: right vectors, no errors but deliberate shedding (the new
    # worker's dispatcher serves its first calls unbatched, so a query may hit its deadline).
    after = asyncio.run(
        lt.closed_loop(server.url, corpus, duration_s=4, concurrency=4, model=MODEL)
    )
    report = lt.summarize(after, 4)
    assert report.wrong_vectors == 0 and set(report.by_status) <= {"200", "429"}, report.by_status
    assert report.by_status.get("200", 0) >= 0.9 * report.requests, report.by_status
