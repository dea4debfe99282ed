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
from embedkit.runtime.compiled import graph_feeds
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
    cache = runtime.trt_cache_dir(s, None, trt_fp16=False)
    assert trt["trt_fp16_enable"] is False and trt["trt_engine_cache_path"] == str(cache)
    assert cache.is_dir() and cache.parent == tmp_path / "trt"
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
    feeds = graph_feeds(["input_ids", "token_type_ids", "attention_mask"], ids, mask)
    assert list(feeds) == ["input_ids", "token_type_ids", "attention_mask"]
    assert not feeds["token_type_ids"].any()
    with pytest.raises(InferenceError, match="position_ids"):
        graph_feeds(["input_ids", "position_ids"], ids, mask)


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


# --- provider strictness and precision (issue #16): real sessions on this CPU build; only
# the list of providers the build claims to offer is faked, never a vector ---------------

GPU_BUILD = [TENSORRT, CUDA, CPU]


@pytest.mark.parametrize(
    ("expected", "available", "active", "fallback", "refuse"),
    [
        (TENSORRT, GPU_BUILD, [TENSORRT, CUDA, CPU], False, False),
        (TENSORRT, GPU_BUILD, [CUDA, CPU], True, False),  # TensorRT failed, CUDA serves
        (TENSORRT, [CUDA, CPU], [CUDA, CPU], True, False),  # no TensorRT in the build
        (TENSORRT, GPU_BUILD, [CPU], True, True),  # the GPU request ends on the CPU
        (CUDA, [CPU], [CPU], True, True),
        (CPU, [CPU], [CPU], False, False),
    ],
)
def test_strict_means_never_fall_back_to_cpu(
    expected: str, available: list[str], active: list[str], fallback: bool, refuse: bool
) -> None:
    verdict = runtime.judge_providers(expected, available, active, strict=True)
    assert (verdict.fallback, verdict.refuse) == (fallback, refuse)
    assert (verdict.reason is None) == (not fallback)
    lax = runtime.judge_providers(expected, available, active, strict=False)
    assert lax.fallback == fallback and not lax.refuse


