"""What each output encoding costs and keeps: bytes per vector and SciFact retrieval.

`embedkit bench-encodings` (docs/encodings.md). The corpus and the queries are encoded
once by the fp32 engine (cached like the quality evaluation's vectors); every encoding
is then the served codes of those vectors (:func:`embedkit.runtime.vectors.encode_codes`
with the manifest's calibrated ranges, or ranges calibrated here as a release would).

Search follows sentence-transformers' quantized search (``semantic_search_faiss``):
the queries are quantised like the corpus and ranked by inner product of the codes
(int8/uint8) or Hamming distance (binary/ubinary: the same bits); with rescoring, the
first stage keeps ``100 × multiplier`` candidates per query, re-ranked by the float32
query · the candidate's codes (binary: its unpacked 0/1 bits), and the top 100 count.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from embedkit.core.errors import InvalidInput
from embedkit.core.settings import get_settings
from embedkit.model.artifact import Artifact
from embedkit.quality import retrieval
from embedkit.quality.evaluate import engine_vectors
from embedkit.release import calibration
from embedkit.runtime.vectors import QUANTIZED, RANGED, Quantized, encode_codes
from embedkit_bench.peers import embedkit_version
from embedkit_bench.roofline import machine

TOP = 100  # recall@100's depth: what a first stage must hand over


def _bits(codes: np.ndarray, encoding: Quantized) -> np.ndarray:
    """binary/ubinary codes unpacked to 0/1 floats (binary is ubinary - 128)."""
    packed = (codes.astype(np.int16) + 128).astype(np.uint8) if encoding == "binary" else codes
    return np.unpackbits(packed, axis=1).astype(np.float32)


def _first_stage(q: np.ndarray, d: np.ndarray, encoding: Quantized) -> np.ndarray:
    """Scores of quantised queries against quantised documents (higher is closer)."""
    if encoding in ("binary", "ubinary"):
        qb, db = _bits(q, encoding), _bits(d, encoding)
        return 2 * qb @ db.T - qb.sum(1, keepdims=True) - db.sum(1)  # = -Hamming distance
    return q.astype(np.float32) @ d.astype(np.float32).T


def _doc_values(d: np.ndarray, encoding: Quantized) -> np.ndarray:
    """What rescoring multiplies the float query with: the codes, or unpacked bits."""
    if encoding in ("binary", "ubinary"):
        return _bits(d, encoding)
    return d.astype(np.float32)


def searcher(
    queries: np.ndarray,
    docs: np.ndarray,
    encoding: Quantized,
    ranges: np.ndarray,
    *,
    rescore_multiplier: int | None,
) -> Callable[[slice], np.ndarray]:
    """``scores(rows)`` for :func:`embedkit.quality.retrieval.score_metrics`: the quantised
    search, rescored when ``rescore_multiplier`` is given (non-candidates score -inf)."""
    dim = queries.shape[1]
    q_codes, d_codes = (
        encode_codes(x, encoding, normalize=True, dimensions=None, model_dim=dim, ranges=ranges)
        for x in (queries, docs)
    )
    d_values = _doc_values(d_codes, encoding)

    def scores(rows: slice) -> np.ndarray:
        q = queries[rows]
        first = _first_stage(q_codes[rows], d_codes, encoding)
        if rescore_multiplier is None:
            return first
        keep = min(TOP * rescore_multiplier, first.shape[1])
        candidates = np.argpartition(-first, keep - 1, axis=1)[:, :keep]
        out = np.full(first.shape, -np.inf, dtype=np.float32)
        rescored = np.einsum("ij,ikj->ik", q, d_values[candidates])
        np.put_along_axis(out, candidates, rescored, axis=1)
        return out

    return scores


def clipping(docs: np.ndarray, ranges: np.ndarray, dims: tuple[int, ...]) -> list[dict[str, Any]]:
    """Share of values outside the calibrated ranges for fewer dimensions: the served codes
    (the whole unit vector's first n) vs re-normalising the first n before quantising."""
    rows = []
    for n in dims:
        lo, hi = ranges[0, :n], ranges[1, :n]
        prefix = docs[:, :n]
        renormed = prefix / np.maximum(np.linalg.norm(prefix, axis=1, keepdims=True), 1e-12)
        rows.append(
            {
                "dimensions": n,
                "served_clipped": round(float(((prefix < lo) | (prefix > hi)).mean()) * 100, 3),
                "renormalised_clipped": round(
                    float(((renormed < lo) | (renormed > hi)).mean()) * 100, 3
                ),
            }
        )
    return rows


def run(
    artifact: Artifact,
    *,
    max_docs: int | None = None,
    max_queries: int | None = None,
    rescore_multiplier: int = 4,
    calibration_texts: int | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Every encoding's bytes per vector and nDCG@10 / recall@100 on SciFact train, with
    and without rescoring, plus the clipping table. Raises InvalidInput when SciFact is
    absent or the artifact does not serve normalised vectors (the codes assume them)."""
    if not artifact.manifest.embedding_config.normalize:
        raise InvalidInput(f"{artifact.path}: the encodings table assumes normalised vectors")
    data = retrieval.load_beir(max_docs=max_docs, max_queries=max_queries)
    stored = artifact.manifest.encoding_ranges
    if stored is None:
        say("the manifest has no ranges: calibrating them as a release does")
        stored = calibration.calibrate(artifact, limit=calibration_texts)
    ranges = np.array([stored.min, stored.max])
    cache = get_settings().eval_cache_dir
    say(f"encoding {len(data.docs)} documents and {len(data.queries)} queries (fp32, cached)")
    docs = engine_vectors(artifact, data.docs, cache)
    queries = engine_vectors(artifact, data.queries, cache)
    dim = docs.shape[1]
    ndcg, recall = retrieval.rank_metrics(queries, docs, data)
    rows: list[dict[str, Any]] = [
        {"encoding": "float32", "bytes": 4 * dim, "ndcg_at_10": ndcg, "recall_at_100": recall}
    ]
    for encoding in QUANTIZED:
        say(f"searching with {encoding} codes")
        size = dim if encoding in RANGED else -(-dim // 8)  # one byte, or one bit, a dimension
        row: dict[str, Any] = {"encoding": encoding, "bytes": size}
        for label, multiplier in (("", None), ("rescored_", rescore_multiplier)):
            search = searcher(queries, docs, encoding, ranges, rescore_multiplier=multiplier)
            row[f"{label}ndcg_at_10"], row[f"{label}recall_at_100"] = retrieval.score_metrics(
                search, data
            )
        rows.append(row)
    host = machine()
    return {
        "dataset": data.name,
        "documents": len(data.docs),
        "queries": len(data.queries),
        "dimensions": dim,
        "rescore_multiplier": rescore_multiplier,
        "ranges": {"texts": stored.texts, "source": stored.source},
        "model": artifact.manifest.name,
        "rows": rows,
        "clipping": clipping(docs, ranges, (dim, dim * 2 // 3, dim // 3, dim // 6)),
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "embedkit": embedkit_version(),
        "machine": f"{host['cpu']}, {host['cores']} cores, Python {platform.python_version()}",
    }


def markdown(result: dict[str, Any], command: str) -> str:
    """The tables for docs/encodings.md."""
    float_bytes = result["rows"][0]["bytes"]
    lines = [
        f"Measured {result['when']} by `{command}` — embedkit {result['embedkit']}; "
        f"{result['machine']}; model {result['model']} ({result['dimensions']} dims); "
        f"{result['dataset']}: {result['documents']} documents, {result['queries']} queries; "
        f"int8/uint8 ranges from {result['ranges']['texts']} {result['ranges']['source']} "
        f"sentences; rescoring keeps {result['rescore_multiplier']}×100 candidates.",
        "",
        "| encoding | bytes/vector | smaller | nDCG@10 | recall@100 "
        "| nDCG@10 rescored | recall@100 rescored |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['encoding']} | {row['bytes']} | {float_bytes / row['bytes']:.0f}× "
            f"| {row['ndcg_at_10']:.2f} | {row['recall_at_100']:.2f} "
            f"| {_cell(row.get('rescored_ndcg_at_10'))} "
            f"| {_cell(row.get('rescored_recall_at_100'))} |"
        )
    lines += [
        "",
        "Values outside the calibrated ranges (clipped to the end buckets), % of all values, "
        "on the corpus vectors:",
        "",
        "| dimensions | served codes (first n of the unit vector) | re-normalised first n |",
        "|---:|---:|---:|",
    ]
    for row in result["clipping"]:
        lines.append(
            f"| {row['dimensions']} | {row['served_clipped']:.2f} | "
            f"{row['renormalised_clipped']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"
