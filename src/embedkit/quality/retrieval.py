"""Retrieval quality: does an index built *with a variant* retrieve as well as fp32?

The data is SciFact's train split in the BEIR layout under ``settings.extended_data_dir``
(``scifact-train/corpus.jsonl``, ``queries.jsonl``, ``qrels/train.tsv``; ~5.2k
abstracts of ~250 word pieces, 809 claims). It is optional: a clone without it
gets no retrieval rows and no variant can be classed ``reindex``
(:func:`missing_reason` says why). Each model indexes the corpus and encodes the
queries itself; the scores are nDCG@10 and recall@100 (×100, BEIR's definitions),
plus documents/s while indexing. Encoding and caching live in
:mod:`embedkit.quality.evaluate`; this module reads the data and scores rankings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from embedkit.core.errors import InvalidInput
from embedkit.core.settings import get_settings

SCIFACT = "scifact-train"
_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv")


@dataclass(frozen=True)
class RetrievalSet:
    """Documents, queries and graded judgements (``qrels[query_id][doc_id] = grade``)."""

    name: str
    doc_ids: list[str]
    docs: list[str]
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]


def scifact_dir() -> Path:
    return get_settings().extended_data_dir / SCIFACT


def missing_reason(directory: Path | None = None) -> str | None:
    """Why the retrieval set cannot be used (one line), or None when every file is there."""
    directory = directory or scifact_dir()
    absent = [f for f in _FILES if not (directory / f).is_file()]
    if not absent:
        return None
    return (
        f"retrieval data {directory} lacks {', '.join(absent)} (SciFact train in the BEIR "
        "layout; optional): no retrieval rows, and no variant can be classed reindex"
    )


def _jsonl(path: Path) -> list[dict[str, object]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or "_id" not in row:
                raise InvalidInput(f"{path}:{number}: a BEIR row needs an _id")
            rows.append(row)
    return rows


def _qrels(path: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("\t")
        if (number == 1 and fields[0] == "query-id") or not line.strip():
            continue
        try:
            query, doc, grade = fields[0], fields[1], int(fields[2])
        except (IndexError, ValueError):
            raise InvalidInput(
                f"{path}:{number}: expected query-id<TAB>corpus-id<TAB>score"
            ) from None
        if grade > 0:
            out.setdefault(query, {})[doc] = grade
    return out


def load_beir(
    directory: Path | None = None,
    *,
    max_docs: int | None = None,
    max_queries: int | None = None,
    split: str = "train",
) -> RetrievalSet:
    """A BEIR folder; bounded when asked (for tests): the first ``max_queries`` judged
    queries, and a corpus of every document they judge relevant filled up to ``max_docs``
    with documents in file order. A document's text is its title and body, as BEIR
    and sentence-transformers embed it."""
    directory = directory or scifact_dir()
    reason = missing_reason(directory)
    if reason:
        raise InvalidInput(reason)
    qrels = _qrels(directory / f"qrels/{split}.tsv")
    queries = [
        (str(q["_id"]), str(q.get("text", "")))
        for q in _jsonl(directory / "queries.jsonl")
        if str(q["_id"]) in qrels
    ][:max_queries]
    corpus = {
        str(d["_id"]): (str(d.get("title", "")) + " " + str(d.get("text", ""))).strip()
        for d in _jsonl(directory / "corpus.jsonl")
    }
    needed = {doc for qid, _ in queries for doc in qrels[qid]}
    if missing := sorted(needed - set(corpus))[:3]:
        raise InvalidInput(f"{directory}: judged documents missing from the corpus: {missing}")
    if not queries:
        raise InvalidInput(f"{directory}: no query has a relevant document in qrels/{split}.tsv")
    doc_ids = list(corpus)
    if max_docs is not None:
        room = max(0, max_docs - len(needed))
        fill = [d for d in doc_ids if d not in needed][:room]
        keep = needed | set(fill)
        doc_ids = [d for d in doc_ids if d in keep]
    kept = {qid for qid, _ in queries}
    return RetrievalSet(
        name=directory.name,
        doc_ids=doc_ids,
        docs=[corpus[d] for d in doc_ids],
        query_ids=[q for q, _ in queries],
        queries=[t for _, t in queries],
        qrels={q: r for q, r in qrels.items() if q in kept},
    )


# --- scores ---------------------------------------------------------------------------------


class RetrievalMetrics(BaseModel):
    model_config = ConfigDict(frozen=True)
    ndcg_at_10: float = Field(description="Mean nDCG@10 over the queries, ×100.")
    recall_at_100: float = Field(description="Mean recall@100 over the queries, ×100.")
    docs_per_s: float | None = Field(
        None, description="Documents/s while indexing the corpus (None: vectors were cached)."
    )


class RetrievalResult(BaseModel):
    """fp32 and the variant, each searching an index it built itself."""

    model_config = ConfigDict(frozen=True)
    dataset: str
    documents: int
    queries: int
    fp32: RetrievalMetrics
    variant: RetrievalMetrics

    @property
    def ndcg_drop(self) -> float:
        return round(self.fp32.ndcg_at_10 - self.variant.ndcg_at_10, 3)

    @property
    def recall_drop(self) -> float:
        return round(self.fp32.recall_at_100 - self.variant.recall_at_100, 3)


def rank_metrics(
    queries: np.ndarray, docs: np.ndarray, data: RetrievalSet, *, chunk: int = 256
) -> tuple[float, float]:
    """(nDCG@10, recall@100) ×100 of exact cosine search (unit vectors), BEIR's definitions:
    gains are the qrels grades, ideal DCG from the judged documents, recall over them."""
    return score_metrics(lambda rows: queries[rows] @ docs.T, data, chunk=chunk)


def score_metrics(
    scores: Callable[[slice], np.ndarray], data: RetrievalSet, *, chunk: int = 256
) -> tuple[float, float]:
    """:func:`rank_metrics` of any search: ``scores(rows)`` is the ``[queries, docs]`` score
    matrix of those queries (higher is better)."""
    k = min(100, len(data.doc_ids))
    discounts = 1.0 / np.log2(np.arange(2, 12))
    ndcg, recall = [], []
    for start in range(0, len(data.query_ids), chunk):
        sims = scores(slice(start, start + chunk))
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), 1), 1)
        for row, qid in zip(order, data.query_ids[start : start + chunk], strict=True):
            judged = data.qrels[qid]
            gains = np.array([judged.get(data.doc_ids[i], 0) for i in row[:10]], dtype=float)
            ideal = np.sort(np.array(list(judged.values()), dtype=float))[::-1][:10]
            ndcg.append(
                float(gains @ discounts[: len(gains)]) / float(ideal @ discounts[: len(ideal)])
            )
            found = sum(1 for i in row if data.doc_ids[i] in judged)
            recall.append(found / len(judged))
    return round(float(np.mean(ndcg)) * 100, 3), round(float(np.mean(recall)) * 100, 3)
