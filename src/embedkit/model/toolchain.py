"""What built (or serves) an artifact, for the manifest: toolchain versions, and the
platform a variant was measured on (CPU instruction-set level, runtime and its version).

INT8 kernels differ between CPUs with and without VNNI, BF16 runs natively only with
AVX512_BF16 or AMX, so a variant's gate verdict holds only for the ISA level and runtime
it was measured on; both are read here without importing a runtime (the HTTP front uses
this module too).
"""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_DISTRIBUTIONS = (
    "embedkit",
    "torch",
    "transformers",
    "sentence-transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "nncf",
    "tokenizers",
    "numpy",
    "bentoml",
)


def versions() -> dict[str, str]:
    """Installed versions of the distributions that matter (absent ones omitted)."""
    out = {"python": platform.python_version()}
    for dist in _DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


# The runtimes a graph can run on, and the distributions that provide each.
RUNTIMES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "openvino": ("openvino",),
}


def runtime_version(runtime: str = "onnxruntime") -> str:
    """The installed version of ``runtime`` (ONNX Runtime: its CPU or GPU build), or
    ``"absent"``."""
    for dist in RUNTIMES[runtime]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def installed_runtimes() -> dict[str, str]:
    """``{runtime: version}`` for every runtime embedkit knows, ``"absent"`` if missing."""
    return {name: runtime_version(name) for name in RUNTIMES}


# Every value of :attr:`CpuIsa.level`, best capability first.
ISA_LEVELS = ("amx", "avx512-bf16", "avx512-vnni", "avx512", "avx2-vnni", "avx2", "generic")


@dataclass(frozen=True)
class CpuIsa:
    """The integer-matmul-relevant instruction-set flags of this CPU."""

    avx2: bool
    avx512f: bool
    avx512_vnni: bool
    avx_vnni: bool
    amx: bool
    avx512_bf16: bool = False

    @property
    def bf16(self) -> bool:
        """Native BF16 arithmetic (AVX512_BF16 or AMX): what OpenVINO's BF16 needs."""
        return self.avx512_bf16 or self.amx

    @property
    def vnni(self) -> bool:
        return self.avx512_vnni or self.avx_vnni

    @property
    def level(self) -> str:
        """One label for presets and the manifest, best capability first."""
        if self.amx:
            return "amx"
        if self.avx512_bf16:
            return "avx512-bf16"
        if self.avx512_vnni:
            return "avx512-vnni"
        if self.avx512f:
            return "avx512"
        if self.avx_vnni:
            return "avx2-vnni"
        return "avx2" if self.avx2 else "generic"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "level": self.level}


def detect_isa(cpuinfo: str | None = None) -> CpuIsa:
    """Parse the ``flags`` line of /proc/cpuinfo (or the given text)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # pragma: no cover - non-Linux: assume nothing
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            break
    return CpuIsa(
        avx2="avx2" in flags,
        avx512f="avx512f" in flags,
        avx512_vnni="avx512_vnni" in flags,
        avx_vnni="avx_vnni" in flags,
        amx=any(f.startswith("amx") for f in flags),
        avx512_bf16="avx512_bf16" in flags,
    )
