"""Session factory, provider routing with visible fallback, and the Runner (plain vs I/O
binding)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from embedkit.core import metrics
from embedkit.core.errors import InferenceError, ProviderUnavailable
from embedkit.core.settings import Settings
from embedkit.runtime import session as runtime
from embedkit.runtime.session import (
    CPU,
    CUDA,
    TENSORRT,
    Runner,
    ShapeProfile,
    available_providers,
    create_session,
    provider_options,
    session_options,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU_ONLY = CUDA not in available_providers()
needs_cpu_only = pytest.mark.skipif(
    not CPU_ONLY, reason="fallback test needs a CPU-only onnxruntime"
)


def _fallbacks(requested: str, active: str) -> float:
    counter = metrics.get().provider_fallback.labels(requested=requested, active=active)
    return float(counter._value.get())


def _batch(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    from embedkit.runtime.tokens import pad_batch

    return pad_batch(rows, 0)


def test_default_routing_picks_the_best_available(fp32_artifact) -> None:
    session, report = create_session(fp32_artifact.model_path, Settings(intra_op_threads=1))
    assert CPU in report.available and report.active[0] in report.available
    assert report.requested == [TENSORRT, CUDA, CPU]
    assert session.get_providers() == report.active
    if CPU_ONLY:  # the default list means "best available": no fallback on a CPU build
        assert report.active == [CPU] and not report.fallback and report.reason is None


@needs_cpu_only
def test_cuda_on_cpu_build_falls_back_visibly(
    fp32_artifact, caplog: pytest.LogCaptureFixture
) -> None:
    runtime._warned.clear()
    before = _fallbacks(CUDA, CPU)
    with caplog.at_level(logging.WARNING, logger="embedkit.runtime.session"):
        for _ in range(2):
            session, report = create_session(
                fp32_artifact.model_path, Settings(), fixed_providers=[CUDA, CPU]
            )
    assert report.fallback and report.active == [CPU] and session.get_providers() == [CPU]
    assert report.requested == [CUDA, CPU]
    assert report.reason is not None and "not available" in report.reason
    warnings = [r for r in caplog.records if "provider fallback" in r.getMessage()]
    assert len(warnings) == 1  # logged once, however many sessions
    assert _fallbacks(CUDA, CPU) == before + 2  # counted per session


@needs_cpu_only
def test_explicit_providers_from_env_count_as_a_request(
    fp32_artifact,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMBEDKIT_PROVIDERS", '["CUDAExecutionProvider"]')
    _, report = create_session(fp32_artifact.model_path, Settings())
    assert report.requested == [CUDA] and report.active == [CPU] and report.fallback


@needs_cpu_only
def test_strict_refuses_to_fall_back(fp32_artifact) -> None:
    with pytest.raises(ProviderUnavailable, match="CUDAExecutionProvider is not available") as err:
        create_session(
            fp32_artifact.model_path, Settings(strict_providers=True), fixed_providers=[CUDA, CPU]
        )
    assert err.value.status == 503
    # Strict with a provider that does attach is fine.
    _, report = create_session(
        fp32_artifact.model_path, Settings(strict_providers=True), fixed_providers=[CPU]
    )
    assert not report.fallback


def test_session_options_follow_settings(tmp_path: Path) -> None:
    s = Settings(
        graph_optimization_level="basic",
        intra_op_threads=3,
        inter_op_threads=2,
        execution_mode="parallel",
        enable_cpu_mem_arena=False,
        enable_mem_pattern=True,
        allow_spinning=False,
    )
    so = session_options(s)
    import onnxruntime as ort

    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (3, 2)
    assert so.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert not so.enable_cpu_mem_arena and so.enable_mem_pattern
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_profiling_and_optimized_graph_are_written(fp32_artifact, tmp_path: Path) -> None:
    s = Settings(
        intra_op_threads=1,
        profiling_dir=tmp_path / "prof",
        optimized_model_path=tmp_path / "opt" / "model.opt.onnx",
    )
    session, _ = create_session(fp32_artifact.model_path, s, fixed_providers=[CPU])
    assert (tmp_path / "opt" / "model.opt.onnx").stat().st_size > 1_000_000
    runner = Runner(session, fp32_artifact.manifest.inputs, "sentence_embedding")
    runner.run(*_batch([[101, 7592, 102]]))
    trace = Path(session.end_profiling())
    assert trace.parent == tmp_path / "prof" and trace.stat().st_size > 0


def test_provider_options_and_trt_profiles(tmp_path: Path) -> None:
    s = Settings(cuda_device_id=1, trt_engine_cache_dir=tmp_path / "trt", trt_fp16=False)
    cuda = provider_options(CUDA, s)
    assert cuda["device_id"] == 1 and cuda["arena_extend_strategy"] == "kSameAsRequested"
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    profile = ShapeProfile.for_engine(["input_ids", "attention_mask"], s, max_length=256)
    trt = provider_options(TENSORRT, s, profile)
    assert trt["trt_fp16_enable"] is False and trt["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert (tmp_path / "trt").is_dir()
    assert trt["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1"
    assert trt["trt_profile_opt_shapes"] == "input_ids:8x64,attention_mask:8x64"
    assert trt["trt_profile_max_shapes"] == "input_ids:64x256,attention_mask:64x256"
    assert provider_options(CPU, s) == {}


def test_run_options_shrink_the_arena() -> None:
    ro = runtime.run_options(Settings())
    assert ro.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    gpu = runtime.run_options(Settings(), device_id=0)
    assert gpu.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0;gpu:0"


def test_io_binding_matches_plain_run(fp32_artifact) -> None:
    s = Settings(intra_op_threads=1)
    session, report = create_session(fp32_artifact.model_path, s, fixed_providers=[CPU])
    inputs = fp32_artifact.manifest.inputs
    plain = Runner.for_session(
        session,
        report,
        s.model_copy(update={"io_binding": "off"}),
        inputs=inputs,
        output="sentence_embedding",
    )
    bound = Runner.for_session(
        session,
        report,
        s.model_copy(update={"io_binding": "on"}),
        inputs=inputs,
        output="sentence_embedding",
    )
    assert not plain.io_binding and bound.io_binding and bound.device == "cpu"
    batch = _batch([[101, 7592, 2088, 102], [101, 2023, 102]])
    a, b = plain.run(*batch), bound.run(*batch)
    assert a.dtype == b.dtype == np.float32 and a.shape == (2, 384)
    np.testing.assert_array_equal(a, b)


def test_feeds_only_declared_inputs() -> None:
    ids = np.array([[1, 2]], dtype=np.int64)
    mask = np.ones_like(ids)
    runner = Runner(None, ["input_ids", "token_type_ids", "attention_mask"], "out")
    feeds = runner.feeds(ids, mask)
    assert list(feeds) == ["input_ids", "token_type_ids", "attention_mask"]
    assert not feeds["token_type_ids"].any()
    with pytest.raises(InferenceError, match="position_ids"):
        Runner(None, ["input_ids", "position_ids"], "out").feeds(ids, mask)


def test_runtime_errors_become_inference_errors(fp32_artifact) -> None:
    s = Settings(intra_op_threads=1)
    session, report = create_session(fp32_artifact.model_path, s, fixed_providers=[CPU])
    runner = Runner.for_session(
        session, report, s, inputs=fp32_artifact.manifest.inputs, output="sentence_embedding"
    )
    with pytest.raises(InferenceError, match="inference failed"):
        runner.run(*_batch([[101, 10**7, 102]]))  # id outside the embedding table


def test_missing_model_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match="cannot create an ONNX Runtime session"):
        create_session(tmp_path / "nope.onnx", Settings(), fixed_providers=[CPU])


def test_default_spinning_is_bounded() -> None:
    so = session_options(Settings())
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert so.get_session_config_entry("session.intra_op.spin_duration_us") == "200"
