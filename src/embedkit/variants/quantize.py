"""Graph optimisation, INT8 quantisation and FP16 conversion of an fp32 artifact.

Every variant is a NEW artifact directory derived from an fp32 parent: the
tokenizer is copied, a new ``model.onnx`` is written and the manifest records
the mode, every choice made (including the CPU instruction set it was built
for and the calibration data's checksum), the parent and a fresh toolchain.
Parity is left ``None``: whether a variant is good enough is decided by the
per-segment quality gate (:mod:`embedkit.quality.gate`), never here.

Why the settings are exposed rather than fixed: on CPUs without VNNI the u8×s8
integer kernels saturate int16 intermediates, and the same model quantised
with different weight type / reduce-range / per-channel choices ranges from
unusable to near-lossless (``docs/quantization.md``). A model quantised for one
ISA can misbehave on another, so the detected ISA goes into the manifest.

Imports onnx / onnxruntime.quantization lazily: not part of the serving path.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from embedkit.core.errors import ArtifactError, InvalidInput
from embedkit.model import toolchain
from embedkit.model.artifact import Artifact

# The ISA probe lives with the toolchain facts (serving reads it too); re-exported here.
from embedkit.model.toolchain import CpuIsa, detect_isa
from embedkit.variants import openvino, ranking, smoothquant
from embedkit.variants.staging import SentenceCalibrationReader, calibration_sentences, staged

log = logging.getLogger(__name__)

WEIGHT_TYPES = ("s8", "u8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


# SmoothQuant strength of the INT8 presets: tuned on held-out STS Benchmark train
# sentences (0.3-0.9 swept; 0.7 best for dynamic s8 per-channel, docs/quantization.md).
SMOOTHQUANT_ALPHA = 0.7


def candidate_presets(isa: CpuIsa | None = None, *, gpu: bool = False) -> dict[str, dict[str, Any]]:
    """Named variants worth building for the target: ``{name: {"kind": ..., **options}}``.

    On AVX2 without VNNI the u8×s8 kernels (vpmaddubsw) can saturate int16
    sums, so s8 weights get reduce-range there (measured: without it SmoothQuant's
    larger weights saturate, p1 cosine 0.96); with VNNI (vpdpbusd sums in int32)
    full-range s8 is used. Per-tensor s8 and u8 weights are not offered:
    measured too inaccurate (s8) or slower than fp32 (u8 takes the slow u8×u8
    path). Beyond the plain per-channel baseline, the fidelity-first candidates
    of the INT8 search: SmoothQuant (alpha 0.7) with the k = 2 or 4 most
    sensitive MatMuls of the committed ranking kept fp32
    (:mod:`embedkit.variants.ranking`; no measurement at release time). Static
    QDQ is not offered: slower and less faithful than dynamic here (long texts
    leave the calibrated ranges). With OpenVINO installed (the extra ``openvino``), its
    fp32, BF16 (on a CPU with AVX512_BF16 or AMX) and NNCF INT8 compete too. The gate
    decides; these are only the candidates. ``gpu`` targets get fused FP32 and FP16 only.
    """
    isa = isa or detect_isa()
    presets: dict[str, dict[str, Any]] = {"fused-fp32": {"kind": "fused-fp32"}}
    if gpu:
        presets["fp16"] = {"kind": "fp16"}
        return presets
    rr = not isa.vnni
    suffix = "-rr" if rr else ""
    base = {"kind": "dynamic-int8", "weight_type": "s8", "per_channel": True, "reduce_range": rr}
    sq = {"smoothquant_alpha": SMOOTHQUANT_ALPHA}
    presets[f"dynamic-int8-s8-pc{suffix}"] = dict(base)
    presets[f"dynamic-int8-s8-pc{suffix}-sq-k2"] = {**base, **sq, "keep_fp32": 2}
    presets[f"dynamic-int8-s8-pc{suffix}-sq-k4"] = {**base, **sq, "keep_fp32": 4}
    if toolchain.runtime_version("openvino") != "absent":
        presets["openvino-fp32"] = {"kind": "openvino-fp32"}
        if isa.bf16:
            presets["openvino-bf16"] = {"kind": "openvino-bf16"}
        presets["openvino-int8"] = {"kind": "openvino-int8"}
    return presets


def rerank_presets(isa: CpuIsa | None = None) -> dict[str, dict[str, Any]]:
    """A reranker's candidates: fused FP32, plain dynamic INT8 (s8 per-channel, reduce-range
    without VNNI, as :func:`candidate_presets`) and, with OpenVINO installed, its fp32.

    Left out: what calibrates (SmoothQuant, static INT8, NNCF INT8), since the calibration
    reader feeds single sentences with query-only type ids, not the pairs a cross-encoder
    sees, and the keep-fp32 rankings, measured on embedding models. A preset file may still
    ask for them; the per-segment gate judges whatever is built.
    """
    isa = isa or detect_isa()
    rr = not isa.vnni
    presets: dict[str, dict[str, Any]] = {
        "fused-fp32": {"kind": "fused-fp32"},
        f"dynamic-int8-s8-pc{'-rr' if rr else ''}": {
            "kind": "dynamic-int8",
            "weight_type": "s8",
            "per_channel": True,
            "reduce_range": rr,
        },
    }
    if toolchain.runtime_version("openvino") != "absent":
        presets["openvino-fp32"] = {"kind": "openvino-fp32"}
    return presets


# --- variants -----------------------------------------------------------------------


def optimize_fp32(parent: Artifact, output: Path, *, write: bool = True) -> Artifact:
    """Fused FP32: ORT's transformer optimiser (attention, LayerNorm, GELU, embedding fusions).

    ``opt_level=0`` keeps the saved graph portable across providers: only the
    Python-side fusions are applied; ORT's own provider-specific rewrites still
    run at session creation. Fused attention assumes right-side padding, which
    is what our tokenizer does.
    """

    def build(src: Path, dst: Path) -> dict[str, Any]:
        stats = _fuse(src, dst)
        return {
            "optimizer": "onnxruntime.transformers.optimizer",
            "model_type": "bert",
            "opt_level": 0,
            "fusions": stats,
        }

    return staged(parent, output, build, "fused-fp32", write)


def _fuse(src: Path, dst: Path) -> dict[str, int]:
    from onnxruntime.transformers import optimizer

    # num_heads/hidden_size 0: detected from the graph's Reshape constants (works for
    # Optimum-exported BERT-style graphs); the attention check below catches a miss.
    model = optimizer.optimize_model(
        str(src), model_type="bert", num_heads=0, hidden_size=0, opt_level=0
    )
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    if not stats.get("Attention") and not stats.get("MultiHeadAttention"):
        raise ArtifactError(
            f"the transformer optimiser fused no attention ({stats}); not a BERT graph?"
        )
    model.save_model_to_file(str(dst))
    return stats


def _matching_nodes(model_path: Path, patterns: Sequence[str]) -> list[str]:
    """Names of nodes containing any pattern; a pattern matching nothing is an error."""
    if not patterns:
        return []
    import onnx

    names = [n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node]
    out = []
    for pattern in patterns:
        hits = [n for n in names if pattern in n]
        if not hits:
            raise InvalidInput(f"exclude pattern {pattern!r} matches no node of the graph")
        out += hits
    return sorted(set(out))


def _weight_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    if name not in WEIGHT_TYPES:
        raise InvalidInput(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}, got {name!r}")
    return QuantType.QInt8 if name == "s8" else QuantType.QUInt8


def weight_matmuls(model_path: Path) -> list[str]:
    """Names of the MatMuls with a constant weight (the ones INT8 quantisation turns integer)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _fp32_nodes(
    parent: Artifact, model_path: Path, exclude: Sequence[str], keep_fp32: int
) -> tuple[list[str], dict[str, Any]]:
    """Nodes left in fp32: those matching ``exclude`` plus the ``keep_fp32`` most sensitive
    weight MatMuls of the committed ranking (:mod:`embedkit.variants.ranking`)."""
    if keep_fp32 < 0:
        raise InvalidInput(f"keep_fp32 must be >= 0, got {keep_fp32}")
    kept, source = ranking.most_sensitive(
        parent.manifest.model_id, weight_matmuls(model_path), keep_fp32, detect_isa().level
    )
    excluded = sorted(set(_matching_nodes(model_path, exclude)) | set(kept))
    return excluded, {"keep_fp32": keep_fp32, "kept_fp32": kept, "ranking": source}


