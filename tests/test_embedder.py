"""The Embedder's core: a real engine over merged batches, and the metrics each batch records."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit.runtime.engine import Engine
from embedkit.serve.engine.embedder import EmbedderCore


def _buckets(name: str) -> dict[str, float]:
    """Cumulative bucket counts of one of our histograms, by upper bound."""
    return {
        s.labels["le"]: s.value
        for metric in REGISTRY.collect()
        for s in metric.samples
        if s.name == f"{name}_bucket"
    }


def test_each_sub_batch_is_recorded_with_its_own_size(fp32_artifact: Artifact) -> None:
    """Four texts cut 3 + 1 (caller order, at most 3 per run) must land in the histograms
    as one run of 3 and one of 1 — not two runs of the mean, 2."""
    settings = Settings(
        providers=["CPUExecutionProvider"], token_aware_batching=False, max_sub_batch_size=3
    )
    core = EmbedderCore(fp32_artifact, settings)
    short, long = [101, 2000, 102], [101, *range(2000, 2018), 102]  # 3 and 20 tokens
    ids = [short, short, short, long]  # runs padded to 3×3 = 9 and 1×20 = 20 tokens
    sizes, tokens = _buckets("embedkit_sub_batch_size"), _buckets("embedkit_sub_batch_tokens")
    vectors = core.embed([(time.time(), row) for row in ids], "bulk")
    size_delta = {
        le: v - sizes.get(le, 0.0) for le, v in _buckets("embedkit_sub_batch_size").items()
    }
    token_delta = {
        le: v - tokens.get(le, 0.0) for le, v in _buckets("embedkit_sub_batch_tokens").items()
    }
    assert (size_delta["1.0"], size_delta["2.0"], size_delta["4.0"]) == (1, 1, 2)
    assert (token_delta["16.0"], token_delta["32.0"]) == (1, 2)
    want, _ = Engine(fp32_artifact, settings).embed_ids(ids)
    np.testing.assert_allclose(vectors, want, atol=1e-6)


class _GatedCore:
    """Stands in for EmbedderCore's ``embed``: records the order of runs; the first run
    holds the ORT thread until released, so the others queue behind it."""

    def __init__(self) -> None:
        import threading

        self.order: list[str] = []
        self.release = threading.Event()

    def embed(self, items, lane: str) -> np.ndarray:
        tag = items[0][1][0]
        if not self.order:
            self.release.wait(10)
        self.order.append(f"{lane}:{tag}")
        if tag == -1:
            raise ValueError("failed run")
        return np.full((len(items), 2), len(self.order), np.float32)


def test_single_process_embedder_runs_queries_before_waiting_bulk_calls() -> None:
    import asyncio

    from embedkit.serve.engine.embedder import LocalEmbedder

    core = _GatedCore()
    local = LocalEmbedder(core)  # type: ignore[arg-type]

    async def scenario() -> list[object]:
        first = asyncio.ensure_future(local.embed_bulk([(0.0, [1])]))
        await asyncio.sleep(0.05)  # b1 holds the thread
        calls = [
            local.embed_bulk([(0.0, [2])]),
            local.embed_bulk([(0.0, [-1])]),
            local.embed_query([(0.0, [10]), (0.0, [10])]),
        ]
        pending = [asyncio.ensure_future(c) for c in calls]
        cancelled = asyncio.ensure_future(local.embed_bulk([(0.0, [99])]))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        core.release.set()
        return await asyncio.gather(first, *pending, return_exceptions=True)

    b1, b2, boom, q1 = asyncio.run(scenario())
    assert isinstance(b1, np.ndarray) and b1[0, 0] == 1
    # The query overtook both bulk calls queued before it; the cancelled call never ran.
    assert core.order == ["bulk:1", "query:10", "bulk:2", "bulk:-1"]
    assert isinstance(q1, np.ndarray) and q1.shape == (2, 2) and q1[0, 0] == 2
    assert isinstance(b2, np.ndarray) and b2[0, 0] == 3
    assert isinstance(boom, ValueError)  # a failed run fails only its own call


class _EchoCore:
    """Returns each row's first token id as its vector; records the rows of each run."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []

    def embed(self, items, lane: str) -> np.ndarray:
        self.runs.append([row[0] for _, row in items])
        return np.array([[row[0], len(row)] for _, row in items], np.float32)


