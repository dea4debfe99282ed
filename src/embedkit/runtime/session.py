"""ONNX Runtime: the only module that creates its sessions (the other runtime is
:mod:`embedkit.runtime.openvino`; both behind :class:`~embedkit.runtime.compiled.CompiledModel`).

It turns :class:`~embedkit.core.settings.Settings` into session options, routes
execution providers (priority list filtered by what the installed build
offers, per-provider options), and checks which provider *actually* attached:
ORT silently runs on the next provider when CUDA or TensorRT fail to load, so a
fallback is logged once, counted in ``embedkit_provider_fallback_total`` and
reported. Strict mode refuses only a fall back to the CPU: TensorRT failing
while CUDA runs is a counted fallback, not a refusal. It also decides the
numeric precision that serves (:class:`Precision`): reduced precision on a GPU
(TensorRT FP16, an FP16 or INT8 variant) only with the quality gate's approval
recorded in the manifest. :class:`Runner` executes a session with a plain run
or with I/O binding (device-resident inputs and output on CUDA, so only the
pooled ``[batch, dim]`` floats cross back to the host).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from embedkit.core import metrics
from embedkit.core.errors import ArtifactError, InferenceError, ProviderUnavailable
from embedkit.core.settings import Settings
from embedkit.model.artifact import Manifest
from embedkit.runtime.compiled import ProviderReport, graph_feeds

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_GPU_PROVIDERS = {CUDA, TENSORRT}

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_EXECUTION_MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def available_providers() -> list[str]:
    """Execution providers the installed onnxruntime build offers."""
    return list(ort.get_available_providers())


@dataclass(frozen=True)
class ShapeProfile:
    """Input shapes a session must serve; TensorRT builds its engine for this range."""

    inputs: Sequence[str]
    max_length: int
    max_batch: int
    opt_length: int = 64
    opt_batch: int = 8

    @classmethod
    def for_engine(cls, inputs: Sequence[str], settings: Settings, max_length: int) -> ShapeProfile:
        # opt: a typical sentence (~64 tokens) in a sub-batch that fills the token budget.
        opt_length = min(max_length, 64)
        opt_batch = max(
            1, min(settings.max_sub_batch_size, settings.max_batch_tokens // opt_length)
        )
        return cls(tuple(inputs), max_length, settings.max_sub_batch_size, opt_length, opt_batch)

    def trt_shapes(self) -> dict[str, str]:
        def spec(batch: int, length: int) -> str:
            return ",".join(f"{name}:{batch}x{length}" for name in self.inputs)

        return {
            "trt_profile_min_shapes": spec(1, 1),
            "trt_profile_opt_shapes": spec(self.opt_batch, self.opt_length),
            "trt_profile_max_shapes": spec(self.max_batch, self.max_length),
        }


def session_options(settings: Settings) -> ort.SessionOptions:
    """Session options from settings: explicit threads, no silent defaults."""
    so = ort.SessionOptions()
    so.graph_optimization_level = _GRAPH_LEVELS[settings.graph_optimization_level]
    so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = settings.inter_op_threads
    so.execution_mode = _EXECUTION_MODES[settings.execution_mode]
    so.enable_cpu_mem_arena = settings.enable_cpu_mem_arena
    so.enable_mem_pattern = settings.enable_mem_pattern
    spin = "1" if settings.allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if settings.allow_spinning:
        spin_us = str(settings.spin_duration_us)
        so.add_session_config_entry("session.intra_op.spin_duration_us", spin_us)
        so.add_session_config_entry("session.inter_op.spin_duration_us", spin_us)
    if settings.profiling_dir is not None:
        Path(settings.profiling_dir).mkdir(parents=True, exist_ok=True)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(settings.profiling_dir) / "embedkit-ort")
    if settings.optimized_model_path is not None:
        Path(settings.optimized_model_path).parent.mkdir(parents=True, exist_ok=True)
        so.optimized_model_filepath = str(settings.optimized_model_path)
    return so


def trt_cache_dir(settings: Settings, cache_tag: str | None, trt_fp16: bool) -> Path:
    """The engine/timing cache folder of one (model, precision, onnxruntime) combination.

    ORT reuses a cached engine without checking the options it was built with, so an FP16
    engine must never sit where an FP32 session looks (nor one built by another release).
    """
    precision = "fp16" if trt_fp16 else "fp32"
    return (
        Path(settings.trt_engine_cache_dir)
        / f"{cache_tag or 'model'}-{precision}-ort{ort.__version__}"
    )


def provider_options(
    provider: str,
    settings: Settings,
    profile: ShapeProfile | None = None,
    *,
    trt_fp16: bool = False,
    cache_tag: str | None = None,
) -> dict[str, Any]:
    """Per-provider options (ORT wants strings/ints; unknown providers get none).

    ``trt_fp16`` is the decision of :func:`trt_fp16_decision`, not the raw setting:
    TensorRT builds FP32 engines unless the gate approved FP16 for the artifact.
    """
    if provider == CUDA:
        return {
            "device_id": settings.cuda_device_id,
            "arena_extend_strategy": settings.cuda_arena_extend_strategy,
            "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
            "do_copy_in_default_stream": True,
        }
    if provider == TENSORRT:
        cache = trt_cache_dir(settings, cache_tag, trt_fp16)
        cache.mkdir(parents=True, exist_ok=True)
        opts: dict[str, Any] = {
            "device_id": settings.cuda_device_id,
            "trt_fp16_enable": trt_fp16,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
        }
        if profile is not None:
            opts.update(profile.trt_shapes())
        return opts
    return {}


def _explicit(settings: Settings, fixed: list[str] | None) -> bool:
    return fixed is not None or "providers" in settings.model_fields_set


def _route(requested: list[str], available: list[str], explicit: bool) -> tuple[list[str], str]:
    """Providers to hand to ORT (priority order, CPU last) and the one we expect to run first.

    An explicit list means "this provider"; the default list means "the best this
    build offers", so GPU entries missing from a CPU-only build are no fallback.
    """
    usable = [p for p in requested if p in available]
    if CPU not in usable:
        usable.append(CPU)  # ORT always keeps CPU as the last resort; make it explicit
    expected = requested[0] if explicit and requested else usable[0]
    return usable, expected


@dataclass(frozen=True)
class RoutingVerdict:
    """What a session's providers mean: a fallback (logged, counted) and whether strict
    mode refuses it (only a GPU request that ends on the CPU)."""

    fallback: bool
    refuse: bool
    reason: str | None


def judge_providers(
    expected: str, available: Sequence[str], active: Sequence[str], *, strict: bool
) -> RoutingVerdict:
    """Pure decision over provider lists (testable with any list, no GPU needed)."""
    running = active[0] if active else "none"
    if running == expected:
        return RoutingVerdict(False, False, None)
    if expected not in available:
        reason = (
            f"{expected} is not available in this onnxruntime build "
            f"(available: {', '.join(available)}); running on {running}"
        )
    else:
        reason = (
            f"{expected} is available but did not attach (see the onnxruntime log above); "
            f"running on {running}"
        )
    # Strict means "never serve a GPU request from the CPU"; TensorRT → CUDA still serves
    # on the GPU (at its own precision and speed), so it is a counted fallback only.
    refuse = strict and expected in _GPU_PROVIDERS and running not in _GPU_PROVIDERS
    return RoutingVerdict(True, refuse, reason)


def create_session(
    model_path: Path,
    settings: Settings,
    *,
    fixed_providers: list[str] | None = None,
    profile: ShapeProfile | None = None,
    trt_fp16: bool = False,
    cache_tag: str | None = None,
) -> tuple[ort.InferenceSession, ProviderReport]:
    """Create one session (call once at startup and reuse it) and report its providers.

    ``fixed_providers`` overrides ``settings.providers`` (and counts as an
    explicit request). A fallback is logged once at WARNING and counted; in
    strict mode a GPU request that would run on the CPU raises
    :class:`ProviderUnavailable` instead. ``trt_fp16``/``cache_tag`` go to
    :func:`provider_options`.
    """
    requested = list(fixed_providers if fixed_providers is not None else settings.providers)
    available = available_providers()
    usable, expected = _route(requested, available, _explicit(settings, fixed_providers))
    # Known before ORT runs: nothing on the GPU side of the list is in this build.
    planned = judge_providers(expected, available, usable, strict=settings.strict_providers)
    if planned.refuse:
        raise ProviderUnavailable(f"strict provider routing: {planned.reason}")
    options = [
        provider_options(p, settings, profile, trt_fp16=trt_fp16, cache_tag=cache_tag)
        for p in usable
    ]
    try:
        session = ort.InferenceSession(
            str(model_path),
            sess_options=session_options(settings),
            providers=usable,
            provider_options=options,
        )
    except Exception as exc:  # ORT raises its own exception types: one line for the operator
        raise InferenceError(
            f"cannot create an ONNX Runtime session for {model_path}: {exc}"
        ) from exc
    active = list(session.get_providers())
    verdict = judge_providers(expected, available, active, strict=settings.strict_providers)
    if verdict.fallback:
        _record_fallback(expected, active[0] if active else "none", verdict.reason or "")
    if verdict.refuse:
        raise ProviderUnavailable(f"strict provider routing: {verdict.reason}")
    report = ProviderReport(requested, available, active, verdict.fallback, verdict.reason)
    return session, report


# --- precision ----------------------------------------------------------------------

# A mode's (weights, compute) precision; OpenVINO's BF16 keeps fp32 weights on disk.
_PRECISIONS = {
    "none": ("fp32", "fp32"),
    "fused-fp32": ("fp32", "fp32"),
    "dynamic-int8": ("int8", "int8"),
    "static-int8": ("int8", "int8"),
    "fp16": ("fp16", "fp16"),
    "openvino-fp32": ("fp32", "fp32"),
    "openvino-bf16": ("fp32", "bf16"),
    "openvino-int8": ("int8", "int8"),
}


@dataclass(frozen=True)
class Precision:
    """The numeric precision that serves, and whether a quality gate stands behind it.

    ``weights``: the graph's (from the manifest); ``compute``: what the active provider
    computes in (``fp16`` under TensorRT FP16); ``approved``: full precision, or a gate
    approval covering it; ``reason``: one line saying why.
    """

    weights: str
    compute: str
    provider: str
    trt_fp16: bool
    approved: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def trt_fp16_decision(manifest: Manifest, settings: Settings, *, judging: bool = False) -> bool:
    """Whether TensorRT may build FP16 engines for this artifact.

    ``EMBEDKIT_TRT_FP16`` is a wish; it is granted only when the manifest records the
    gate's approval of ``trt-fp16`` on TensorRT. ``judging`` (the gate's own run) takes
    the setting as it is, since that run is how an approval comes about.
    """
    if not settings.trt_fp16 or TENSORRT not in settings.providers:
        return False
    if TENSORRT not in available_providers():
        return False  # nothing to decide (and nothing to warn about) without TensorRT
    if judging or manifest.approval("trt-fp16", TENSORRT) is not None:
        return True
    with _warned_lock:
        first = ("trt-fp16", manifest.name) not in _warned
        _warned.add(("trt-fp16", manifest.name))
    if first:
        log.warning(
            "EMBEDKIT_TRT_FP16 is on but the manifest of %s records no gate approval of "
            "trt-fp16: TensorRT builds FP32 engines (vectors stay those the gate validated)",
            manifest.name,
        )
    return False


def served_precision(manifest: Manifest, active: str, *, trt_fp16: bool) -> Precision:
    """What precision serves on ``active`` and whether the gate approved it."""
    mode = manifest.quantization.mode
    weights, compute = _PRECISIONS.get(mode, (mode, mode))
    if (weights, compute) != ("fp32", "fp32"):
        # A reindex-class variant passed its class (serving it is the operator's named
        # choice, checked at startup); only a rejected or never-gated one is unapproved.
        gated = manifest.quantization.approved is not None
        approved = gated and manifest.compatibility != "rejected"
        verdict = manifest.compatibility if gated else "never gated"
        return Precision(
            weights,
            compute,
            active,
            False,
            approved,
            f"{manifest.quantization.mode} variant, quality gate: {verdict}"
            + (" (registered with --force)" if manifest.quantization.forced else ""),
        )
    if active == TENSORRT and trt_fp16:
        approval = manifest.approval("trt-fp16", TENSORRT)
        where = f" on {approval.device}" if approval and approval.device else ""
        return Precision(
            "fp32",
            "fp16",
            active,
            True,
            approval is not None,
            f"TensorRT FP16, gate approval{where}" if approval else "TensorRT FP16, gate run",
        )
    return Precision("fp32", "fp32", active, False, True, "full precision")


def require_approved(precision: Precision) -> None:
    """Refuse reduced precision on a GPU provider that no gate approved (one line)."""
    if precision.provider in _GPU_PROVIDERS and not precision.approved:
        raise ArtifactError(
            f"refusing to serve {precision.compute} on {precision.provider}: "
            f"{precision.reason}; reduced precision on a GPU is served only once the "
            "quality gate approved it for this artifact"
        )


def _record_fallback(requested: str, active: str, reason: str) -> None:
    metrics.get().provider_fallback.labels(requested=requested, active=active).inc()
    with _warned_lock:
        if (requested, active) in _warned:
            return
        _warned.add((requested, active))
    log.warning(
        "execution provider fallback: running on %s instead of %s: %s", active, requested, reason
    )


def run_options(settings: Settings, device_id: int | None = None) -> ort.RunOptions:
    """Run options; arena shrinkage returns memory grown for unusual shapes after each run."""
    ro = ort.RunOptions()
    if settings.arena_shrinkage:
        arenas = []
        if settings.enable_cpu_mem_arena:
            arenas.append("cpu:0")
        if device_id is not None:
            arenas.append(f"gpu:{device_id}")
        if arenas:
            ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", ";".join(arenas))
    return ro


@dataclass
class Runner:
    """ONNX Runtime's :class:`~embedkit.runtime.compiled.CompiledModel`: runs a
    pooled-embedding session on padded int64 ``input_ids``/``attention_mask``.

    Feeds only the inputs the graph declares (``token_type_ids`` as zeros when
    present). ``io_binding`` binds inputs and the output on the session's device:
    on CUDA inputs go up once as OrtValues and only ``[batch, dim]`` comes back.
    Thread-safe: each call builds its own binding; ``InferenceSession.run`` is
    safe to call concurrently.
    """

    session: ort.InferenceSession
    inputs: Sequence[str]
    output: str
    io_binding: bool = False
    device: str = "cpu"  # "cpu" or "cuda"
    device_id: int = 0
    options: ort.RunOptions = field(default_factory=ort.RunOptions)

    @classmethod
    def for_session(
        cls,
        session: ort.InferenceSession,
        report: ProviderReport,
        settings: Settings,
        *,
        inputs: Sequence[str],
        output: str,
    ) -> Runner:
        on_gpu = bool(report.active) and report.active[0] in _GPU_PROVIDERS
        binding = {"on": True, "off": False, "auto": on_gpu}[settings.io_binding]
        device_id = settings.cuda_device_id
        return cls(
            session=session,
            inputs=tuple(inputs),
            output=output,
            io_binding=binding,
            device="cuda" if on_gpu else "cpu",
            device_id=device_id,
            options=run_options(settings, device_id if on_gpu else None),
        )

    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pooling_mask: np.ndarray | None = None,
        *,
        token_type_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """float32 ``[batch, dim]`` for one padded batch (``pooling_mask``: see
        :attr:`~embedkit.model.artifact.Manifest.pooling_mask_input`)."""
        feeds = graph_feeds(self.inputs, input_ids, attention_mask, pooling_mask, token_type_ids)
        try:
            if self.io_binding:
                result = self._run_bound(feeds)
            else:
                result = self.session.run([self.output], feeds, self.options)[0]
        except InferenceError:
            raise
        except Exception as exc:  # ORT errors (bad ids, OOM...) → one typed line
            raise InferenceError(f"inference failed: {str(exc).splitlines()[0]}") from exc
        return np.asarray(result, dtype=np.float32)

    def warm_up(self, max_batch: int, max_tokens: int, max_length: int) -> None:
        """Nothing per shape: ONNX Runtime's CPU and CUDA kernels take any shape (TensorRT
        builds for the profile's range when the session is created)."""

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        binding = self.session.io_binding()
        keep = []  # device copies must outlive the run
        for name, array in feeds.items():
            if self.device == "cpu":
                binding.bind_cpu_input(name, array)
            else:
                value = ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(array), self.device, self.device_id
                )
                keep.append(value)
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.output, self.device, self.device_id)
        self.session.run_with_iobinding(binding, self.options)
        out = binding.copy_outputs_to_cpu()[0]
        del keep
        return np.asarray(out)