def _smoothed(
    parent: Artifact, src: Path, work: Path, alpha: float | None, sentences: Sequence[str]
) -> tuple[Path, dict[str, Any] | None]:
    """``src`` after SmoothQuant with ``alpha`` (None: unchanged), ranges from ``sentences``."""
    if alpha is None:
        return src, None
    dst = work / "smoothed.onnx"
    record = smoothquant.smooth(src, dst, SentenceCalibrationReader(parent, sentences), alpha=alpha)
    return dst, record


def quantize_dynamic_int8(
    parent: Artifact,
    output: Path,
    *,
    weight_type: str = "s8",
    per_channel: bool = True,
    reduce_range: bool = False,
    op_types: Sequence[str] | None = None,
    fused: bool = False,
    exclude: Sequence[str] = (),
    keep_fp32: int = 0,
    smoothquant_alpha: float | None = None,
    calibration: Path | None = None,
    size: int = 512,
    seed: int = 0,
    write: bool = True,
) -> Artifact:
    """Dynamic INT8 (weights quantised offline, activations per batch at run time).

    ``op_types`` defaults to MatMul (plus Attention on a fused graph); Gather
    (embeddings) stays fp32 because quantising it costs accuracy for no speed.
    ``fused`` first applies :func:`optimize_fp32`'s fusions. ``exclude`` keeps
    nodes whose name contains any of the given substrings in fp32, ``keep_fp32``
    the k most sensitive weight MatMuls of the committed ranking (mixed precision
    for the few layers that dominate the error). ``smoothquant_alpha`` first
    applies :mod:`embedkit.variants.smoothquant`, its ranges measured on
    ``size`` sentences of ``calibration`` (default: STS Benchmark train).
    """
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    wtype = _weight_type(weight_type)
    ops = list(op_types) if op_types else (["MatMul", "Attention"] if fused else ["MatMul"])
    isa = detect_isa()
    sentences, calib = (
        calibration_sentences(calibration, size, seed)
        if smoothquant_alpha is not None
        else ([], None)
    )

    def build(src: Path, dst: Path) -> dict[str, Any]:
        work = dst.parent.parent / "work"
        fusions: dict[str, int] = {}
        if fused:
            fused_path = work / "fused.onnx"
            fusions = _fuse(src, fused_path)
            src = fused_path
        src, smooth = _smoothed(parent, src, work, smoothquant_alpha, sentences)
        excluded, kept = _fp32_nodes(parent, src, exclude, keep_fp32)
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=wtype,
            per_channel=per_channel,
            reduce_range=reduce_range,
            op_types_to_quantize=ops,
            nodes_to_exclude=excluded,
            # Contrib ops (Attention, SkipLayerNormalization) defeat ONNX shape
            # inference on a fused graph; their outputs are float32.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        return {
            "weight_type": weight_type,
            "activation_type": "u8",
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "op_types": ops,
            "fused": fused,
            "fusions": fusions,
            "exclude": list(exclude),
            "excluded_nodes": len(excluded),
            **kept,
            "smoothquant": smooth,
            "isa": isa.to_dict(),
            **({"calibration": calib} if calib else {}),
        }

    return staged(parent, output, build, "dynamic-int8", write)


