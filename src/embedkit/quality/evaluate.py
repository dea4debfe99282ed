"""Per-segment scoring of an artifact variant (INT8, fused, FP16).

A variant is scored on every segment of :mod:`embedkit.quality.segments`, always
against the FP32 PyTorch reference *and* the FP32 ONNX artifact:

* Spearman (cosine vs gold score) where the segment has gold scores;
* embedding fidelity: min / p1 / mean cosine to FP32 and the top-10 neighbour
  overlap when each sentence1 retrieves its sentence2 among the segment;
* retrieval (when the optional SciFact data is present, :mod:`embedkit.quality.retrieval`):
  nDCG@10 and recall@100 of the variant searching an index it built itself, beside
  fp32 doing the same, and documents/s while indexing.

The report records what it was measured on (fp32 parent checksum, CPU ISA level,
ONNX Runtime version): a verdict holds only there.

:func:`evaluate` returns a :class:`QualityReport`; :mod:`embedkit.quality.gate`
judges it and :mod:`embedkit.quality.report` renders it. Nothing here decides
what to register.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from embedkit.core.errors import InvalidInput
from embedkit.core.settings import Settings, get_settings
from embedkit.model import toolchain
from embedkit.model.artifact import MODEL_FILE, TOKENIZER_FILE, Artifact, MeasuredOn
from embedkit.quality import retrieval as retrieval_data
from embedkit.quality.retrieval import RetrievalMetrics, RetrievalResult
from embedkit.quality.segments import GROUPS, LANGUAGES, Corpus, build_corpus
from embedkit.runtime.engine import Engine

TOP_K = 10


# --- encoders ---------------------------------------------------------------------------


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...


def default_reference_dir() -> Path:
    from embedkit.model.recipe import find_recipe

    return find_recipe(None).source.resolve()[0]


class _ReferenceEncoder:
    """The FP32 PyTorch model; torch is loaded only when asked to encode (a cache miss)."""

    def __init__(self, model_dir: Path) -> None:
        self._dir = model_dir

    def encode(self, texts: list[str]) -> np.ndarray:
        from embedkit.model.export import load_reference

        model = load_reference(self._dir)
        return np.asarray(
            model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True),
            dtype=np.float32,
        )


class _EngineEncoder:
    """An artifact through the serving engine (variants are judged as users will run them);
    the ORT session is created only when asked to encode."""

    def __init__(self, artifact: Artifact, settings: Settings | None) -> None:
        self._artifact, self._settings = artifact, settings

    def encode(self, texts: list[str]) -> np.ndarray:
        # judging: the gate runs unapproved variants (and TensorRT FP16) to judge them
        return np.asarray(Engine(self._artifact, self._settings, judging=True).encode(texts))


def reference_vectors(
    model_dir: Path, texts: list[str], cache_dir: Path | None, *, checksum: str | None = None
) -> np.ndarray:
    """Unit vectors of ``texts`` from the PyTorch reference, cached by its checksum (hashed
    here unless the caller already has it) and texts."""
    from embedkit.model.export import source_checksum

    key = "torch:" + (checksum or source_checksum(model_dir))
    return _cached_encode(_ReferenceEncoder(model_dir), texts, key, cache_dir)


def engine_key(artifact: Artifact) -> str:
    """The cache key of an artifact's engine vectors: its graph and tokenizer, and for
    another runtime than ONNX Runtime its mode (OpenVINO's fp32 and BF16 variants carry
    the parent's very graph: the precision is a compile hint)."""
    m = artifact.manifest
    runtime = "" if m.runtime == "onnxruntime" else f"{m.quantization.mode}:"
    return "onnx:" + runtime + m.files[MODEL_FILE] + m.files[TOKENIZER_FILE]


# The session settings that decide a variant's numbers: provider and kernels, graph fusion,
# threads, batch shapes (padding changes float sums).
_NUMERIC_SETTINGS = frozenset(
    {
        "providers",
        "graph_optimization_level",
        "intra_op_threads",
        "execution_mode",
        "trt_fp16",
        "token_aware_batching",
        "max_batch_tokens",
        "max_sub_batch_size",
    }
)


def measured_key(artifact: Artifact, settings: Settings | None) -> str:
    """The cache key of a judged variant's vectors: its graph and tokenizer *where they were
    measured* (the CPU's instruction-set level, the runtime and its version, the numeric session
    settings). An INT8 graph computes differently with and without VNNI, so its vectors are
    reused only on the same ISA level and runtime, never carried to another."""
    bound = (settings or get_settings()).model_dump(include=set(_NUMERIC_SETTINGS), mode="json")
    runtime = artifact.manifest.runtime
    label = "ort" if runtime == "onnxruntime" else runtime
    where = f"{toolchain.detect_isa().level}|{label} {toolchain.runtime_version(runtime)}"
    return f"{engine_key(artifact)}|{where}|{json.dumps(bound, sort_keys=True)}"


def engine_vectors(
    artifact: Artifact, texts: list[str], cache_dir: Path | None, settings: Settings | None = None
) -> np.ndarray:
    """Unit vectors of ``texts`` through the serving engine, cached like fp32's here."""
    return _cached_encode(
        _EngineEncoder(artifact, settings), texts, engine_key(artifact), cache_dir
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _cached_encode(
    encoder: Encoder, texts: list[str], key: str | None, cache_dir: Path | None
) -> np.ndarray:
    """Encode, caching to ``cache_dir`` by (encoder identity, texts) when both are given."""
    return _timed_encode(encoder, texts, key, cache_dir)[0]


def _timed_encode(
    encoder: Encoder, texts: list[str], key: str | None, cache_dir: Path | None
) -> tuple[np.ndarray, float | None]:
    """:func:`_cached_encode` plus the seconds encoding took (None on a cache hit)."""
    if key is None or cache_dir is None:
        return _encode(encoder, texts)
    digest = hashlib.sha256(("\n".join(texts) + "\0" + key).encode()).hexdigest()[:24]
    file = cache_dir / f"{digest}.npy"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One process encodes a set while another that needs the same set waits for it (two
    # evaluations side by side, e.g. a release's candidates or test workers), not beside it.
    with open(cache_dir / f".{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if file.is_file():
            return np.load(file), None
        vectors, seconds = _encode(encoder, texts)
        tmp = file.with_suffix(f".{time.monotonic_ns()}.tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(file)
    return vectors, seconds


def _encode(encoder: Encoder, texts: list[str]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    vectors = _unit(np.asarray(encoder.encode(texts), dtype=np.float32))
    return vectors, time.perf_counter() - started


# --- results --------------------------------------------------------------------------------


class CosineStats(BaseModel):
    model_config = ConfigDict(frozen=True)
    min: float
    p1: float
    mean: float


class SegmentResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    group: str
    pairs: int
    spearman_reference: float | None = Field(None, description="FP32 PyTorch, ×100.")
    spearman_fp32: float | None = Field(None, description="FP32 ONNX artifact, ×100.")
    spearman: float | None = Field(None, description="This variant, ×100.")
    drop_vs_reference: float | None = Field(None, description="Points lost vs PyTorch (×100).")
    drop_vs_fp32: float | None = None
    cosine_fp32: CosineStats
    cosine_reference: CosineStats
    overlap_fp32: float = Field(description="Mean top-k neighbour overlap with FP32 ONNX.")
    overlap_reference: float


class QualityReport(BaseModel):
    model_config = ConfigDict(frozen=True)
    artifact: str
    mode: str
    settings: dict[str, Any]
    model_sha256: str
    fp32_model_sha256: str
    reference_source_sha256: str
    texts: int
    seconds: float
    segments: list[SegmentResult]
    measured_on: MeasuredOn | None = Field(None, description="Where this was measured.")
    retrieval: RetrievalResult | None = None
    retrieval_note: str | None = Field(
        None, description="Why there are no retrieval scores (data absent, or not asked for)."
    )

    def segment(self, name: str) -> SegmentResult:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(name)


# --- metrics --------------------------------------------------------------------------------


def _spearman(a: np.ndarray, b: np.ndarray, gold: np.ndarray | None) -> float | None:
    if gold is None or len(gold) < 3:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(np.sum(a * b, axis=1), gold).statistic) * 100


def cosine_stats(x: np.ndarray, y: np.ndarray) -> CosineStats:
    """Min, 1st percentile and mean of the row-wise cosines of unit vectors ``x`` and ``y``."""
    cos = np.sum(x * y, axis=1)
    return CosineStats(
        min=float(cos.min()), p1=float(np.percentile(cos, 1)), mean=float(cos.mean())
    )


def _topk(q: np.ndarray, d: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ d.T), axis=1, kind="stable")[:, :k]


def neighbour_overlap(q: np.ndarray, d: np.ndarray, q_ref: np.ndarray, d_ref: np.ndarray) -> float:
    """Mean |top-k ∩ top-k_ref| / k when each query retrieves among all documents."""
    k = min(TOP_K, len(d))
    a, b = _topk(q, d, k), _topk(q_ref, d_ref, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _drop(base: float | None, variant: float | None) -> float | None:
    return None if base is None or variant is None else base - variant


def score_segments(
    corpus: Corpus, vectors: dict[str, dict[str, np.ndarray]]
) -> list[SegmentResult]:
    """``vectors[role][text]`` for roles variant / fp32 / reference → per-segment results."""
    results = []
    for seg in corpus.segments:
        emb = {
            role: (np.stack([v[t] for t in seg.s1]), np.stack([v[t] for t in seg.s2]))
            for role, v in vectors.items()
        }
        sp = {role: _spearman(a, b, seg.gold) for role, (a, b) in emb.items()}
        (v1, v2), (f1, f2), (r1, r2) = emb["variant"], emb["fp32"], emb["reference"]
        both_v, both_f, both_r = np.vstack([v1, v2]), np.vstack([f1, f2]), np.vstack([r1, r2])
        results.append(
            SegmentResult(
                name=seg.name,
                group=seg.group,
                pairs=len(seg.s1),
                spearman_reference=_round(sp["reference"]),
                spearman_fp32=_round(sp["fp32"]),
                spearman=_round(sp["variant"]),
                drop_vs_reference=_round(_drop(sp["reference"], sp["variant"])),
                drop_vs_fp32=_round(_drop(sp["fp32"], sp["variant"])),
                cosine_fp32=cosine_stats(both_v, both_f),
                cosine_reference=cosine_stats(both_v, both_r),
                overlap_fp32=neighbour_overlap(v1, v2, f1, f2),
                overlap_reference=neighbour_overlap(v1, v2, r1, r2),
            )
        )
    return results


# --- evaluate ----------------------------------------------------------------------------------


def evaluate(
    artifact: Artifact,
    *,
    fp32: Artifact,
    reference_dir: Path | None = None,
    groups: Sequence[str] = GROUPS,
    languages: Sequence[str] = LANGUAGES,
    max_pairs: int | None = None,
    lang_pairs: int | None = None,
    settings: Settings | None = None,
    cache_dir: Path | None = None,
    retrieval: bool = True,
    retrieval_docs: int | None = None,
    retrieval_queries: int | None = None,
    retrieval_dir: Path | None = None,
    fp32_settings: Settings | None = None,
) -> QualityReport:
    """Score ``artifact`` per segment against the FP32 ONNX ``fp32`` and the PyTorch reference.

    With ``cache_dir`` (callers pass ``settings.eval_cache_dir``), all three sets of
    embeddings are cached there by model checksum and text set, the variant's also by where
    it runs (:func:`measured_key`); without, all three are encoded.
    With ``retrieval`` and the SciFact data present, both also index the corpus
    (bounded by ``retrieval_docs``/``retrieval_queries`` for quick runs).
    ``fp32_settings`` (default: ``settings``) runs the FP32 side elsewhere, e.g. CUDA FP32
    against a TensorRT FP16 run of the same graph; the cache key does not name the
    provider, so give each provider its own ``cache_dir``.
    Write the report with :func:`embedkit.quality.report.write_report`.
    """
    from embedkit.model.export import source_checksum

    started = time.perf_counter()
    reference_dir = Path(reference_dir) if reference_dir else default_reference_dir()
    ref_sha = source_checksum(reference_dir)
    if ref_sha != fp32.manifest.source_sha256:
        raise InvalidInput(
            f"reference model {reference_dir} (sha256 {ref_sha[:12]}…) is not the source of "
            f"{fp32.path} ({fp32.manifest.source_sha256[:12]}…)"
        )
    corpus = build_corpus(
        fp32.tokenizer_path,
        groups=groups,
        languages=languages,
        max_pairs=max_pairs,
        lang_pairs=lang_pairs,
    )
    texts = corpus.texts()
    fp32_key = engine_key(fp32)
    # A "variant" that is the parent's own graph and tokenizer run as the parent is computes
    # the parent's vectors: encoded once (the gate's self-check, a planted copy).
    same = engine_key(artifact) == fp32_key and fp32_settings is None
    variant_key = fp32_key if same else measured_key(artifact, settings)
    arrays = {
        "reference": reference_vectors(reference_dir, texts, cache_dir, checksum=ref_sha),
        "fp32": _cached_encode(
            _EngineEncoder(fp32, fp32_settings or settings), texts, fp32_key, cache_dir
        ),
        "variant": _cached_encode(
            _EngineEncoder(artifact, settings), texts, variant_key, cache_dir
        ),
    }
    vectors = {role: dict(zip(texts, arr, strict=True)) for role, arr in arrays.items()}
    result: RetrievalResult | None = None
    note: str | None = "not asked for"
    if retrieval:
        note = retrieval_data.missing_reason(retrieval_dir)
        if note is None:
            data = retrieval_data.load_beir(
                retrieval_dir, max_docs=retrieval_docs, max_queries=retrieval_queries
            )
            result = score_retrieval(
                data,
                fp32=(_EngineEncoder(fp32, settings), fp32_key),
                variant=(_EngineEncoder(artifact, settings), variant_key),
                cache_dir=cache_dir,
            )
    return QualityReport(
        artifact=str(artifact.tag or artifact.path),
        mode=artifact.manifest.quantization.mode,
        settings=artifact.manifest.quantization.settings,
        model_sha256=artifact.manifest.files[MODEL_FILE],
        fp32_model_sha256=fp32.manifest.files[MODEL_FILE],
        reference_source_sha256=ref_sha,
        texts=len(texts),
        seconds=round(time.perf_counter() - started, 1),
        segments=score_segments(corpus, vectors),
        measured_on=MeasuredOn(
            parent_sha256=fp32.manifest.files[MODEL_FILE],
            isa=toolchain.detect_isa().level,
            runtime=artifact.manifest.runtime,
            version=toolchain.runtime_version(artifact.manifest.runtime),
        ),
        retrieval=result,
        retrieval_note=note,
    )


def score_retrieval(
    data: retrieval_data.RetrievalSet,
    *,
    fp32: tuple[Encoder, str],
    variant: tuple[Encoder, str],
    cache_dir: Path | None = None,
) -> RetrievalResult:
    """Each model indexes ``data``'s corpus and searches it with its own query vectors,
    cached under its key (documents/s only when the corpus was encoded here)."""
    metrics = {}
    for role, (encoder, key) in {"fp32": fp32, "variant": variant}.items():
        docs, seconds = _timed_encode(encoder, data.docs, key, cache_dir)
        queries = _cached_encode(encoder, data.queries, key, cache_dir)
        ndcg, recall = retrieval_data.rank_metrics(queries, docs, data)
        metrics[role] = RetrievalMetrics(
            ndcg_at_10=ndcg,
            recall_at_100=recall,
            docs_per_s=None if seconds is None else round(len(data.docs) / seconds, 1),
        )
    return RetrievalResult(
        dataset=data.name,
        documents=len(data.docs),
        queries=len(data.queries),
        fp32=metrics["fp32"],
        variant=metrics["variant"],
    )
