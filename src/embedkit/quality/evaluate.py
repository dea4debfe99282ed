"""Per-segment quality report and gate for artifact variants (INT8, fused, FP16).

An aggregate score hides where quantisation breaks rankings (forum text, long
inputs, non-English), so a variant is judged segment by segment, always
against the FP32 PyTorch reference *and* the FP32 ONNX artifact:

* STS Benchmark test Spearman (cosine vs gold): overall, per genre, per file;
* per length bucket (word pieces, no special tokens) plus generated long texts;
* per language (stsb-multi-mt dev);
* embedding fidelity per segment: min / p1 / mean cosine to FP32 and the top-10
  neighbour overlap when each sentence1 retrieves its sentence2.

:func:`evaluate` writes JSON + markdown + PNG; :func:`gate` applies the
thresholds of ``config/quality-gate.yaml`` and names every failing segment and
by how much. Nothing here decides what to register; it returns verdicts.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from embedkit.core.configfile import load_yaml
from embedkit.core.errors import InvalidInput
from embedkit.core.settings import Settings, get_settings
from embedkit.model import evaldata
from embedkit.model.artifact import MODEL_FILE, TOKENIZER_FILE, Artifact, finalize

log = logging.getLogger(__name__)

CACHE_DIR = Path(tempfile.gettempdir()) / "embedkit-eval-cache"
LANGUAGES = evaldata.LANGUAGES
GROUPS = ("stsb", "length", "lang")
LENGTH_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("<=8", 0, 8),
    ("9-16", 9, 16),
    ("17-32", 17, 32),
    (">32", 33, None),
)
GENERATED_LENGTHS = (128, 256)
TOP_K = 10
MAX_GENERATED_DOCS = 64


# --- encoders ---------------------------------------------------------------------------


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...


def load_encoder(artifact: Artifact, settings: Settings | None = None) -> Any:
    """The serving engine for ``artifact``: variants are judged as users will run them."""
    from embedkit.runtime.engine import Engine

    return Engine(artifact, settings)


class _ReferenceEncoder:
    def __init__(self, model_dir: Path) -> None:
        from embedkit.model.export import load_reference

        self._model = load_reference(model_dir)

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(
            self._model.encode(
                texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True
            ),
            dtype=np.float32,
        )


def default_reference_dir() -> Path:
    from embedkit.model.recipe import find_recipe

    return find_recipe(None).source.resolve()[0]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _cached_encode(
    encoder: Encoder, texts: list[str], key: str | None, cache_dir: Path
) -> np.ndarray:
    """Encode, caching to ``cache_dir`` by (encoder identity, texts) when ``key`` is given."""
    if key is None:
        return _unit(encoder.encode(texts))
    digest = hashlib.sha256(("\n".join(texts) + "\0" + key).encode()).hexdigest()[:24]
    file = cache_dir / f"{digest}.npy"
    if file.is_file():
        return np.load(file)
    vectors = _unit(np.asarray(encoder.encode(texts), dtype=np.float32))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{time.monotonic_ns()}.tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(file)
    return vectors


# --- corpus -------------------------------------------------------------------------------


@dataclass
class Segment:
    """Aligned sentence pairs; ``gold`` is None for generated text (fidelity only)."""

    name: str
    group: str
    s1: list[str]
    s2: list[str]
    gold: np.ndarray | None = None


@dataclass
class Corpus:
    segments: list[Segment] = field(default_factory=list)

    def texts(self) -> list[str]:
        seen: dict[str, None] = {}
        for seg in self.segments:
            for t in (*seg.s1, *seg.s2):
                seen.setdefault(t, None)
        return list(seen)


Row = tuple[str, str, float, str, str]


def read_stsb(split: str = "test") -> list[Row]:
    """(genre, file, score, sentence1, sentence2) rows of an STS Benchmark split."""
    return [(p.genre, p.file, p.score, p.sentence1, p.sentence2) for p in evaldata.sts(split)]


def _stride(n: int, limit: int | None) -> list[int]:
    """Evenly spread indices so a subset still covers every file of a sorted corpus."""
    if limit is None or limit >= n:
        return list(range(n))
    return [int(i * n / limit) for i in range(limit)]


def build_corpus(
    tokenizer_path: Path,
    *,
    groups: Sequence[str] = GROUPS,
    languages: Sequence[str] = LANGUAGES,
    max_pairs: int | None = None,
    lang_pairs: int | None = None,
) -> Corpus:
    """The evaluation segments. ``max_pairs`` subsamples STSb and each language (fast CI run);
    ``lang_pairs`` subsamples only the languages (each has 1,500 pairs)."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise InvalidInput(f"unknown segment group(s) {unknown}; known: {', '.join(GROUPS)}")
    bad_lang = sorted(set(languages) - set(LANGUAGES))
    if bad_lang:
        raise InvalidInput(f"unknown language(s) {bad_lang}; known: {', '.join(LANGUAGES)}")
    corpus = Corpus()
    rows = read_stsb("test")
    rows = [rows[i] for i in _stride(len(rows), max_pairs)]

    def add(name: str, group: str, picked: list[Row]) -> None:
        if picked:
            corpus.segments.append(
                Segment(
                    name,
                    group,
                    [r[3] for r in picked],
                    [r[4] for r in picked],
                    np.array([r[2] for r in picked]),
                )
            )

    if "stsb" in groups:
        add("stsb:all", "stsb", rows)
        for genre in sorted({r[0] for r in rows}):
            add(f"stsb:genre:{genre}", "stsb", [r for r in rows if r[0] == genre])
        for file in sorted({r[1] for r in rows}):
            add(f"stsb:file:{file}", "stsb", [r for r in rows if r[1] == file])
    if "length" in groups:
        lengths = _word_pieces(tokenizer_path, [t for r in rows for t in (r[3], r[4])])
        pair_len = [max(lengths[2 * i], lengths[2 * i + 1]) for i in range(len(rows))]
        for label, lo, hi in LENGTH_BUCKETS:
            add(
                f"length:{label}",
                "length",
                [
                    r
                    for r, n in zip(rows, pair_len, strict=True)
                    if n >= lo and (hi is None or n <= hi)
                ],
            )
        for threshold in GENERATED_LENGTHS:
            corpus.segments.append(_generated(tokenizer_path, rows, threshold))
    if "lang" in groups:
        for lang in languages:
            pairs = evaldata.multilingual(lang)
            limit = min(x for x in (max_pairs, lang_pairs, len(pairs)) if x is not None)
            pairs = tuple(pairs[i] for i in _stride(len(pairs), limit))
            corpus.segments.append(
                Segment(
                    f"lang:{lang}",
                    "lang",
                    [p[0] for p in pairs],
                    [p[1] for p in pairs],
                    np.array([p[2] for p in pairs]),
                )
            )
    return corpus


