"""Vectors after the model: Matryoshka truncation, L2 normalisation, wire encodings
(float32, base64, and the int8/uint8/binary/ubinary codes).

Plain numpy, so the HTTP front (which post-processes the Embedder's raw pooled
vectors per request) never imports onnxruntime; the engine uses the same code,
so in-process and served vectors are the same numbers.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np

from embedkit.core.errors import EncodingUnavailable, InferenceError, InvalidDimensions

Quantized = Literal["int8", "uint8", "binary", "ubinary"]
QUANTIZED: tuple[Quantized, ...] = ("int8", "uint8", "binary", "ubinary")
RANGED: tuple[Quantized, ...] = ("int8", "uint8")  # the ones that need calibrated ranges

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


def quantize(vectors: np.ndarray, encoding: Quantized, ranges: np.ndarray | None) -> np.ndarray:
    """sentence-transformers' ``quantize_embeddings`` (same arithmetic, same codes), in numpy
    so the front needs no torch. ``ranges`` is ``[2, n >= dim]`` (min row, max row): its
    first ``dim`` columns bucket each dimension into 256 (floor, clipped), so a request
    for fewer dimensions uses the same buckets for those it keeps. binary/ubinary keep
    the sign bit (> 0) of each dimension, 8 to a byte (``np.packbits``: the last byte
    zero-padded when dim is not a multiple of 8); binary is ubinary - 128 as int8."""
    if encoding in ("binary", "ubinary"):
        bits = np.packbits(vectors > 0, axis=-1).reshape(vectors.shape[0], -1)
        return (bits.astype(np.int16) - 128).astype(np.int8) if encoding == "binary" else bits
    if ranges is None:
        raise EncodingUnavailable(f"{encoding} needs calibrated ranges", param="encoding_format")
    dim = vectors.shape[1]
    starts = ranges[0, :dim]
    steps = (ranges[1, :dim] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    codes = np.clip(np.floor((vectors - starts) / steps), 0, 255)
    return codes.astype(np.uint8) if encoding == "uint8" else (codes - 128).astype(np.int8)


def encode_codes(
    vectors: np.ndarray,
    encoding: Quantized,
    *,
    normalize: bool,
    dimensions: int | None,
    model_dim: int,
    ranges: np.ndarray | None,
) -> np.ndarray:
    """The codes served for the model's raw ``vectors``: normalised (if asked) at full
    size, then the first ``dimensions`` quantised. So codes for n dimensions are the first
    n codes of the whole vector's: re-normalising the shorter vector first would push its
    values past the calibrated ranges (docs/encodings.md measures how far). Binary codes
    are the same either way (normalising keeps every sign)."""
    whole = postprocess(vectors, normalize=normalize, dimensions=None, model_dim=model_dim)
    keep = check_dimensions(dimensions, model_dim) or model_dim
    return quantize(whole[:, :keep], encoding, ranges)


def finish(
    raw: np.ndarray,
    encoding: str,
    *,
    normalize: bool,
    dimensions: int | None,
    model_dim: int,
    ranges: np.ndarray | None,
) -> np.ndarray:
    """What a client gets from the model's raw pooled rows: codes for a quantized
    ``encoding`` (:func:`encode_codes`), float32 otherwise (:func:`postprocess`). One
    function for the HTTP front and `embed-corpus`, so their vectors cannot drift apart."""
    if encoding in QUANTIZED:
        return encode_codes(
            raw,
            encoding,
            normalize=normalize,
            dimensions=dimensions,
            model_dim=model_dim,
            ranges=ranges,
        )
    return postprocess(raw, normalize=normalize, dimensions=dimensions, model_dim=model_dim)


def activate(raw: np.ndarray, activation: str) -> np.ndarray:
    """CrossEncoder's activation_fn on raw scores, in float32 (Sigmoid as ``(1 + tanh(x/2))
    / 2``: equal, and no overflow warning for a very negative logit)."""
    x = np.asarray(raw, dtype=np.float32)
    if activation == "sigmoid":
        return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)
    if activation == "tanh":
        return np.tanh(x).astype(np.float32)
    return x


def calibrate_ranges(vectors: np.ndarray) -> np.ndarray:
    """``[2, dim]``: each dimension's min and max over ``vectors`` (what
    ``quantize_embeddings`` derives from its ``calibration_embeddings``)."""
    return np.vstack((vectors.min(axis=0), vectors.max(axis=0)))


def codes_base64(codes: np.ndarray) -> str:
    """The raw bytes of int8/uint8 codes (row-major), base64."""
    return base64.b64encode(np.ascontiguousarray(codes).tobytes()).decode("ascii")