# --- static INT8 ----------------------------------------------------------------------


def quantize_static_int8(
    parent: Artifact,
    output: Path,
    *,
    calibration: Path | None = None,
    size: int = 512,
    method: str = "percentile",
    per_channel: bool = True,
    reduce_range: bool = False,
    activation_type: str = "u8",
    quantize_outputs: bool = False,
    op_types: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    keep_fp32: int = 0,
    smoothquant_alpha: float | None = None,
    seed: int = 0,
    write: bool = True,
) -> Artifact:
    """Static INT8 in QDQ format, activation ranges calibrated on real sentences.

    The graph is pre-processed (symbolic shape inference + ORT basic
    optimisation) first, as ORT recommends. Only weight MatMuls are quantised
    (``op_types`` MatMul with constant B): LayerNorm, GELU, the residual Adds,
    the embedding Gather→Add, the mask Add→Softmax and the attention-score
    MatMuls stay fp32 — the exclusions BERT needs. ``activation_type`` s8 gives
    s8×s8 QDQ (symmetric ranges), u8 the u8×s8 kernels. ``quantize_outputs``
    also puts Q/DQ on each MatMul's output (ORT's default): a second static
    rounding of ranges fitted to other sentences, which cost most of the
    fidelity when measured (docs/quantization.md). ``smoothquant_alpha`` and ``keep_fp32`` as
    in :func:`quantize_dynamic_int8`. The calibration file's sha256, the number
    of sentences and the sampling seed go into the manifest.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise InvalidInput(
            f"calibration method must be one of {', '.join(methods)}, got {method!r}"
        )
    if activation_type not in WEIGHT_TYPES:
        raise InvalidInput(
            f"activation_type must be one of {', '.join(WEIGHT_TYPES)}, got {activation_type!r}"
        )
    sentences, calib = calibration_sentences(calibration, size, seed)
    ops = list(op_types) if op_types else ["MatMul"]
    isa = detect_isa()

    def build(src: Path, dst: Path) -> dict[str, Any]:
        work = dst.parent.parent / "work"
        src, smooth = _smoothed(parent, src, work, smoothquant_alpha, sentences)
        pre = work / "pre.onnx"
        # auto_merge: the dynamic batch/sequence dims otherwise stop symbolic inference.
        # It writes scratch files into the working directory: keep them in `work`.
        with contextlib.chdir(work):
            quant_pre_process(str(src), str(pre), auto_merge=True)
        reader = SentenceCalibrationReader(parent, sentences)
        excluded, kept = _fp32_nodes(parent, pre, exclude, keep_fp32)
        quantize_static(
            str(pre),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            nodes_to_exclude=excluded,
            op_types_to_quantize=ops,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QInt8 if activation_type == "s8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options={
                "MatMulConstBOnly": True,
                "ActivationSymmetric": activation_type == "s8",
                "OpTypesToExcludeOutputQuantization": [] if quantize_outputs else ops,
            },
        )
        return {
            "format": "QDQ",
            "method": method,
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "activation_type": activation_type,
            "quantize_outputs": quantize_outputs,
            "weight_type": "s8",
            "op_types": ops,
            "exclude": list(exclude),
            "excluded_nodes": len(excluded),
            **kept,
            "smoothquant": smooth,
            "isa": isa.to_dict(),
            "calibration": calib,
        }

    return staged(parent, output, build, "static-int8", write)


# --- FP16 --------------------------------------------------------------------------------


def convert_fp16(parent: Artifact, output: Path, *, write: bool = True) -> Artifact:
    """FP16 for GPUs: fuse for GPU, convert weights/compute to fp16, keep float32 I/O.

    Built and structurally validated anywhere (:func:`check_fp16_structure`);
    numerically meaningful only on a GPU provider — ORT's CPU provider lacks
    fp16 kernels for most ops and either fails or falls back slowly.
    """
    from onnxruntime.transformers import optimizer

    def build(src: Path, dst: Path) -> dict[str, Any]:
        model = optimizer.optimize_model(
            str(src), model_type="bert", num_heads=0, hidden_size=0, opt_level=0, use_gpu=True
        )
        stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(dst))
        return {"keep_io_types": True, "fused_for_gpu": True, "fusions": stats}

    artifact = staged(parent, output, build, "fp16", write)
    check_fp16_structure(artifact)
    return artifact


def check_fp16_structure(artifact: Artifact) -> dict[str, Any]:
    """onnx.checker passes, graph I/O stay float32 and float weights are fp16; else raise."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(artifact.model_path))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ArtifactError(f"fp16 graph fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    out_types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    if any(t != TensorProto.FLOAT for t in out_types.values()):
        raise ArtifactError(f"fp16 graph outputs must stay float32, got {out_types}")
    floats = [
        i
        for i in model.graph.initializer
        if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
    ]
    fp16 = sum(i.data_type == TensorProto.FLOAT16 for i in floats)
    fp16_bytes = sum(len(i.raw_data) for i in floats if i.data_type == TensorProto.FLOAT16)
    all_bytes = sum(len(i.raw_data) or 4 * len(i.float_data) for i in floats)
    share = fp16_bytes / all_bytes if all_bytes else 0.0
    if share < 0.95:
        raise ArtifactError(f"only {share:.0%} of float weight bytes are fp16")
    return {
        "initializers_fp16": fp16,
        "initializers_float": len(floats),
        "fp16_weight_share": share,
    }