def _word_pieces(tokenizer_path: Path, texts: list[str]) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_truncation()
    tok.no_padding()
    return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]


def _generated(tokenizer_path: Path, rows: list[Row], threshold: int) -> Segment:
    """Long texts: consecutive sentence1s joined until > threshold word pieces, paired with
    the join of the same pairs' sentence2s (so retrieval has one right answer)."""
    lengths = _word_pieces(tokenizer_path, [r[3] for r in rows])
    docs1: list[str] = []
    docs2: list[str] = []
    start, total = 0, 0
    for i, n in enumerate(lengths):
        total += n + 1
        if total > threshold:
            docs1.append(" ".join(r[3] for r in rows[start : i + 1]))
            docs2.append(" ".join(r[4] for r in rows[start : i + 1]))
            start, total = i + 1, 0
            if len(docs1) >= MAX_GENERATED_DOCS:
                break
    return Segment(f"length:>{threshold} (generated)", "length", docs1, docs2, None)


# --- metrics --------------------------------------------------------------------------------


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

    def segment(self, name: str) -> SegmentResult:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(name)


def _spearman(a: np.ndarray, b: np.ndarray, gold: np.ndarray | None) -> float | None:
    if gold is None or len(gold) < 3:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(np.sum(a * b, axis=1), gold).statistic) * 100


