"""Versions of the toolchain that built (or serves) an artifact, for the manifest."""

from __future__ import annotations

import importlib.metadata
import platform

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