# --- dispatch -----------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[..., Artifact]] = {
    "fused-fp32": optimize_fp32,
    "dynamic-int8": quantize_dynamic_int8,
    "static-int8": quantize_static_int8,
    "fp16": convert_fp16,
}


def check_variant(kind: str, options: Mapping[str, Any]) -> Callable[..., Artifact]:
    """The builder of ``kind``, or InvalidInput naming an unknown kind or option (checked
    before minutes of export when the options come from a file)."""
    builders = {**_BUILDERS, **openvino.BUILDERS}
    try:
        builder = builders[kind]
    except KeyError:
        raise InvalidInput(
            f"unknown variant kind {kind!r} (one of {', '.join(builders)})"
        ) from None
    accepted = set(inspect.signature(builder).parameters) - {"parent", "output", "write"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InvalidInput(
            f"unknown option(s) for {kind}: {', '.join(unknown)} "
            f"(accepted: {', '.join(sorted(accepted))})"
        )
    return builder


def build_variant(
    parent: Artifact, kind: str, output: Path, *, write: bool = True, **options: Any
) -> Artifact:
    """Build one variant of ``parent`` into ``output`` (see the per-kind functions for options).

    A variant is a version of its own: its manifest is written once, here, unless
    ``write=False`` leaves that to the caller (the release, which adds the gate's verdict
    and the records first)."""
    return check_variant(kind, options)(parent, output, write=write, **options)