def _cos_stats(x: np.ndarray, y: np.ndarray) -> CosineStats:
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
        drop_ref = (
            None
            if sp["variant"] is None or sp["reference"] is None
            else sp["reference"] - sp["variant"]
        )
        drop_fp = (
            None if sp["variant"] is None or sp["fp32"] is None else sp["fp32"] - sp["variant"]
        )
        results.append(
            SegmentResult(
                name=seg.name,
                group=seg.group,
                pairs=len(seg.s1),
                spearman_reference=_round(sp["reference"]),
                spearman_fp32=_round(sp["fp32"]),
                spearman=_round(sp["variant"]),
                drop_vs_reference=_round(drop_ref),
                drop_vs_fp32=_round(drop_fp),
                cosine_fp32=_cos_stats(both_v, both_f),
                cosine_reference=_cos_stats(both_v, both_r),
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
    out_dir: Path | None = None,
    groups: Sequence[str] = GROUPS,
    languages: Sequence[str] = LANGUAGES,
    max_pairs: int | None = None,
    lang_pairs: int | None = None,
    settings: Settings | None = None,
    cache_dir: Path = CACHE_DIR,
) -> QualityReport:
    """Score ``artifact`` per segment against the FP32 ONNX ``fp32`` and the PyTorch reference.

    Reference and FP32 embeddings are cached in ``cache_dir`` by model checksum
    and text set; the variant is always encoded afresh through the engine.
    Writes ``quality.json``, ``quality.md`` and ``quality.png`` to ``out_dir``.
    """
    started = time.perf_counter()
    reference_dir = Path(reference_dir) if reference_dir else default_reference_dir()
    from embedkit.model.export import source_checksum

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
    fp32_key = "onnx:" + fp32.manifest.files[MODEL_FILE] + fp32.manifest.files[TOKENIZER_FILE]
    arrays = {
        "reference": _cached_encode(
            _LazyReference(reference_dir), texts, "torch:" + ref_sha, cache_dir
        ),
        "fp32": _cached_encode(_LazyEngine(fp32, settings), texts, fp32_key, cache_dir),
        "variant": _cached_encode(load_encoder(artifact, settings), texts, None, cache_dir),
    }
    vectors = {role: dict(zip(texts, arr, strict=True)) for role, arr in arrays.items()}
    report = QualityReport(
        artifact=str(artifact.tag or artifact.path),
        mode=artifact.manifest.quantization.mode,
        settings=artifact.manifest.quantization.settings,
        model_sha256=artifact.manifest.files[MODEL_FILE],
        fp32_model_sha256=fp32.manifest.files[MODEL_FILE],
        reference_source_sha256=ref_sha,
        texts=len(texts),
        seconds=round(time.perf_counter() - started, 1),
        segments=score_segments(corpus, vectors),
    )
    if out_dir is not None:
        write_report(report, Path(out_dir))
    return report


class _LazyReference:
    """Loads torch only on a cache miss."""

    def __init__(self, model_dir: Path) -> None:
        self._dir = model_dir

    def encode(self, texts: list[str]) -> np.ndarray:
        return _ReferenceEncoder(self._dir).encode(texts)


class _LazyEngine:
    def __init__(self, artifact: Artifact, settings: Settings | None) -> None:
        self._artifact, self._settings = artifact, settings

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(load_encoder(self._artifact, self._settings).encode(texts))


# --- gate --------------------------------------------------------------------------------------


class GateThresholds(BaseModel):
    """``config/quality-gate.yaml``: one place for every threshold."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    spearman_drop_max: dict[str, float | None] = Field(
        description="Per segment group: most Spearman points (×100) a variant may lose vs the "
        "FP32 PyTorch reference; null = reported, not gated."
    )
    cosine_p1_min: float = Field(ge=-1, le=1)
    overlap_min: float = Field(ge=0, le=1)


def load_thresholds(path: Path | None = None) -> GateThresholds:
    """``path``, else ``quality-gate.yaml`` in ``settings.config_dir``."""
    path = path or get_settings().config_dir / "quality-gate.yaml"
    return load_yaml(path, GateThresholds, "gate config")


class GateFailure(BaseModel):
    model_config = ConfigDict(frozen=True)
    segment: str
    metric: str
    value: float
    threshold: float
    by: float = Field(description="How far past the threshold (always positive).")

    def __str__(self) -> str:
        op = ">" if self.metric == "spearman_drop" else "<"
        return (
            f"{self.segment}: {self.metric} {self.value:.4g} {op} {self.threshold:g} "
            f"(by {self.by:.3g})"
        )


class GateVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)
    approved: bool
    failures: list[GateFailure]
    segments_checked: int

    @property
    def failing_segments(self) -> list[str]:
        return sorted({f.segment for f in self.failures})

    def summary(self) -> str:
        if self.approved:
            return f"approved: all {self.segments_checked} segments pass"
        return f"rejected: {len(self.failing_segments)} segment(s) fail — " + "; ".join(
            str(f) for f in self.failures
        )


def gate(report: QualityReport, thresholds: GateThresholds | None = None) -> GateVerdict:
    """Approve only if every segment holds every threshold; list each failure and its margin."""
    th = thresholds or load_thresholds()
    failures: list[GateFailure] = []
    for seg in report.segments:
        limit = th.spearman_drop_max.get(seg.group)
        if (
            limit is not None
            and seg.drop_vs_reference is not None
            and seg.drop_vs_reference > limit
        ):
            failures.append(
                GateFailure(
                    segment=seg.name,
                    metric="spearman_drop",
                    value=seg.drop_vs_reference,
                    threshold=limit,
                    by=round(seg.drop_vs_reference - limit, 4),
                )
            )
        if seg.cosine_fp32.p1 < th.cosine_p1_min:
            failures.append(
                GateFailure(
                    segment=seg.name,
                    metric="cosine_p1",
                    value=seg.cosine_fp32.p1,
                    threshold=th.cosine_p1_min,
                    by=round(th.cosine_p1_min - seg.cosine_fp32.p1, 5),
                )
            )
        if seg.overlap_fp32 < th.overlap_min:
            failures.append(
                GateFailure(
                    segment=seg.name,
                    metric="neighbour_overlap",
                    value=seg.overlap_fp32,
                    threshold=th.overlap_min,
                    by=round(th.overlap_min - seg.overlap_fp32, 4),
                )
            )
    return GateVerdict(
        approved=not failures, failures=failures, segments_checked=len(report.segments)
    )


def stamp_verdict(artifact: Artifact, verdict: GateVerdict, *, force: bool = False) -> Artifact:
    """Write the gate verdict into the manifest (re-checksummed in place).

    An unapproved variant is only stamped with ``force=True``, which sets
    ``quantization.forced`` so the registry shows it was pushed through.
    """
    if not verdict.approved and not force:
        raise InvalidInput(
            f"{artifact.path} failed the quality gate ({verdict.summary()}); "
            "pass --force to register it anyway"
        )
    fields = artifact.manifest.model_dump(mode="json", exclude={"files"})
    fields["quantization"] = {
        **fields["quantization"],
        "approved": verdict.approved,
        "forced": force and not verdict.approved,
    }
    return finalize(artifact.path, fields)


# --- output ------------------------------------------------------------------------------------


def _fmt(x: float | None, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def report_markdown(report: QualityReport, verdict: GateVerdict | None = None) -> str:
    lines = [
        f"### {report.mode} — `{report.artifact}`",
        "",
        f"settings: `{report.settings}`  ",
        f"{report.texts} texts, {report.seconds} s",
        "",
    ]
    if verdict is not None:
        lines += [f"**Gate: {verdict.summary()}**", ""]
    lines += [
        "| segment | pairs | Spearman ref | Spearman | drop vs ref | cos min | cos p1 | cos mean | top-10 overlap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report.segments:
        c = s.cosine_fp32
        lines.append(
            f"| {s.name} | {s.pairs} | {_fmt(s.spearman_reference)} | {_fmt(s.spearman)} | "
            f"{_fmt(s.drop_vs_reference)} | {c.min:.4f} | {c.p1:.4f} | {c.mean:.4f} | {s.overlap_fp32:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_deltas(reports: dict[str, QualityReport], path: Path) -> None:
    """Per-segment Spearman drop and p1 cosine, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in next(iter(reports.values())).segments]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.28 * len(names) + 2), sharey=True)
    height = 0.8 / max(1, len(reports))
    y = np.arange(len(names))
    for i, (label, rep) in enumerate(reports.items()):
        by = {s.name: s for s in rep.segments}
        drops = [by[n].drop_vs_reference or 0.0 for n in names]
        p1 = [1 - by[n].cosine_fp32.p1 for n in names]
        axes[0].barh(y + i * height, drops, height, label=label)
        axes[1].barh(y + i * height, p1, height, label=label)
    axes[0].set_yticks(y + 0.4 - height / 2, names, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("Spearman drop vs FP32 PyTorch (points ×100)")
    axes[1].set_xlabel("1 − p1 cosine to FP32 ONNX (log)")
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    report: QualityReport, out_dir: Path, verdict: GateVerdict | None = None
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "quality.json",
        "markdown": out_dir / "quality.md",
        "plot": out_dir / "quality.png",
    }
    paths["json"].write_text(report.model_dump_json(indent=2) + "\n")
    paths["markdown"].write_text(report_markdown(report, verdict))
    plot_deltas({report.mode: report}, paths["plot"])
    return paths


