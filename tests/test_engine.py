"""Engine: parity with sentence-transformers, token-aware batching, post-processing, bad
input, memory."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedkit.core.errors import (
    EncodingUnavailable,
    InferenceError,
    InputTooLong,
    InvalidDimensions,
    InvalidInput,
)
from embedkit.core.settings import Settings
from embedkit.runtime.engine import Engine, Telemetry, plan_sub_batches
from embedkit.runtime.tokens import pad_batch
from embedkit.runtime.vectors import (
    QUANTIZED,
    RANGED,
    calibrate_ranges,
    encode_codes,
    postprocess,
    quantize,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MIN_COSINE = 0.99999  # fp32 parity thresholds (per vector)
MAX_ABS = 1e-4
THREADS = 2


@pytest.fixture(scope="module")
def engine(fp32_artifact) -> Engine:
    eng = Engine(fp32_artifact, Settings(intra_op_threads=THREADS))
    eng.warmup()
    return eng


@pytest.fixture(scope="module")
def parity_texts(data_dir: Path) -> list[str]:
    """Shuffled STS test sentences plus texts over 256 word pieces (truncated)."""
    from embedkit.model import evaldata

    texts = evaldata.sts_sentences("test")
    random.Random(0).shuffle(texts)
    return texts[:400] + evaldata.long_texts(260, 4) + ["", "Ünïcödé façade — 🙂"]


@pytest.fixture(scope="module")
def parity_reference(reference_vectors, parity_texts: list[str]) -> np.ndarray:
    return reference_vectors(parity_texts)


def _parity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min()), float(np.abs(a - b).max())


@pytest.mark.parametrize("token_aware", [True, False], ids=["token-aware", "pad-to-longest"])
@pytest.mark.parametrize("io_binding", ["on", "off"], ids=["iobinding", "plain"])
def test_parity_with_sentence_transformers(
    fp32_artifact,
    parity_texts: list[str],
    parity_reference: np.ndarray,
    token_aware: bool,
    io_binding: str,
) -> None:
    s = Settings(intra_op_threads=THREADS, token_aware_batching=token_aware, io_binding=io_binding)
    eng = Engine(fp32_artifact, s)
    assert eng.runner.io_binding is (io_binding == "on")
    vectors, tel = eng.encode_with_telemetry(parity_texts)
    assert vectors.dtype == np.float32 and vectors.shape == parity_reference.shape
    min_cos, max_abs = _parity(vectors, parity_reference)
    assert min_cos >= MIN_COSINE, min_cos
    assert max_abs <= MAX_ABS, max_abs
    assert (tel.sub_batches > len(parity_texts) / 64) if token_aware else tel.sub_batches == 7


def test_batched_equals_single_text_runs(engine: Engine, parity_texts: list[str]) -> None:
    texts = parity_texts[:40] + parity_texts[-6:]
    ids = engine.tokenizer.encode(texts)
    together, tel = engine.embed_ids(ids)
    alone = np.vstack([engine.embed_ids([row])[0] for row in ids])
    min_cos, max_abs = _parity(together, alone)
    assert min_cos >= MIN_COSINE and max_abs <= MAX_ABS
    assert tel.sub_batches > 1 and tel.padding_ratio < 1.3


def test_telemetry(engine: Engine) -> None:
    ids = [[101, 2000, 102], [101, 2000, 2001, 2002, 2003, 102], [101, 102]]
    _, tel = engine.embed_ids(ids)
    assert isinstance(tel, Telemetry)
    assert (tel.texts, tel.tokens) == (3, 11)
    assert tel.padded_tokens == sum(tel.sub_batch_padded) >= 11
    assert sum(tel.sub_batch_sizes) == 3 and len(tel.sub_batch_sizes) == tel.sub_batches
    assert tel.padding_ratio == tel.padded_tokens / 11
    assert tel.inference_s > 0 and tel.provider == "CPUExecutionProvider"
    assert json.dumps(tel.as_dict())


def test_info(engine: Engine) -> None:
    info = engine.info()
    assert info["dimension"] == 384 and info["max_length"] == 256
    assert info["providers"]["active"] == ["CPUExecutionProvider"]
    assert info["session"]["intra_op_threads"] == THREADS
    assert info["batching"]["token_aware_batching"] is True
    json.dumps(info)


def test_concurrent_calls_are_consistent(engine: Engine, parity_texts: list[str]) -> None:
    ids = engine.tokenizer.encode(parity_texts[:24])
    expected, _ = engine.embed_ids(ids)
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda: results.append(engine.embed_ids(ids)[0])) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for r in results:
        np.testing.assert_allclose(r, expected, atol=MAX_ABS)


# --- batching plan -------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 256), min_size=1, max_size=150),
    max_tokens=st.integers(1, 2048),
    max_size=st.integers(1, 64),
    cost=st.integers(0, 64),
)
def test_plan_covers_every_text_within_limits(
    lengths: list[int], max_tokens: int, max_size: int, cost: int
) -> None:
    groups = plan_sub_batches(
        lengths, max_tokens=max_tokens, max_size=max_size, run_cost_tokens=cost
    )
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert 1 <= len(g) <= max_size
        assert len(g) == 1 or max(lengths[i] for i in g) * len(g) <= max_tokens


def test_plan_cuts_padding_and_plain_mode_keeps_order() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 45) for _ in range(32)]
    groups = plan_sub_batches(lengths, max_tokens=512, max_size=64, run_cost_tokens=16)
    padded = sum(max(lengths[i] for i in g) * len(g) for g in groups)
    assert padded / sum(lengths) < 1.25 < max(lengths) * 32 / sum(lengths)
    plain = plan_sub_batches(lengths, max_tokens=1, max_size=10, token_aware=False)
    assert plain == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30)), [30, 31]]


def test_pad_batch_is_right_padded() -> None:
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == np.int64


# --- post-processing -------------------------------------------------------------------


def test_postprocess_matryoshka_renormalises() -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(5, 384)).astype(np.float64)
    full = postprocess(raw, normalize=True, dimensions=None, model_dim=384)
    assert full.dtype == np.float32 and np.allclose(np.linalg.norm(full, axis=1), 1, atol=1e-6)
    small = postprocess(raw, normalize=True, dimensions=64, model_dim=384)
    assert small.shape == (5, 64) and np.allclose(np.linalg.norm(small, axis=1), 1, atol=1e-6)
    expected = raw[:, :64] / np.linalg.norm(raw[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(small, expected, atol=1e-6)
    unnorm = postprocess(raw, normalize=False, dimensions=384, model_dim=384)
    np.testing.assert_allclose(unnorm, raw.astype(np.float32))
    zero = postprocess(np.zeros((1, 384)), normalize=True, dimensions=None, model_dim=384)
    assert not zero.any()  # a zero vector stays zero instead of becoming NaN


@pytest.mark.parametrize("encoding", QUANTIZED)
def test_codes_are_sentence_transformers_quantize_embeddings(encoding) -> None:
    from sentence_transformers.util import quantize_embeddings

    rng = np.random.default_rng(0)
    raw = rng.normal(size=(64, 384)).astype(np.float32)
    unit = postprocess(raw, normalize=True, dimensions=None, model_dim=384)
    ranges = calibrate_ranges(unit[:32]).astype(np.float64)  # as the manifest's JSON reads
    want = quantize_embeddings(unit, encoding, ranges=ranges)
    got = encode_codes(raw, encoding, normalize=True, dimensions=None, model_dim=384, ranges=ranges)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    # fewer dimensions: the first codes of the whole unit vector (binary: 100 → 13 bytes)
    few = encode_codes(raw, encoding, normalize=True, dimensions=100, model_dim=384, ranges=ranges)
    sliced = quantize_embeddings(unit[:, :100], encoding, ranges=ranges[:, :100])
    assert np.array_equal(few, sliced)
    assert few.shape[1] == (100 if encoding in RANGED else 13)
    if encoding in RANGED:
        with pytest.raises(EncodingUnavailable):
            quantize(unit, encoding, None)


@pytest.mark.parametrize("dims", [0, -1, 385, 1.5, "64", True])
def test_postprocess_rejects_dimensions(dims: object) -> None:
    with pytest.raises(InvalidDimensions) as err:
        postprocess(np.ones((1, 384)), normalize=True, dimensions=dims, model_dim=384)  # type: ignore[arg-type]
    assert err.value.status == 422 and err.value.param == "dimensions"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_postprocess_refuses_non_finite(bad: float) -> None:
    raw = np.ones((3, 384), dtype=np.float32)
    raw[2, 7] = bad
    with pytest.raises(InferenceError, match="first at index 2"):
        postprocess(raw, normalize=True, dimensions=None, model_dim=384)


# --- bad input through the engine ---------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "error", "match"),
    [
        ([], InvalidInput, "empty list"),
        (None, InvalidInput, "got NoneType"),
        ("a string", InvalidInput, "got str"),
        (["fine", None], InvalidInput, r"input\[1\] is null"),
        (["fine", 42], InvalidInput, r"input\[1\] is a int"),
    ],
)
def test_encode_rejects_bad_texts(engine: Engine, texts: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        engine.encode(texts)  # type: ignore[arg-type]


def test_encode_too_long_without_truncation(engine: Engine) -> None:
    with pytest.raises(InputTooLong, match=r"input\[2\] has 402 tokens") as err:
        engine.encode(["a", "b", "word " * 400], truncate=False)
    assert err.value.status == 413
    assert engine.encode(["word " * 400]).shape == (1, 384)  # truncation on: fine


@pytest.mark.parametrize("dims", [0, -3, 385, 2.5])
def test_encode_rejects_dimensions(engine: Engine, dims: object) -> None:
    with pytest.raises(InvalidDimensions):
        engine.encode(["hello"], dimensions=dims)  # type: ignore[arg-type]


def test_encode_dimensions_and_normalize_options(engine: Engine) -> None:
    v = engine.encode(["hello world", "another one"], dimensions=128)
    assert v.shape == (2, 128) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    raw = engine.encode(["hello world"], normalize=False)
    assert not np.isclose(np.linalg.norm(raw), 1, atol=1e-3)


def test_embed_ids_rejects_bad_ids(engine: Engine) -> None:
    with pytest.raises(InvalidInput, match="empty list"):
        engine.embed_ids([])
    with pytest.raises(InvalidInput, match=r"input\[1\] has no tokens"):
        engine.embed_ids([[101, 102], []])
    with pytest.raises(InputTooLong, match=r"input\[0\] has 300 tokens"):
        engine.embed_ids([[1000] * 300])


# --- serving-path hygiene ------------------------------------------------------------------


def test_engine_never_imports_torch(fp32_artifact) -> None:
    code = (
        "import sys\n"
        "from embedkit.runtime.engine import Engine\n"
        "from embedkit.core.settings import Settings\n"
        f"e = Engine.load({str(fp32_artifact.path)!r}, Settings(intra_op_threads=1))\n"
        "v = e.encode(['hello world', 'no torch here'], dimensions=32)\n"
        "assert v.shape == (2, 32), v.shape\n"
        "bad = sorted(m for m in ('torch', 'transformers', 'sentence_transformers', 'optimum') "
        "if m in sys.modules)\n"
        "print('loaded:', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loaded: []" in proc.stdout


RSS_BOUND_MB = 64  # growth allowed after warm-up; unbounded arena growth shows up as hundreds


def test_rss_stays_bounded_over_mixed_lengths(fp32_artifact, timed) -> None:
    """~2,000 batches of ever-changing shapes (lengths 2..256) must not grow the process."""
    import psutil

    eng = Engine(fp32_artifact, Settings(intra_op_threads=THREADS))
    rng = random.Random(0)

    def batch(i: int) -> list[list[int]]:
        if i % 50 == 0:  # now and then a long batch: the shapes that grow an arena
            length, size = rng.randint(128, 256), rng.randint(1, 4)
        else:
            length = rng.randint(2, 40)
            size = rng.randint(1, max(1, 48 // length))
        return [[rng.randint(1000, 20000) for _ in range(length)] for _ in range(size)]

    for i in range(100):
        eng.embed_ids(batch(i))
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    for i in range(100, 2100):
        eng.embed_ids(batch(i))
        if i % 100 == 0:
            peak = max(peak, process.memory_info().rss)
    growth_mb = (max(peak, process.memory_info().rss) - baseline) / 2**20
    assert growth_mb < RSS_BOUND_MB, f"RSS grew {growth_mb:.1f} MB over 2,000 mixed batches"