def test_a_big_call_is_split_by_length_across_runs_and_reassembled_in_order() -> None:
    import asyncio

    from embedkit.serve.engine.embedder import LocalEmbedder

    core = _EchoCore()
    local = LocalEmbedder(core, runs=2)  # type: ignore[arg-type]
    rows = [[i] * (1 + (i * 7) % 13) for i in range(40)]  # lengths 1..13, shuffled
    out = asyncio.run(local.embed_bulk([(0.0, row) for row in rows]))
    assert out[:, 0].tolist() == list(range(40))  # the caller's order
    assert len(core.runs) == 2 and sorted(i for run in core.runs for i in run) == list(range(40))
    short, long = sorted(core.runs, key=len, reverse=True)  # similar tokens: more short rows
    assert max(len(rows[i]) for i in short) <= min(len(rows[i]) for i in long)
    small = asyncio.run(local.embed_query([(0.0, [5])] * 15))  # under 2 × SPLIT_ROWS: one run
    assert small.shape == (15, 2) and len(core.runs) == 3


class _ModelCore:
    """One model's stand-in core on a shared recorder: the first run of any model holds
    the (one) ORT thread until released; each vector is the row's first token id."""

    def __init__(self, name: str, order: list[str], release) -> None:
        self.name, self.order, self.release = name, order, release

    def embed(self, items, lane: str) -> np.ndarray:
        tag = items[0][1][0]
        if not self.order:
            self.release.wait(10)
        self.order.append(f"{self.name}:{lane}:{tag}")
        return np.array([[row[0]] for _, row in items], np.float32)


