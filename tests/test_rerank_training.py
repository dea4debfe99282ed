"""The reranker recipe (embedkit_train.rerank): data preparation and a tiny run end to end.

The real recipe takes minutes and is a documented command (docs/rerank-training.md); here
the held-back split, the mined negatives and the metrics are pinned on small inputs, and a
two-step run on the tiny cross-encoder goes through mining, training, export and scoring.
"""

from __future__ import annotations

import ast
import gzip
import json
import random
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import embedkit_train.cli  # noqa: F401  (registers train-reranker even without the entry point)
from embedkit.cli import app
from embedkit.core.errors import InvalidInput
from embedkit.quality.retrieval import RetrievalSet, load_beir
from embedkit_train.rerank import (
    DEFAULT_SCIFACT,
    METRICS_FILE,
    Example,
    TrainConfig,
    TrainSet,
    load_scifact,
    mine_negatives,
    rerank_metrics,
    scifact_examples,
    scifact_lists,
    split_queries,
    sts_examples,
)

SLICE = Path("tests") / "data" / "scifact-slice"
runner = CliRunner()


def _query_ids(directory: Path) -> list[str]:
    lines = (directory / "queries.jsonl").read_text(encoding="utf-8").splitlines()
    return [str(json.loads(line)["_id"]) for line in lines if line.strip()]


# --- the held-back split ----------------------------------------------------------------------


def test_held_back_split_is_fixed_disjoint_and_complete() -> None:
    ids = _query_ids(DEFAULT_SCIFACT)
    assert len(ids) == 809
    train, held = split_queries(ids, 200, 30)
    assert len(held) == 200 and len(train) == 609
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(ids)
    # The same claims whatever the file order, and again on a second call.
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert set(split_queries(shuffled, 200, 30)[1]) == set(held)
    assert split_queries(ids, 200, 30) == (train, held)
    # Each list keeps the given order; another seed holds back other claims.
    assert train == [q for q in ids if q in set(train)]
    assert set(split_queries(ids, 200, 31)[1]) != set(held)


def test_split_refuses_to_hold_back_everything() -> None:
    with pytest.raises(InvalidInput, match="cannot hold back 3 of 3"):
        split_queries(["a", "b", "c"], 3, 0)


# --- hard negatives -------------------------------------------------------------------------


def test_negatives_exclude_positives_and_come_from_the_top() -> None:
    docs = [f"d{i}" for i in range(50)]
    rng = random.Random(0)
    ranking, qrels = {}, {}
    for q in range(30):
        order = docs[:]
        rng.shuffle(order)
        ranking[f"q{q}"] = order
        # Relevant documents placed among the top, where negatives are drawn.
        qrels[f"q{q}"] = {order[0]: 1, order[3]: 1, order[7]: 2}
    mined = mine_negatives(ranking, qrels, list(ranking), count=4, depth=10, seed=5)
    for qid, negatives in mined.items():
        assert len(negatives) == 4 == len(set(negatives))
        assert not set(negatives) & set(qrels[qid]), qid
        top = ranking[qid][:10]
        assert set(negatives) <= set(top)
        assert negatives == sorted(negatives, key=top.index)  # rank order
    assert mined == mine_negatives(ranking, qrels, list(ranking), count=4, depth=10, seed=5)
    assert mined != mine_negatives(ranking, qrels, list(ranking), count=4, depth=10, seed=6)
    # Fewer non-relevant documents than asked for: all of them, never a positive.
    short = mine_negatives(ranking, qrels, ["q0"], count=20, depth=10, seed=5)
    assert sorted(short["q0"]) == sorted(set(ranking["q0"][:10]) - set(qrels["q0"]))


def test_examples_label_positives_negatives_and_sts_scores() -> None:
    data = load_beir(SLICE)
    qid = data.query_ids[0]
    relevant = set(data.qrels[qid])
    negative = next(d for d in data.doc_ids if d not in relevant)
    examples = scifact_examples(data, [qid], {qid: [negative]})
    docs = dict(zip(data.doc_ids, data.docs, strict=True))
    assert [e.label for e in examples] == [1.0] * len(relevant) + [0.0]
    assert {e.document for e in examples if e.label == 1.0} == {docs[d] for d in relevant}
    assert examples[-1] == Example(data.queries[0], docs[negative], 0.0)
    sts = sts_examples(None, 0)
    assert len(sts) == 5749 and all(0.0 <= e.label <= 1.0 for e in sts)
    assert max(e.label for e in sts) == 1.0  # a gold 5.0 is a label of 1
    few = sts_examples(10, 3)
    assert len(few) == 10 and few == sts_examples(10, 3) and set(few) <= set(sts)


def test_listwise_rows_and_the_bce_weight() -> None:
    data = load_beir(SLICE)
    ids = data.query_ids[:6]
    others = [d for d in data.doc_ids if not any(d in data.qrels[q] for q in ids)]
    negatives = {q: others[:3] for q in ids}
    negatives[ids[0]] = others[:2]
    rows = scifact_lists(data, ids, negatives)
    docs = dict(zip(data.doc_ids, data.docs, strict=True))
    assert len(rows) == 6
    for (claim, texts, labels), qid in zip(rows, ids, strict=True):
        relevant = sorted(data.qrels[qid])
        assert claim == data.queries[data.query_ids.index(qid)]
        assert texts == [docs[d] for d in relevant + negatives[qid]]
        assert labels == [1.0] * len(relevant) + [0.0] * len(negatives[qid])
    lists = TrainSet.lists(rows)
    assert list(lists.columns) == ["query", "docs", "labels"]
    assert lists.loss == "listwise" and lists.pos_weight() is None and len(lists) == 6
    pairs = TrainSet.pairs(scifact_examples(data, ids, negatives))
    positives = sum(len(data.qrels[q]) for q in ids)
    assert pairs.pos_weight() == pytest.approx(17 / positives)  # 5 x 3 + 2 negatives
    assert TrainSet.pairs(sts_examples(50, 0)).pos_weight() is None  # soft labels