def test_gpu_build_that_attaches_nothing_is_refused_when_strict(
    fp32_artifact, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(runtime, "available_providers", lambda: list(GPU_BUILD))
    s = Settings(intra_op_threads=1, trt_engine_cache_dir=tmp_path, providers=GPU_BUILD)
    before = _fallbacks(TENSORRT, CPU)
    _, report = create_session(fp32_artifact.model_path, s)
    assert report.fallback and report.active == [CPU]
    assert report.reason is not None and "did not attach" in report.reason
    assert _fallbacks(TENSORRT, CPU) == before + 1
    with pytest.raises(ProviderUnavailable, match="running on CPUExecutionProvider"):
        create_session(fp32_artifact.model_path, s.model_copy(update={"strict_providers": True}))


def test_trt_cache_is_keyed_by_model_precision_and_release(tmp_path: Path) -> None:
    s = Settings(trt_engine_cache_dir=tmp_path)
    dirs = {
        runtime.trt_cache_dir(s, tag, fp16) for tag in ("aaaa", "bbbb") for fp16 in (False, True)
    }
    assert len(dirs) == 4 and all(d.parent == tmp_path for d in dirs)
    fp16 = runtime.trt_cache_dir(s, "aaaa", True).name
    assert fp16.startswith("aaaa-fp16-ort") and fp16.endswith(runtime.ort.__version__)
    opts = provider_options(TENSORRT, s, trt_fp16=True, cache_tag="aaaa")
    assert opts["trt_fp16_enable"] is True and opts["trt_engine_cache_path"].endswith(fp16)
    assert opts["trt_timing_cache_path"] == opts["trt_engine_cache_path"]
    assert provider_options(TENSORRT, s)["trt_fp16_enable"] is False  # safe default


def _approved_trt_fp16(manifest):
    from embedkit.model.artifact import PrecisionApproval

    approval = PrecisionApproval(precision="trt-fp16", provider=TENSORRT, segments_checked=9)
    return manifest.model_copy(update={"precision_approvals": [approval]})


def test_trt_fp16_only_with_the_gates_approval(
    fp32_artifact, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = fp32_artifact.manifest
    wish = Settings(trt_fp16=True, providers=GPU_BUILD)
    runtime._warned.clear()
    # On a build without TensorRT (this CPU one) there is nothing to decide or warn about.
    with caplog.at_level(logging.WARNING, logger="embedkit.runtime.session"):
        assert runtime.trt_fp16_decision(manifest, wish) is False
    assert not caplog.records
    monkeypatch.setattr(runtime, "available_providers", lambda: list(GPU_BUILD))
    with caplog.at_level(logging.WARNING, logger="embedkit.runtime.session"):
        assert runtime.trt_fp16_decision(manifest, wish) is False
    assert any("no gate approval of trt-fp16" in r.getMessage() for r in caplog.records)
    assert runtime.trt_fp16_decision(manifest, wish, judging=True) is True  # the gate's run
    approved = _approved_trt_fp16(manifest)
    assert runtime.trt_fp16_decision(approved, wish) is True
    assert runtime.trt_fp16_decision(approved, wish.model_copy(update={"trt_fp16": False})) is False
    on_cuda = wish.model_copy(update={"providers": [CUDA, CPU]})
    assert runtime.trt_fp16_decision(approved, on_cuda) is False

    served = runtime.served_precision(approved, TENSORRT, trt_fp16=True)
    assert (served.weights, served.compute, served.approved) == ("fp32", "fp16", True)
    plain = runtime.served_precision(manifest, CUDA, trt_fp16=False)
    assert (plain.compute, plain.approved, plain.reason) == ("fp32", True, "full precision")


@pytest.mark.parametrize(("approved", "forced"), [(None, False), (False, True), (True, False)])
def test_reduced_precision_variant_on_gpu_needs_approval(
    fp32_artifact, approved: bool | None, forced: bool
) -> None:
    from embedkit.core.errors import ArtifactError

    q = fp32_artifact.manifest.quantization.model_copy(
        update={"mode": "fp16", "approved": approved, "forced": forced}
    )
    manifest = fp32_artifact.manifest.model_copy(update={"quantization": q})
    for provider in (CUDA, TENSORRT):
        precision = runtime.served_precision(manifest, provider, trt_fp16=False)
        assert precision.weights == precision.compute == "fp16"
        assert precision.approved is bool(approved)
        if approved:
            runtime.require_approved(precision)
        else:
            with pytest.raises(ArtifactError, match=f"refusing to serve fp16 on {provider}"):
                runtime.require_approved(precision)
    # On the CPU the release gate stands between variants and the store: shown, not refused.
    runtime.require_approved(runtime.served_precision(manifest, CPU, trt_fp16=False))


def test_engine_serves_fp32_until_trt_fp16_is_stamped(
    artifact_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from embedkit.model.artifact import Artifact
    from embedkit.quality.gate import GateVerdict, stamp_precision
    from embedkit.runtime.engine import Engine

    monkeypatch.setattr(runtime, "available_providers", lambda: list(GPU_BUILD))
    s = Settings(intra_op_threads=1, trt_engine_cache_dir=tmp_path / "trt", providers=GPU_BUILD)
    art = Artifact.load(artifact_copy)
    before = Engine(art, s)
    assert before.info()["precision"]["trt_fp16"] is False
    assert [p.name.split("-")[1] for p in (tmp_path / "trt").iterdir()] == ["fp32"]
    with pytest.raises(Exception, match="failed the quality gate"):
        stamp_precision(
            art,
            GateVerdict(approved=False, failures=[], segments_checked=3),
            precision="trt-fp16",
            provider=TENSORRT,
        )
    stamped = stamp_precision(
        art,
        GateVerdict(approved=True, failures=[], segments_checked=3),
        precision="trt-fp16",
        provider=TENSORRT,
        device="test",
    )
    assert Artifact.load(stamped.path).manifest.approval("trt-fp16", TENSORRT) is not None
    after = Engine(stamped, s)
    # TensorRT would now build FP16 engines (own cache folder); this CPU build serves fp32.
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "trt").iterdir()) == ["fp16", "fp32"]
    assert after.precision.compute == "fp32" and after.precision.provider == CPU
    texts = ["a cat sat on the mat", "GPU precision is gated"]
    np.testing.assert_array_equal(before.encode(texts), after.encode(texts))
