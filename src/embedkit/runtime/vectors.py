"""Vectors after the model: Matryoshka truncation, L2 normalisation, wire encodings.

Plain numpy, so the HTTP front (which post-processes the Embedder's raw pooled
vectors per request) never imports onnxruntime; the engine uses the same code,
so in-process and served vectors are the same numbers.
"""

from __future__ import annotations

import base64

import numpy as np

from embedkit.core.errors import InferenceError, InvalidDimensions

_NORM_EPS = 1e-12  # as torch.nn.functional.normalize, which sentence-transformers uses


def check_dimensions(dimensions: object, model_dim: int) -> int | None:
    """``None`` (full size) or an int in ``[1, model_dim]``; else :class:`InvalidDimensions`."""
    if dimensions is None:
        return None
    if isinstance(dimensions, bool) or not isinstance(dimensions, int | np.integer):
        raise InvalidDimensions(
            f"dimensions must be an integer, got {type(dimensions).__name__}", param="dimensions"
        )
    if not 1 <= int(dimensions) <= model_dim:
        raise InvalidDimensions(
            f"dimensions must be between 1 and {model_dim} for this model, got {dimensions}",
            param="dimensions",
        )
    return int(dimensions)


def postprocess(
    vectors: np.ndarray, *, normalize: bool, dimensions: int | None, model_dim: int
) -> np.ndarray:
    """Matryoshka-truncate, then L2-normalise if asked; float32; refuse NaN/Inf.

    Truncation comes first so a truncated vector is re-normalised to unit length.
    """
    dims = check_dimensions(dimensions, model_dim)
    out = np.asarray(vectors, dtype=np.float32)
    if out.ndim != 2 or out.shape[1] != model_dim:
        raise InferenceError(f"expected vectors of shape [n, {model_dim}], got {list(out.shape)}")
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise InferenceError(
            f"the model produced NaN/Inf for {rows.size} input(s), first at index {int(rows[0])}"
        )
    if dims is not None and dims < model_dim:
        out = out[:, :dims]
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.maximum(norms, _NORM_EPS)
    return np.ascontiguousarray(out, dtype=np.float32)


def encode_base64(vectors: np.ndarray) -> str:
    """Little-endian float32 bytes, base64 (what OpenAI's ``encoding_format=base64`` returns)."""
    return base64.b64encode(np.ascontiguousarray(vectors, dtype="<f4").tobytes()).decode("ascii")


def decode_base64(data: str, dim: int) -> np.ndarray:
    """The inverse of :func:`encode_base64`: an ``[n, dim]`` float32 array."""
    return np.frombuffer(base64.b64decode(data), dtype="<f4").reshape(-1, dim)
