"""Roofline context for benchmark numbers: model FLOPs per token and the CPU's estimated peak.

A texts/s figure alone does not say whether a variant is near the hardware's
limit or wasting it. This module counts the arithmetic of the exported graph
and estimates the machine's peak, so the report can state the achieved share.

FLOPs per token (one multiply-add = 2 FLOPs), read from the ONNX graph:

    flops(L) = W + A·L
    W = Σ over MatMul/Gemm nodes with a 2-D weight initializer [K, N] of 2·K·N
    A = (MatMuls with no initializer input: QKᵀ and attention·V) × 2·H

with L the sequence length and H the hidden size (the first weight's K). W is
the per-token cost of the projections and feed-forward layers; A·L the
attention score and mixing cost, which grows with length. Embedding lookups,
LayerNorm, softmax and GELU are left out (a few % on BERT-sized models).

Peak (an *estimate*, stated as such in every report):

    peak = cores × GHz × FP32 FLOP/cycle/core

FLOP/cycle/core is the FMA datapath width, per microarchitecture where the
vendor and family in /proc/cpuinfo identify it (:func:`fp32_flop_per_cycle`):
AMD Zen 2/3/4 (families 17h from model 30h, and 19h) have two 256-bit FMA
pipes, 32 — Zen 4 runs AVX-512 as two 256-bit halves, so its AVX-512 flag
does not double it; Zen 1 has 128-bit pipes, 16. Otherwise by ISA: 64 with
AVX-512 (2 FMA units × 16 lanes × 2), 32 with AVX2+FMA (2 × 8 × 2), 8
without; some Intel parts have only one AVX-512 FMA unit, so 64 is an upper
bound there.

The frequency is the mean ``cpu MHz`` of /proc/cpuinfo (the current clock; turbo
and AVX-512 down-clocking move it). The true peak may be lower than this
estimate, so an achieved share can understate how close to the limit a variant runs. INT8
kernels have a higher integer peak; their share is still stated against the FP32
peak (same model arithmetic), which is what makes variants comparable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from embedkit.variants.quantize import detect_isa

_WEIGHT_OPS = {"MatMul", "Gemm", "MatMulInteger", "FusedMatMul"}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def cpu_ghz(cpuinfo: str | None = None) -> float | None:
    """Mean current clock of the CPUs in /proc/cpuinfo, in GHz (None if unknown)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # pragma: no cover - non-Linux
            return None
    mhz = []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                mhz.append(float(value))
            except ValueError:
                continue
    return sum(mhz) / len(mhz) / 1000 if mhz else None


def _model_name(cpuinfo: str) -> str:
    return _cpuinfo_field(cpuinfo, "model name") or "unknown"


def _cpuinfo_field(cpuinfo: str, name: str) -> str | None:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def fp32_flop_per_cycle(cpuinfo: str) -> tuple[int, str]:
    """FP32 FLOP/cycle/core of the first CPU in ``cpuinfo`` text and the basis of the figure."""
    isa = detect_isa(cpuinfo)
    vendor = _cpuinfo_field(cpuinfo, "vendor_id")
    try:
        family = int(_cpuinfo_field(cpuinfo, "cpu family") or "")
        model = int(_cpuinfo_field(cpuinfo, "model") or "")
    except ValueError:
        family = model = -1
    if vendor == "AuthenticAMD" and isa.avx2:
        if family == 0x19:
            return 32, "AMD family 19h (Zen 3/4): 2 × 256-bit FMA; AVX-512 in two halves"
        if family == 0x17:
            if model >= 0x30:
                return 32, "AMD family 17h model >= 30h (Zen 2): 2 × 256-bit FMA"
            return 16, "AMD family 17h model < 30h (Zen/Zen+): 2 × 128-bit FMA"
    if isa.avx512f:
        return 64, "AVX-512F: 2 × 512-bit FMA assumed (upper bound)"
    if isa.avx2:
        return 32, "AVX2+FMA: 2 × 256-bit FMA"
    return 8, "no AVX2: scalar/SSE estimate"


def machine() -> dict[str, Any]:
    """Detected ISA, usable cores, clock and the estimated FP32 peak of this machine."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # pragma: no cover - non-Linux
        cpuinfo = ""
    isa = detect_isa(cpuinfo)
    flops_cycle, basis = fp32_flop_per_cycle(cpuinfo)
    ghz = cpu_ghz(cpuinfo)
    cores = _cores()
    peak = cores * ghz * flops_cycle if ghz else None
    return {
        "cpu": _model_name(cpuinfo),
        "isa": isa.to_dict(),
        "cores": cores,
        "ghz": round(ghz, 3) if ghz else None,
        "fp32_flop_per_cycle_per_core": flops_cycle,
        "fp32_flop_per_cycle_basis": basis,
        "peak_gflops_estimate": round(peak, 1) if peak else None,
        "peak_formula": "cores × GHz × FP32 FLOP/cycle/core (estimate)",
    }


def model_flops(model_path: Path) -> dict[str, Any]:
    """``W`` and ``A`` of ``flops(L) = W + A·L`` counted from the graph (needs ``onnx``)."""
    try:
        import onnx
    except ImportError:  # serving installs lack onnx: the report says so instead of guessing
        return {"available": False, "reason": "onnx is not installed (export extra)"}
    model = onnx.load(str(model_path), load_external_data=False)
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    weight_flops = 0
    dynamic = 0
    hidden = None
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_OPS:
            continue
        weights = [shapes[i] for i in node.input[:2] if i in shapes]
        if not weights:
            dynamic += 1
            continue
        dims = weights[0]
        if len(dims) != 2:
            continue
        k, n = dims
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            k, n = n, k
        weight_flops += 2 * k * n
        hidden = hidden or k
    per_position = dynamic * 2 * (hidden or 0)
    return {
        "available": True,
        "weight_flops_per_token": weight_flops,
        "attention_flops_per_token_per_position": per_position,
        "attention_matmuls": dynamic,
        "hidden": hidden,
        "formula": "flops/token(L) = W + A·L; W = Σ 2·K·N over weight MatMul/Gemm; "
        "A = 2·H × (MatMuls without weights)",
    }


def flops_per_token(flops: dict[str, Any], mean_length: float) -> float | None:
    if not flops.get("available"):
        return None
    return (
        float(flops["weight_flops_per_token"])
        + float(flops["attention_flops_per_token_per_position"]) * mean_length
    )


def achieved(
    tokens_per_s: float, flops: dict[str, Any], mean_length: float, peak_gflops: float | None
) -> dict[str, float | None]:
    """Useful GFLOP/s (real tokens only, padding is waste) and its share of the estimated peak."""
    per_token = flops_per_token(flops, mean_length)
    if per_token is None:
        return {"gflops": None, "share_of_peak": None}
    gflops = tokens_per_s * per_token / 1e9
    return {"gflops": gflops, "share_of_peak": gflops / peak_gflops if peak_gflops else None}