def test_several_models_share_the_runner_threads_by_model_and_lane() -> None:
    """Interactive lanes of every model before any bulk lane, round-robin between models
    of one lane, on the one thread all models share; each caller gets its own model's
    vectors."""
    import asyncio
    import threading

    from embedkit.serve.engine.embedder import LocalEmbedder

    order: list[str] = []
    release = threading.Event()
    cores = {name: _ModelCore(name, order, release) for name in ("a", "b")}
    local = LocalEmbedder(cores, runs=1)  # type: ignore[arg-type]
    a, b = local.for_model("a"), local.for_model("b")

    async def scenario() -> list[np.ndarray]:
        first = asyncio.ensure_future(a.embed_bulk([(0.0, [1])]))
        await asyncio.sleep(0.05)  # a's bulk call holds the one thread
        calls = [
            a.embed_bulk([(0.0, [2])]),
            a.embed_bulk([(0.0, [3])]),
            b.embed_bulk([(0.0, [4])]),
            a.embed_query([(0.0, [5])]),
            a.embed_query([(0.0, [6])]),
            b.embed_query([(0.0, [7])]),
            b.embed_bulk([(0.0, [8])]),
        ]
        pending = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, *pending)

    results = asyncio.run(scenario())
    assert order == [
        "a:bulk:1",
        # queries first, alternating between the models that have one waiting
        "a:query:5",
        "b:query:7",
        "a:query:6",
        # then bulk, alternating, starting after the model whose bulk call ran last
        "b:bulk:4",
        "a:bulk:2",
        "b:bulk:8",
        "a:bulk:3",
    ]
    assert [int(r[0, 0]) for r in results] == [1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(KeyError):
        local.for_model("c")


# --- a force-registered rejected variant never serves ---------------------------------------


def test_a_rejected_variant_is_refused_even_when_named(fp32_artifact: Artifact) -> None:
    """docs/service.md: class ``rejected`` serves never — not even when forced into the
    store and named with EMBEDKIT_VARIANT on the machine that measured it."""
    from embedkit.model import toolchain
    from embedkit.model.artifact import MeasuredOn
    from embedkit.serve.engine.startup import refusal

    isa, runtime = toolchain.detect_isa().level, toolchain.runtime_version()
    parent = fp32_artifact.manifest
    rejected = parent.model_copy(
        update={
            "format_version": 3,
            "quantization": parent.quantization.model_copy(
                update={
                    "mode": "dynamic-int8",
                    "variant": "forced-int8",
                    "approved": False,
                    "forced": True,
                    "compatibility": "rejected",
                    "measured_on": MeasuredOn(
                        parent_sha256=parent.files["model.onnx"], isa=isa, version=runtime
                    ),
                }
            ),
        }
    )
    assert rejected.compatibility == "rejected"
    for settings in (Settings(), Settings(variant="forced-int8")):
        reason = refusal(rejected, settings, isa=isa, runtimes={"onnxruntime": runtime})
        assert reason is not None, "a rejected variant passed the startup check"
        assert reason[0] == "rejected"
        assert "forced-int8" in reason[1] and "class rejected" in reason[1]


def test_the_embedder_serves_the_parent_of_a_forced_rejected_variant(
    fp32_artifact: Artifact, model_tag: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The real startup path: a planted variant stamped ``rejected`` with ``force`` is
    refused (one log line, a metric) and its fp32 parent serves."""
    from tests.planted import plant

    from embedkit.core import metrics
    from embedkit.model import toolchain
    from embedkit.model.artifact import MeasuredOn, seal
    from embedkit.quality.gate import GateThresholds, GateVerdict, with_verdict

    root = tmp_path_factory.mktemp("rejected")
    copy = plant(fp32_artifact, "copy", root / "copy")
    verdict = GateVerdict(
        approved=False,
        compatibility="rejected",
        failures=[],
        segments_checked=1,
        measured_on=MeasuredOn(
            parent_sha256=fp32_artifact.manifest.files["model.onnx"],
            isa=toolchain.detect_isa().level,
            version=toolchain.runtime_version(),
        ),
    )
    thresholds = GateThresholds(spearman_drop_max={}, cosine_p1_min=0.99, overlap_min=0.95)
    art = seal(
        with_verdict(copy, verdict, force=True, name="forced-rejected", thresholds=thresholds)
    )
    assert art.manifest.quantization.forced and art.manifest.compatibility == "rejected"
    counter = metrics.get().variant_refusals.labels(variant="forced-rejected", reason="rejected")
    before = float(counter._value.get())
    core = EmbedderCore(art, Settings(variant="forced-rejected"))
    # The parent is found in the store by its model.onnx checksum: any registered version
    # of that fp32 graph (other tests in the session may register one beside model_tag).
    parent = fp32_artifact.manifest.files["model.onnx"]
    assert core.artifact.tag is not None and core.artifact.manifest.files["model.onnx"] == parent
    assert core.identity.variant == "fp32" and core.artifact.path != art.path
    assert "forced-rejected" in (core.identity.refused or "")
    assert "class rejected" in (core.identity.refused or "")
    assert float(counter._value.get()) == before + 1


def test_a_spoiled_copy_of_the_parent_is_skipped_for_an_intact_one(
    fp32_artifact: Artifact, caplog, tmp_path
) -> None:
    """Every fp32 version with the variant's parent checksum is the parent: the newest one,
    spoiled in the store, is skipped (one line, a counted load failure) and an intact one
    serves; with none intact, the newest one's error stops startup. The parent is the
    default export under a name of its own, so no other test's copies take part (nor see
    the spoiled one)."""
    import logging
    import shutil

    import bentoml
    from tests.planted import plant, stamped

    from embedkit.core import metrics
    from embedkit.core.errors import ChecksumMismatch
    from embedkit.model.artifact import finalize, register
    from embedkit.serve.engine.startup import find_parent

    shutil.copytree(
        fp32_artifact.path, tmp_path / "own", ignore=lambda *_: ["manifest.json", "manifest.sig"]
    )
    fields = fp32_artifact.manifest.model_dump(mode="json", exclude={"files", "created_at"})
    own = finalize(tmp_path / "own", {**fields, "name": "spoiled-parent"})
    variant = stamped(own, plant(own, "copy", tmp_path / "copy"), tmp_path / "v", "reindex")
    intact, spoiled = register(own), register(own)

    def spoil(tag: str) -> None:
        graph = Path(bentoml.models.get(tag).path) / "model.onnx"
        graph.write_bytes(graph.read_bytes()[:-1] + b"\0")

    try:
        spoil(spoiled)
        failures = metrics.get().model_load_failures.labels(reason="checksum_mismatch")
        before = float(failures._value.get())
        with caplog.at_level(logging.ERROR):
            assert find_parent(variant).tag == intact
        (line,) = [r.getMessage() for r in caplog.records if "skips fp32 parent" in r.getMessage()]
        assert spoiled in line and "checksum mismatch for model.onnx" in line
        assert float(failures._value.get()) == before + 1
        spoil(intact)
        with pytest.raises(ChecksumMismatch, match=spoiled.partition(":")[2]):
            find_parent(variant)
    finally:
        for tag in (intact, spoiled):
            bentoml.models.delete(tag)
