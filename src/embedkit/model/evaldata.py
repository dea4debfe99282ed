"""Evaluation corpora from ``settings.data_dir`` (STS Benchmark, stsb-multi-mt).

By default the attributed copy shipped in the package (``embedkit/data/evaldata``), so
the release and the tests need nothing beside the project.

The one reader of STS Benchmark files (:func:`read_sts`): they are tab-separated
with quotes inside sentences, so they are split on tabs, never read with a CSV
parser. Also builds the generated edge cases and long texts that the contract
and quality checks share.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from embedkit.core.errors import InvalidInput
from embedkit.core.settings import get_settings

LANGUAGES = ("en", "de", "es", "fr", "it", "ja", "nl", "pl", "pt", "ru", "zh")


@dataclass(frozen=True)
class StsPair:
    genre: str
    file: str
    score: float
    sentence1: str
    sentence2: str


def data_file(relative: str) -> Path:
    """A file of the evaluation data (``settings.data_dir``), or a one-line error naming it."""
    path = get_settings().data_dir / relative
    if not path.is_file():
        raise InvalidInput(
            f"evaluation data {path} not found (EMBEDKIT_DATA_DIR names a folder without it; "
            "unset it to use the copy shipped in the package)"
        )
    return path


def read_sts(path: Path) -> tuple[StsPair, ...]:
    """The pairs of one STS-Benchmark-format file; genre spelling normalised.

    Raises :class:`InvalidInput` (one line, naming the file) when it cannot be read,
    holds a non-numeric score, or holds no pairs at all.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidInput(f"cannot read STS data {path}: {reason}") from exc
    pairs = []
    for number, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) < 7:
            continue
        genre = "main-forums" if fields[0] == "main-forum" else fields[0]
        try:
            score = float(fields[4])
        except ValueError:
            raise InvalidInput(f"{path}:{number}: score {fields[4]!r} is not a number") from None
        pairs.append(StsPair(genre, fields[1], score, fields[5], fields[6]))
    if not pairs:
        raise InvalidInput(f"{path} holds no STS-Benchmark sentence pairs")
    return tuple(pairs)


@lru_cache(maxsize=8)
def sts(split: str = "test") -> tuple[StsPair, ...]:
    """STS Benchmark pairs of one split (train/dev/test) from ``settings.data_dir``."""
    return read_sts(data_file(f"stsbenchmark/sts-{split}.csv"))


def sts_sentences(split: str = "test") -> list[str]:
    """Unique sentences of a split, in first-seen order."""
    seen: dict[str, None] = {}
    for pair in sts(split):
        seen.setdefault(pair.sentence1)
        seen.setdefault(pair.sentence2)
    return list(seen)


@lru_cache(maxsize=16)
def multilingual(lang: str) -> tuple[tuple[str, str, float], ...]:
    """stsb-multi-mt dev pairs for one language (row i lines up with sts-dev row i)."""
    path = data_file(f"stsb-multi-mt/stsb-{lang}-dev.csv")
    with open(path, encoding="utf-8", newline="") as fh:
        return tuple((r[0], r[1], float(r[2])) for r in csv.reader(fh) if len(r) == 3)


def long_texts(min_words: int, count: int, *, split: str = "test") -> list[str]:
    """Deterministic long texts made by joining consecutive STS sentences."""
    sentences = sts_sentences(split)
    out: list[str] = []
    i = 0
    while len(out) < count:
        parts: list[str] = []
        while sum(len(p.split()) for p in parts) < min_words:
            parts.append(sentences[i % len(sentences)])
            i += 1
        out.append(" ".join(parts))
    return out


def edge_cases() -> dict[str, list[str]]:
    """Inputs that break naive pipelines, grouped by segment name."""
    return {
        "empty": [""],
        "whitespace": [" ", "   \t\n  ", "\u00a0\u2003"],
        "emoji": ["🙂", "launch day 🚀🔥🎉", "👩‍👩‍👧‍👦 family emoji ZWJ sequence"],
        "cjk": ["自然言語処理は楽しい。", "机器学习模型的嵌入向量", "한국어 문장 임베딩"],
        "accents": ["Café naïve résumé façade Ångström", "e\u0301 combining vs é precomposed"],
        "control": ["tab\there", "null\x00byte", "bell\x07 and escape\x1b[31m", "line\r\nbreak"],
        "scripts": ["مرحبا بالعالم", "Привет, мир", "שלום עולם", "zero\u200bwidth\u200djoiner"],
        "long_128": long_texts(110, 4),
        "long_256": long_texts(260, 4),
        "very_long": long_texts(1500, 2),
    }
