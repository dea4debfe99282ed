"""OpenVINO, the second CPU runtime (issue #29): its variants pass the contract and the
startup binding as ONNX Runtime's do, on tiny models (real OpenVINO, real NNCF)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from tests.planted import stamped

from embedkit.core.errors import InvalidInput, ProviderUnavailable
from embedkit.core.settings import Settings
from embedkit.model import toolchain
from embedkit.model.artifact import Artifact, MeasuredOn
from embedkit.runtime import openvino as ov_runtime
from embedkit.runtime.engine import Engine
from embedkit.serve.engine.embedder import EmbedderCore
from embedkit.serve.engine.startup import refusal
from embedkit.variants import quantize

pytest.importorskip("openvino", reason="needs the openvino extra")

TEXTS = ["a short one", "a somewhat longer sentence about the weather in Lisbon", "x " * 40]
NO_BF16 = dataclasses.replace(toolchain.detect_isa(), avx512_bf16=False, amx=False)


@pytest.fixture(scope="module")
def tiny(tiny_architecture) -> tuple[Path, Artifact]:
    return tiny_architecture("bert-dense")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_fp32_on_openvino_matches_onnx_runtime_and_says_where_it_runs(
    tiny: tuple[Path, Artifact], tmp_path: Path
) -> None:
    _, parent = tiny
    variant = quantize.build_variant(parent, "openvino-fp32", tmp_path / "ov")
    assert variant.manifest.runtime == "openvino" and parent.manifest.runtime == "onnxruntime"
    assert variant.manifest.files["model.onnx"] == parent.manifest.files["model.onnx"]
    assert variant.manifest.quantization.settings["inference_precision"] == "f32"
    ort_engine, ov_engine = Engine(parent), Engine(variant)
    assert ov_engine.provider == ov_runtime.DEVICE and ov_engine.session is None
    assert ov_engine.info()["runtime"] == "openvino" and Engine(parent).info()["runtime"] == (
        "onnxruntime"
    )
    assert ov_engine.precision.compute == "fp32" and ov_engine.precision.approved
    got, want = ov_engine.encode(TEXTS), ort_engine.encode(TEXTS)
    assert np.abs(got - want).max() < 1e-4  # lengths padded to a multiple of 8, masked


def test_openvino_fp32_passes_the_parity_contract(
    tiny: tuple[Path, Artifact], tmp_path: Path
) -> None:
    from embedkit.quality import contract

    source, parent = tiny
    variant = quantize.build_variant(parent, "openvino-fp32", tmp_path / "ov")
    report = contract.validate(variant, reference_dir=source, limit_per_segment=2)
    assert report["passed"], {k: v.get("passed") for k, v in report.items() if isinstance(v, dict)}
    assert report["operators"]["openvino_compile"] == "ok"


def test_bf16_needs_a_cpu_with_bf16(
    tiny: tuple[Path, Artifact], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, parent = tiny
    if toolchain.detect_isa().bf16:
        variant = quantize.build_variant(parent, "openvino-bf16", tmp_path / "bf16")
        engine = Engine(variant)
        assert engine.precision.compute == "bf16" and engine.precision.weights == "fp32"
        got, want = engine.encode(TEXTS), Engine(parent).encode(TEXTS)
        assert (_unit(got) * _unit(want)).sum(axis=1).min() > 0.99
    else:
        variant = None
    # Where the CPU has none: building is refused, and so is running one built elsewhere.
    monkeypatch.setattr(toolchain, "detect_isa", lambda cpuinfo=None: NO_BF16)
    with pytest.raises(InvalidInput, match="needs a CPU with AVX512_BF16 or AMX"):
        quantize.build_variant(parent, "openvino-bf16", tmp_path / "refused")
    if variant is not None:
        with pytest.raises(ProviderUnavailable, match="openvino-bf16 needs a CPU"):
            Engine(variant)


def test_nncf_int8_is_a_qdq_graph_that_openvino_runs(
    tiny: tuple[Path, Artifact], tmp_path: Path
) -> None:
    import onnx

    _, parent = tiny
    variant = quantize.build_variant(parent, "openvino-int8", tmp_path / "int8", size=32)
    s = variant.manifest.quantization.settings
    assert s["runtime"] == "openvino" and s["calibration"]["size"] == 32
    ops = {n.op_type for n in onnx.load(str(variant.model_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    engine = Engine(variant, judging=True)
    assert engine.precision.weights == "int8"
    got, want = engine.encode(TEXTS), Engine(parent).encode(TEXTS)
    assert got.shape == want.shape and np.isfinite(got).all()


def test_the_binding_names_the_runtime_and_its_version(tiny: tuple[Path, Artifact]) -> None:
    _, parent = tiny
    here = toolchain.installed_runtimes()
    isa = toolchain.detect_isa().level

    def variant(mode: str, runtime: str, version: str):
        on = MeasuredOn(parent_sha256="p", isa=isa, runtime=runtime, version=version)
        q = parent.manifest.quantization.model_copy(
            update={
                "mode": mode,
                "approved": True,
                "compatibility": "index-compatible",
                "measured_on": on,
            }
        )
        return parent.manifest.model_copy(update={"quantization": q})

    ok = variant("openvino-fp32", "openvino", here["openvino"])
    assert refusal(ok, Settings(), isa=isa, runtimes=here) is None
    older = variant("openvino-fp32", "openvino", "2025.0.0")
    reason = refusal(older, Settings(), isa=isa, runtimes=here)
    assert reason is not None and reason[0] == "runtime"
    assert (
        f"measured with openvino 2025.0.0, this image has openvino {here['openvino']}"
        in (reason[1])
    )
    absent = refusal(ok, Settings(), isa=isa, runtimes={**here, "openvino": "absent"})
    assert absent is not None and "this image has openvino absent" in absent[1]
    # An ORT measurement never vouches for an OpenVINO graph, nor the other way round.
    crossed = variant("openvino-fp32", "onnxruntime", here["onnxruntime"])
    assert refusal(crossed, Settings(), isa=isa, runtimes=here) is not None
    # Format 2-3 manifests wrote `onnxruntime: VERSION`: read as that runtime.
    legacy = MeasuredOn.model_validate({"parent_sha256": "p", "isa": isa, "onnxruntime": "1.2"})
    assert (legacy.runtime, legacy.version) == ("onnxruntime", "1.2")


def test_a_variant_measured_on_another_openvino_is_refused_and_fp32_serves(
    tiny: tuple[Path, Artifact], model_tag: str, fp32_artifact: Artifact, tmp_path: Path
) -> None:
    """The real startup path (EmbedderCore): an OpenVINO variant whose binding names
    another OpenVINO version is refused and its fp32 parent (ONNX Runtime) serves; with
    its own binding it serves on OpenVINO and says so."""
    from embedkit.core import metrics

    ov = quantize.build_variant(fp32_artifact, "openvino-fp32", tmp_path / "ov")
    version = toolchain.runtime_version("openvino")
    here = stamped(
        fp32_artifact,
        ov,
        tmp_path / "here",
        "index-compatible",
        runtime="openvino",
        version=version,
    )
    core = EmbedderCore(here, Settings())
    assert core.identity.provider == ov_runtime.DEVICE and core.identity.refused is None
    assert "provider=OpenVINO/CPU" in core.identity.header_value()

    elsewhere = stamped(
        fp32_artifact,
        ov,
        tmp_path / "elsewhere",
        "index-compatible",
        runtime="openvino",
        version="2025.0.0",
    )
    counter = metrics.get().variant_refusals.labels(
        variant=elsewhere.manifest.variant, reason="runtime"
    )
    before = float(counter._value.get())
    core = EmbedderCore(elsewhere, Settings())
    assert core.identity.variant == "fp32" and core.identity.provider == "CPUExecutionProvider"
    assert "measured with openvino 2025.0.0" in (core.identity.refused or "")
    assert float(counter._value.get()) == before + 1


def test_compile_config_follows_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ov_runtime.compile_config("bf16", Settings(intra_op_threads=3))
    assert config["INFERENCE_PRECISION_HINT"] == "bf16"
    assert config["INFERENCE_NUM_THREADS"] == 3 and config["NUM_STREAMS"] == 1
    # The service's parallel runs (one core each): a stream per run, or they would queue.
    parallel = ov_runtime.compile_config("bf16", Settings(intra_op_threads=1), streams=2)
    assert parallel["NUM_STREAMS"] == 2 and parallel["INFERENCE_NUM_THREADS"] == 2
    monkeypatch.setenv("EMBEDKIT_OPENVINO_CACHE_DIR", "")  # empty: no cache
    assert Settings().openvino_cache_dir is None


def test_an_unwritable_cache_dir_compiles_without_cache(
    tiny: tuple[Path, Artifact], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only root file system without the emptyDir: serve, compile every time, say so."""
    _, parent = tiny
    variant = quantize.build_variant(parent, "openvino-fp32", tmp_path / "ov")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    settings = Settings(openvino_cache_dir=blocked / "cache")
    engine = Engine(variant, settings)
    assert engine.encode(TEXTS).shape[0] == len(TEXTS)
    assert "OpenVINO model cache off" in caplog.text


def test_an_openvino_variant_is_profiled_by_its_counters(
    tiny: tuple[Path, Artifact], tmp_path: Path
) -> None:
    """A release stores a profile of every version: OpenVINO's per-node counters, ranked
    as ORT's trace is."""
    from embedkit.release.profile import profile_artifact

    _, parent = tiny
    variant = quantize.build_variant(parent, "openvino-fp32", tmp_path / "ov")
    got = profile_artifact(variant, TEXTS * 4, 4, tmp_path / "profile", max_batches=2)
    assert got["kernel_ms"] > 0 and got["top_ops"] and Path(got["trace"]).is_file()
    assert abs(sum(op["share"] for op in got["top_ops"]) - 1.0) < 0.2  # the top ten cover most