def test_gzipped_corpus_reads_as_the_plain_one(tmp_path: Path) -> None:
    packed = tmp_path / "scifact-slice"
    shutil.copytree(SLICE, packed)
    with (
        open(packed / "corpus.jsonl", "rb") as src,
        gzip.open(packed / "corpus.jsonl.gz", "wb") as dst,
    ):
        shutil.copyfileobj(src, dst)
    (packed / "corpus.jsonl").unlink()
    assert load_scifact(packed) == load_beir(SLICE)
    vendored = load_scifact(DEFAULT_SCIFACT)
    assert (len(vendored.doc_ids), len(vendored.query_ids)) == (5183, 809)
    (packed / "corpus.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(InvalidInput, match="cannot unpack"):
        load_scifact(packed)


# --- the metrics ----------------------------------------------------------------------------


def test_rerank_metrics_reorder_only_the_top() -> None:
    held = RetrievalSet(
        name="toy",
        doc_ids=[f"d{i}" for i in range(30)],
        docs=[""] * 30,
        query_ids=["q0", "q1"],
        queries=["", ""],
        qrels={"q0": {"d12": 1}, "q1": {"d29": 1}},
    )
    # rank = document number; cosines above the raw scores, which must not mix with them
    sims = np.tile(1.0 - np.arange(30, dtype=np.float32) / 100, (2, 1))
    top = np.argsort(-sims, axis=1, kind="stable")[:, :20]
    scores = np.full((2, 20), -10.0, dtype=np.float32)
    scores[0, 12] = -5.0  # q0's relevant d12 (rank 13) goes first; q1's d29 is out of reach
    metrics = rerank_metrics(held, sims, scores, top)
    assert metrics.ndcg_at_10_before == 0.0
    assert metrics.ndcg_at_10_after == 50.0  # q0 perfect, q1 still 0
    assert metrics.gain == 50.0 and metrics.recall_at_depth == 50.0
    assert (metrics.queries, metrics.depth) == (2, 20)


# --- a tiny run, end to end -----------------------------------------------------------------


def test_tiny_run_end_to_end(tmp_path: Path, tiny_cross_encoder: Any, fp32_artifact: Any) -> None:
    """Two steps from the tiny cross-encoder on the test slice: mined, trained, saved as a
    CrossEncoder directory, exported and scored through the Reranker, metrics written."""
    pytest.importorskip("datasets", reason="needs the train extra")
    pytest.importorskip("accelerate", reason="needs the train extra")
    from embedkit.model.recipe import is_cross_encoder, read_rerank_config
    from embedkit_train.rerank import run

    config = TrainConfig(
        held_out=10,
        negatives=2,
        mine_depth=10,
        max_steps=2,
        batch_size=4,
        max_length=64,
        sts_pairs=8,
        rerank_depth=10,
    )
    out = tmp_path / "model"
    steps: list[str] = []
    report = run(
        config,
        out,
        scifact_dir=SLICE,
        base=str(tiny_cross_encoder[0]),
        embedder=str(fp32_artifact.path),
        step=steps.append,
    )
    assert is_cross_encoder(out) and read_rerank_config(out).max_seq_length == 64
    assert report.train["steps"] == 2
    assert report.data["train_queries"] == 30 and report.data["held_out_queries"] == 10
    assert report.data["sts_pairs"] == 8
    held = report.held_out
    assert held is not None and (held.queries, held.depth) == (10, 10)
    assert 0.0 <= held.ndcg_at_10_after <= 100.0 and report.sts_test_spearman is not None
    written = json.loads((out / METRICS_FILE).read_text())
    assert written["held_out"]["ndcg_at_10_after"] == held.ndcg_at_10_after
    assert any(s.startswith("step 2/2") or "reranked 10/10" in s for s in steps)
    # A trained model is never overwritten.
    with pytest.raises(InvalidInput, match="already exists"):
        run(config, out, scifact_dir=SLICE)


# --- the command ----------------------------------------------------------------------------


def _one_line_error(args: list[str], needle: str) -> None:
    result = runner.invoke(app, ["train-reranker", *args])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_command_bad_input_is_one_line(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    _one_line_error(["--out", str(taken)], "already exists")
    _one_line_error(
        ["--out", str(tmp_path / "m"), "--scifact", str(tmp_path / "none")],
        "holds no SciFact corpus",
    )
    _one_line_error(
        ["--out", str(tmp_path / "m"), "--scifact", str(SLICE), "--held-out", "40"],
        "cannot hold back 40 of 40",
    )


def test_the_product_never_imports_the_training_code() -> None:
    """embedkit_train is tooling: the Bento and the image carry neither it nor its extra."""
    root = Path(str(resources.files("embedkit")))
    wrong = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            wrong += [f"{path.name} -> {n}" for n in names if n.split(".")[0] == "embedkit_train"]
    assert not wrong, wrong
