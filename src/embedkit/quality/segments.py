"""The evaluation corpus, cut into the segments a variant is judged on.

An aggregate score hides where quantisation breaks rankings (forum text, long
inputs, non-English), so the corpus is split into segments:

* ``stsb``: STS Benchmark test, overall, per genre and per file;
* ``length``: STSb pairs per length bucket (word pieces, no special tokens),
  plus generated long texts (no gold score: judged on fidelity only);
* ``lang``: stsb-multi-mt dev, one segment per language.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedkit.core.errors import InvalidInput
from embedkit.model import evaldata
from embedkit.model.evaldata import StsPair

LANGUAGES = evaldata.LANGUAGES
GROUPS = ("stsb", "length", "lang")
# (label, min, max) word pieces of the longer sentence of a pair; max None = unbounded.
LENGTH_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("<=8", 0, 8),
    ("9-16", 9, 16),
    ("17-32", 17, 32),
    (">32", 33, None),
)
GENERATED_LENGTHS = (128, 256)
MAX_GENERATED_DOCS = 64


@dataclass
class Segment:
    """Aligned sentence pairs; ``gold`` is None for generated text (fidelity only)."""

    name: str
    group: str
    s1: list[str]
    s2: list[str]
    gold: np.ndarray | None = None

    @classmethod
    def from_sts(cls, name: str, group: str, pairs: Sequence[StsPair]) -> Segment:
        return cls(
            name,
            group,
            [p.sentence1 for p in pairs],
            [p.sentence2 for p in pairs],
            np.array([p.score for p in pairs]),
        )


@dataclass
class Corpus:
    segments: list[Segment] = field(default_factory=list)

    def texts(self) -> list[str]:
        """Every distinct text of every segment, in first-seen order (each is encoded once)."""
        seen: dict[str, None] = {}
        for seg in self.segments:
            for t in (*seg.s1, *seg.s2):
                seen.setdefault(t, None)
        return list(seen)


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
    all_pairs = evaldata.sts("test")
    pairs = [all_pairs[i] for i in _stride(len(all_pairs), max_pairs)]

    def add(name: str, group: str, picked: list[StsPair]) -> None:
        if picked:
            corpus.segments.append(Segment.from_sts(name, group, picked))

    if "stsb" in groups:
        add("stsb:all", "stsb", pairs)
        for genre in sorted({p.genre for p in pairs}):
            add(f"stsb:genre:{genre}", "stsb", [p for p in pairs if p.genre == genre])
        for file in sorted({p.file for p in pairs}):
            add(f"stsb:file:{file}", "stsb", [p for p in pairs if p.file == file])
    if "length" in groups:
        lengths = word_pieces(
            tokenizer_path, [t for p in pairs for t in (p.sentence1, p.sentence2)]
        )
        pair_len = [max(lengths[2 * i], lengths[2 * i + 1]) for i in range(len(pairs))]
        for label, lo, hi in LENGTH_BUCKETS:
            add(
                f"length:{label}",
                "length",
                [
                    p
                    for p, n in zip(pairs, pair_len, strict=True)
                    if n >= lo and (hi is None or n <= hi)
                ],
            )
        for threshold in GENERATED_LENGTHS:
            corpus.segments.append(_generated(tokenizer_path, pairs, threshold))
    if "lang" in groups:
        for lang in languages:
            rows = evaldata.multilingual(lang)
            limit = min(x for x in (max_pairs, lang_pairs, len(rows)) if x is not None)
            rows = tuple(rows[i] for i in _stride(len(rows), limit))
            corpus.segments.append(
                Segment(
                    f"lang:{lang}",
                    "lang",
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    np.array([r[2] for r in rows]),
                )
            )
    return corpus


def word_pieces(tokenizer_path: Path, texts: list[str]) -> list[int]:
    """Untruncated word-piece counts without special tokens (the length a reader sees)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_truncation()
    tok.no_padding()
    return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]


def _generated(tokenizer_path: Path, pairs: list[StsPair], threshold: int) -> Segment:
    """Long texts: consecutive sentence1s joined until > threshold word pieces, paired with
    the join of the same pairs' sentence2s (so retrieval has one right answer)."""
    lengths = word_pieces(tokenizer_path, [p.sentence1 for p in pairs])
    docs1: list[str] = []
    docs2: list[str] = []
    start, total = 0, 0
    for i, n in enumerate(lengths):
        total += n + 1
        if total > threshold:
            docs1.append(" ".join(p.sentence1 for p in pairs[start : i + 1]))
            docs2.append(" ".join(p.sentence2 for p in pairs[start : i + 1]))
            start, total = i + 1, 0
            if len(docs1) >= MAX_GENERATED_DOCS:
                break
    return Segment(f"length:>{threshold} (generated)", "length", docs1, docs2, None)