# --- side-by-side speed -------------------------------------------------------------------------


def throughput(
    encoders: dict[str, Encoder],
    texts: list[str],
    *,
    batch_size: int = 32,
    rounds: int = 5,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Median texts/s per encoder at ``batch_size``, rounds interleaved so a noisy shared
    CPU hits every encoder alike. (Small on purpose; ``embedkit.bench.inprocess`` is the full benchmark.)"""
    batches = [texts[i : i + batch_size] for i in range(0, len(texts) - batch_size + 1, batch_size)]
    if not batches:
        raise InvalidInput(f"need at least {batch_size} texts to time batch {batch_size}")
    for enc in encoders.values():  # warm-up: first runs allocate arenas
        enc.encode(batches[0])
    samples: dict[str, list[float]] = {name: [] for name in encoders}
    for r in range(rounds):
        for name, enc in encoders.items():
            t0 = time.perf_counter()
            for batch in batches:
                enc.encode(batch)
            samples[name].append(len(batches) * batch_size / (time.perf_counter() - t0))
        if on_round:
            on_round(r)
    return {name: round(statistics.median(v), 1) for name, v in samples.items()}


# --- candidates: build → evaluate → gate → time (for `embedkit release`) -----------------------


@dataclass
class Candidate:
    name: str
    artifact: Artifact
    report: QualityReport
    verdict: GateVerdict
    throughput: float | None = None


def run_candidates(
    parent: Artifact,
    out_root: Path,
    *,
    presets: dict[str, dict[str, Any]] | None = None,
    reference_dir: Path | None = None,
    thresholds: GateThresholds | None = None,
    speed_texts: int = 640,
    batch_size: int = 32,
    rounds: int = 5,
    say: Callable[[str], None] = log.info,
    **eval_options: Any,
) -> tuple[list[Candidate], dict[str, float]]:
    """Build every preset from the fp32 ``parent``, evaluate and gate each, then time them
    all side by side with the parent at ``batch_size``. Returns candidates and texts/s
    (key ``"fp32"`` is the parent). Existing variant directories are reused."""
    from embedkit.variants import quantize

    th = thresholds or load_thresholds()
    presets = presets if presets is not None else quantize.candidate_presets()
    out_root = Path(out_root)
    candidates = []
    for name, preset in presets.items():
        options = dict(preset)
        kind = options.pop("kind")
        target = out_root / name
        if (target / "manifest.json").is_file():
            artifact = Artifact.load(target)
        else:
            say(f"building {name}")
            artifact = quantize.build_variant(parent, kind, target, **options)
        say(f"evaluating {name}")
        report = evaluate(artifact, fp32=parent, reference_dir=reference_dir, **eval_options)
        verdict = gate(report, th)
        write_report(report, out_root / f"{name}.quality", verdict)
        say(f"{name}: {verdict.summary()}")
        candidates.append(Candidate(name, artifact, report, verdict))
    rows = read_stsb("test")
    texts = [t for r in rows for t in (r[3], r[4])][:speed_texts]
    settings = eval_options.get("settings")
    encoders = {"fp32": load_encoder(parent, settings)}
    encoders.update({c.name: load_encoder(c.artifact, settings) for c in candidates})
    say(f"timing {len(encoders)} encoders side by side at batch {batch_size}")
    speeds = throughput(encoders, texts, batch_size=batch_size, rounds=rounds)
    for c in candidates:
        c.throughput = speeds[c.name]
    return candidates, speeds


def pick_default(candidates: Sequence[Candidate]) -> Candidate | None:
    """The fastest approved candidate (None if none passed)."""
    approved = [c for c in candidates if c.verdict.approved and c.throughput is not None]
    return max(approved, key=lambda c: c.throughput or 0.0, default=None)


def summary_markdown(
    candidates: Sequence[Candidate], speeds: dict[str, float], th: GateThresholds
) -> str:
    """Variant × segment tables (Spearman drop, p1 cosine, neighbour overlap), speed and verdicts."""
    names = [c.name for c in candidates]
    segs = candidates[0].report.segments
    by = {c.name: {s.name: s for s in c.report.segments} for c in candidates}
    head = "| segment | pairs | " + " | ".join(names) + " |\n|---|---:|" + "---:|" * len(names)

    def table(
        title: str,
        cell: Callable[[SegmentResult], str],
        ref: Callable[[SegmentResult], str] | None = None,
    ) -> list[str]:
        h = (
            head
            if ref is None
            else head.replace("| pairs |", "| pairs | FP32 ref |").replace(
                "|---:|", "|---:|---:|", 1
            )
        )
        out = [f"#### {title}", "", h]
        for s in segs:
            extra = "" if ref is None else f" {ref(s)} |"
            out.append(
                f"| {s.name} | {s.pairs} |{extra} "
                + " | ".join(cell(by[n][s.name]) for n in names)
                + " |"
            )
        return [*out, ""]

    fp32 = speeds.get("fp32", 0.0)
    lines = [
        "#### Verdicts and speed (texts/s at batch 32, one side-by-side run)",
        "",
        "| variant | mode | texts/s | × FP32 | gate |",
        "|---|---|---:|---:|---|",
        f"| fp32 (parent) | none | {fp32:.1f} | 1.00 | – |",
    ]
    for c in candidates:
        sp = speeds.get(c.name, 0.0)
        verdict = (
            "approved"
            if c.verdict.approved
            else (
                f"rejected ({len(c.verdict.failing_segments)} segments: "
                + ", ".join(c.verdict.failing_segments[:6])
                + (", …" if len(c.verdict.failing_segments) > 6 else "")
                + ")"
            )
        )
        lines.append(
            f"| {c.name} | {c.report.mode} | {sp:.1f} | {sp / fp32 if fp32 else 0:.2f} | {verdict} |"
        )
    lines.append("")
    lines += table(
        "Spearman ×100 drop vs FP32 PyTorch (limit: "
        + ", ".join(f"{k} {v}" for k, v in th.spearman_drop_max.items())
        + ")",
        lambda s: _fmt(s.drop_vs_reference),
        lambda s: _fmt(s.spearman_reference),
    )
    lines += table(
        f"p1 cosine to FP32 ONNX (limit ≥ {th.cosine_p1_min})", lambda s: f"{s.cosine_fp32.p1:.4f}"
    )
    lines += table(
        f"Top-10 neighbour overlap with FP32 ONNX (limit ≥ {th.overlap_min})",
        lambda s: f"{s.overlap_fp32:.3f}",
    )
    return "\n".join(lines)
