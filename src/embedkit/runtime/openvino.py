"""OpenVINO: the second CPU runtime (the optional extra ``openvino``).

ONNX Runtime's CPU provider has no BF16 arithmetic; OpenVINO's CPU plugin has (AVX512_BF16,
AMX), reads our ONNX graph as it is and runs NNCF's INT8 QDQ graphs with its own
kernels. A variant says which precision it runs at through its mode
(``openvino-fp32`` / ``-bf16`` / ``-int8``), so the compile hint is the manifest's, never
a setting: the precision the gate judged is the one that serves.

- The precision hint is explicit: on an AMX CPU OpenVINO would otherwise compute fp32
  graphs in BF16 by itself; a hint the CPU cannot honour (BF16 without AVX512_BF16/AMX)
  is refused at compile time, not silently run in fp32.
- Threads follow ``intra_op_threads`` (the container's CPU share, as ONNX Runtime's do),
  with one stream per run the service makes at once (its parallel runs): otherwise
  concurrent requests would queue on one stream, leaving cores idle.
- Compiled kernels are cached in ``openvino_cache_dir`` (a writable path: the image's
  root file system is read-only, docs/deployment.md mounts an ``emptyDir`` there).
- An infer request is not thread-safe: each calling thread keeps its own.
- OpenVINO prepares kernels per input shape: lengths are padded to a multiple of 8 and
  every shape the engine can form is run once at warm-up.

Imports openvino lazily: an image without the extra never loads it (a variant measured
on OpenVINO is refused at startup there, :func:`embedkit.serve.engine.startup.refusal`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.core.errors import InferenceError, ProviderUnavailable
from embedkit.core.settings import Settings
from embedkit.model import toolchain
from embedkit.runtime.compiled import ProviderReport, graph_feeds

log = logging.getLogger(__name__)

DEVICE = "OpenVINO/CPU"  # what the provider report, /info and the identity header say
# Sequence lengths are padded up to a multiple of this (masked): a few hundred distinct
# shapes instead of thousands, each prepared once (:meth:`OpenVINOModel.warm_up`).
LENGTH_STEP = 8
# A mode's compile-time precision hint (OpenVINO's names).
HINTS = {"openvino-fp32": "f32", "openvino-bf16": "bf16", "openvino-int8": "f32"}


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ProviderUnavailable(
            "this variant runs on OpenVINO, which is not installed here "
            "(pip install 'embedkit[openvino]')"
        ) from exc
    return openvino


def compile_config(hint: str, settings: Settings, streams: int = 1) -> dict[str, Any]:
    """The CPU plugin's properties for one compiled model: ``streams`` runs at once (one per
    calling thread of the service's parallel runs), each on ``intra_op_threads`` threads;
    with ``profiling_dir`` set, its per-node performance counters (as ORT's profiler is)."""
    return {
        "INFERENCE_PRECISION_HINT": hint,
        "INFERENCE_NUM_THREADS": settings.intra_op_threads * streams,
        "NUM_STREAMS": streams,
        "PERF_COUNT": settings.profiling_dir is not None,
    }


class OpenVINOModel:
    """OpenVINO's :class:`~embedkit.runtime.compiled.CompiledModel` for one ONNX graph."""

    io_binding = False
    device = "cpu"

    def __init__(
        self,
        model_path: Path,
        mode: str,
        settings: Settings,
        *,
        inputs: Sequence[str],
        output: str,
        streams: int = 1,
    ) -> None:
        ov = _openvino()
        hint = HINTS[mode]
        if hint == "bf16" and not toolchain.detect_isa().bf16:
            raise ProviderUnavailable(
                f"{mode} needs a CPU with AVX512_BF16 or AMX; this one is "
                f"{toolchain.detect_isa().level} (OpenVINO would compute fp32, not what was gated)"
            )
        core = ov.Core()
        if settings.openvino_cache_dir is not None:
            try:
                Path(settings.openvino_cache_dir).mkdir(parents=True, exist_ok=True)
                core.set_property({"CACHE_DIR": str(settings.openvino_cache_dir)})
            except OSError as exc:  # a read-only path: compile every time, and say so
                log.warning("OpenVINO model cache off: %s is not writable (%s)", exc.filename, exc)
        try:
            self.compiled = core.compile_model(
                str(model_path), "CPU", compile_config(hint, settings, streams)
            )
        except Exception as exc:  # OpenVINO raises RuntimeError with a long log: one line
            raise InferenceError(
                f"cannot compile {model_path} with OpenVINO: {str(exc).splitlines()[0]}"
            ) from exc
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        if got != getattr(ov.Type, hint):
            raise ProviderUnavailable(
                f"OpenVINO compiled {model_path} at {got}, not the {hint} of mode {mode}"
            )
        self.mode = mode
        self.hint = hint
        self.streams = streams
        self.inputs = tuple(inputs)
        self.output = self.compiled.output(output)
        self._local = threading.local()
        self.profiling = settings.profiling_dir is not None
        self._counters: list[tuple[str, float]] = []  # (node type, µs) of every profiled run
        self._counters_lock = threading.Lock()
        self.report = ProviderReport([DEVICE], [DEVICE], [DEVICE], False, None)
        log.info(
            "OpenVINO %s compiled %s at %s, %d stream(s)",
            toolchain.runtime_version("openvino"),
            model_path.name,
            hint,
            streams,
        )

    def describe(self) -> dict[str, Any]:
        """What /info says of it (beside the engine's own settings)."""
        return {
            "version": toolchain.runtime_version("openvino"),
            "inference_precision": self.hint,
            "streams": self.streams,
            "length_step": LENGTH_STEP,
        }

    def warm_up(self, max_batch: int, max_tokens: int, max_length: int) -> None:
        """Run every shape token-aware batching can form once on every stream: OpenVINO
        prepares kernels per input shape and stream (~7 ms the first time, measured), which
        a cold shape would add to a request. Lengths come in steps of :data:`LENGTH_STEP`,
        so a few hundred shapes; the streams warm in parallel, one thread each."""
        shapes = [
            (size, length)
            for length in range(LENGTH_STEP, max_length + LENGTH_STEP, LENGTH_STEP)
            for size in range(1, max(1, min(max_batch, max_tokens // length)) + 1)
        ]

        def warm() -> None:
            for size, length in shapes:
                ids = np.ones((size, length), dtype=np.int64)
                self.run(ids, ids)

        threads = [threading.Thread(target=warm) for _ in range(self.streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pooling_mask: np.ndarray | None = None,
        *,
        token_type_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """float32 ``[batch, dim]`` for one padded batch (as ONNX Runtime's Runner); the
        length is padded up to a multiple of :data:`LENGTH_STEP` (masked positions)."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        extra = -input_ids.shape[1] % LENGTH_STEP
        if extra:
            widen = ((0, 0), (0, extra))
            input_ids = np.pad(input_ids, widen)
            attention_mask = np.pad(attention_mask, widen)
            pooling_mask = None if pooling_mask is None else np.pad(pooling_mask, widen)
            token_type_ids = None if token_type_ids is None else np.pad(token_type_ids, widen)
        feeds = graph_feeds(self.inputs, input_ids, attention_mask, pooling_mask, token_type_ids)
        try:
            result = np.array(request.infer(feeds)[self.output], dtype=np.float32)  # a copy
        except Exception as exc:  # OpenVINO's errors → one typed line
            raise InferenceError(f"inference failed: {str(exc).splitlines()[0]}") from exc
        if self.profiling:
            runs = [
                (info.node_type, info.real_time.total_seconds() * 1e6)
                for info in request.get_profiling_info()
                if info.status == info.Status.EXECUTED
            ]
            with self._counters_lock:
                self._counters.extend(runs)
        return result

    def counters(self) -> list[tuple[str, float]]:
        """(node type, µs) of every executed node of every run since compiling (profiling
        on only): what :mod:`embedkit.release.profile` ranks, as it does ORT's trace."""
        with self._counters_lock:
            return list(self._counters)
