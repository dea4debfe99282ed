"""OpenVINO variants of an fp32 artifact: fp32, BF16 and INT8 (NNCF), each a new artifact.

fp32 and BF16 carry the parent's very graph: OpenVINO's precision is a compile hint
(:mod:`embedkit.runtime.openvino`), fixed by the mode the manifest records. INT8 is NNCF's
post-training quantisation of the ONNX graph (QDQ nodes, SmoothQuant and bias
correction included in its transformer preset), calibrated on STS Benchmark train
sentences as the ORT static INT8 is; OpenVINO runs those QDQ pairs with its own INT8
kernels (VNNI, AMX-INT8). As every variant, each is judged by the per-segment gate.

Imports openvino and nncf lazily (the optional extra ``openvino``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedkit.core.errors import InvalidInput
from embedkit.model import toolchain
from embedkit.model.artifact import Artifact
from embedkit.variants.staging import SentenceCalibrationReader, calibration_sentences, staged


def _require(dist: str) -> None:
    if toolchain.runtime_version("openvino") == "absent" or (
        dist == "nncf" and "nncf" not in toolchain.versions()
    ):
        raise InvalidInput(
            f"OpenVINO variants need {dist}, which is not installed "
            "(pip install 'embedkit[openvino]')"
        )


def _as_is(parent: Artifact, output: Path, mode: Any, hint: str, write: bool) -> Artifact:
    _require("openvino")

    def build(src: Path, dst: Path) -> dict[str, Any]:
        shutil.copyfile(src, dst)
        return {
            "runtime": "openvino",
            "inference_precision": hint,
            "openvino": toolchain.runtime_version("openvino"),
            "isa": toolchain.detect_isa().to_dict(),
        }

    return staged(parent, output, build, mode, write)


def openvino_fp32(parent: Artifact, output: Path, *, write: bool = True) -> Artifact:
    """The parent's graph on OpenVINO, computed in fp32 (an explicit f32 hint)."""
    return _as_is(parent, output, "openvino-fp32", "f32", write)


def openvino_bf16(parent: Artifact, output: Path, *, write: bool = True) -> Artifact:
    """The parent's graph on OpenVINO, computed in BF16 (AVX512_BF16 or AMX; weights and
    I/O stay fp32 on disk)."""
    if not toolchain.detect_isa().bf16:
        raise InvalidInput(
            f"openvino-bf16 needs a CPU with AVX512_BF16 or AMX; this one is "
            f"{toolchain.detect_isa().level}"
        )
    return _as_is(parent, output, "openvino-bf16", "bf16", write)


def openvino_int8(
    parent: Artifact,
    output: Path,
    *,
    calibration: Path | None = None,
    size: int = 300,
    seed: int = 0,
    write: bool = True,
) -> Artifact:
    """NNCF's INT8 (transformer preset) of the parent's ONNX graph, calibrated on ``size``
    sentences of ``calibration`` (default: STS Benchmark train), run by OpenVINO."""
    _require("nncf")
    sentences, calib = calibration_sentences(calibration, size, seed)

    def build(src: Path, dst: Path) -> dict[str, Any]:
        import nncf
        import onnx

        reader = SentenceCalibrationReader(parent, sentences)
        quantized = nncf.quantize(
            onnx.load(str(src)),
            nncf.Dataset(list(reader)),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(reader),
        )
        onnx.save(quantized, str(dst))
        return {
            "runtime": "openvino",
            "inference_precision": "f32",
            "quantizer": "nncf.quantize (ModelType.TRANSFORMER)",
            "nncf": toolchain.versions().get("nncf", ""),
            "openvino": toolchain.runtime_version("openvino"),
            "isa": toolchain.detect_isa().to_dict(),
            "calibration": calib,
        }

    return staged(parent, output, build, "openvino-int8", write)


BUILDERS: dict[str, Callable[..., Artifact]] = {
    "openvino-fp32": openvino_fp32,
    "openvino-bf16": openvino_bf16,
    "openvino-int8": openvino_int8,
}
