"""The conversion contract for a reranker (``task: rerank``): operators, a shape matrix
over pair lengths, batch invariance, truncation and parity of pair scores.

The embedding contract's (:mod:`embedkit.quality.contract`) structure for pairs:
``validate(artifact)`` runs every check and returns one JSON-able report with a section
per check, and passes only if every section passes. Parity is measured through the
serving runtime (:class:`~embedkit.runtime.rerank.Reranker`) against PyTorch
``CrossEncoder.predict`` twice: raw scores (``activation_fn=Identity()``) and with the
model's own activation (its default), each within :data:`MAX_ABS_DIFF` per pair.

Truncation: a CrossEncoder cuts the longer side first (``longest_first``); we cut only
the document and keep the query whole (``only_second``), so the reference is asked for
that too. The two agree wherever the query is shorter than half the window (every STS
pair); the ``edge/long_query`` segment is where they differ, and pins ours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.core.errors import ContractViolation, InferenceError, InputTooLong
from embedkit.core.settings import Settings
from embedkit.model import evaldata
from embedkit.model.artifact import Artifact
from embedkit.quality.contract import SHAPE_BATCHES, check_operators

# fp32 parity, per pair: raw scores and activated ones (issue #30).
MAX_ABS_DIFF = 1e-4
# Batch invariance: the same pair, different batch-mates and padding (raw scores).
INVARIANCE_ABS = 1e-5
CHECKS = ("operators", "shapes", "batch_invariance", "truncation", "parity")
# What CrossEncoder.predict is asked for, so that it tokenises as the runtime does.
REFERENCE_TOKENISATION = {"text": {"truncation": "only_second"}}
Step = Callable[[str], None]
Pair = tuple[str, str]
_ANCHOR = "A man is playing a guitar."


# --- inputs -------------------------------------------------------------------


def _sized_text(tokenizer: Any, tokens: int) -> str:
    """The shortest prefix (in words) of a long STS text with at least ``tokens`` tokens
    (special tokens included): a query near a given share of the window."""
    words = evaldata.long_texts(4 * tokens, 1)[0].split()
    for n in range(1, len(words) + 1):
        text = " ".join(words[:n])
        if tokenizer.count_tokens([text])[0] >= tokens:
            return text
    return " ".join(words)


def parity_segments(
    tokenizer: Any, split: str = "test", *, limit: int | None = None
) -> dict[str, list[Pair]]:
    """Pairs by segment: STS pairs per genre (sentence1 as the query), then edge cases: each
    edge text as the query and as the document beside a plain sentence, empty sides,
    documents over the limit, and queries long enough that cutting the longer side first
    would cut them (``edge/long_query``)."""
    segments: dict[str, list[Pair]] = {}
    for pair in evaldata.sts(split):
        bucket = segments.setdefault(f"sts/{pair.genre}", [])
        if limit is None or len(bucket) < limit:
            bucket.append((pair.sentence1, pair.sentence2))
    edge = evaldata.edge_cases()
    segments["edge/empty"] = [("", ""), ("", _ANCHOR), (_ANCHOR, "")]
    for name in ("whitespace", "emoji", "cjk", "accents", "control", "scripts"):
        texts = edge[name]
        segments[f"edge/{name}"] = [(t, _ANCHOR) for t in texts] + [(_ANCHOR, t) for t in texts]
    long_docs = [*edge["long_256"], *edge["very_long"]]
    segments["edge/over_limit"] = [(_ANCHOR, d) for d in long_docs]
    max_len = tokenizer.max_length
    queries = [_sized_text(tokenizer, int(max_len * share)) for share in (0.55, 0.7, 0.85)]
    segments["edge/long_query"] = [(q, d) for q in queries for d in long_docs[:2]]
    return {k: list(dict.fromkeys(v)) for k, v in segments.items()}


# --- shapes -------------------------------------------------------------------


def check_shapes(reranker: Any, *, batches: Sequence[int] = SHAPE_BATCHES) -> dict[str, Any]:
    """Batch × pair-length cells through the runtime: every score finite, one per pair.

    Rows are random content ids, the first half typed as the query, the rest as the
    document; a run shape an earlier cell ran is not run again (as the embedding matrix)."""
    tok = reranker.tokenizer
    max_len = tok.max_length
    seq_lens = sorted(
        {1, 2, 16, 127, 128, 129, max_len} - {x for x in (127, 128, 129) if x > max_len}
    )
    rng = np.random.default_rng(0)
    content = np.setdiff1d(np.arange(tok.vocab_size), sorted(tok.special_ids))
    runs: dict[tuple[int, int], dict[str, Any]] = {}
    cells = []
    passed = True
    for batch in batches:
        for seq in seq_lens:
            shapes = sorted({(len(group), seq) for group in reranker.plan([seq] * batch)})
            for rows, _ in shapes:
                if (rows, seq) not in runs:
                    ids = [list(rng.choice(content, size=seq)) for _ in range(rows)]
                    types = [[0] * (seq // 2) + [1] * (seq - seq // 2) for _ in range(rows)]
                    runs[rows, seq] = _shape_cell(reranker, ids, types)
            results = [runs[shape] for shape in shapes]
            cell: dict[str, Any] = {"ok": all(r["ok"] for r in results)}
            cell.update(next((r for r in results if "error" in r), {}))
            passed &= cell["ok"]
            cells.append(
                {"batch": batch, "seq_len": seq, "runs": [list(s) for s in shapes], **cell}
            )
    # Beyond max_len the document is cut: the graph never sees more than max_len.
    pairs = [(_ANCHOR, d) for d in evaldata.long_texts(max_len * 2, 2)]
    ids, types, _ = tok.encode_pairs(pairs)
    last = _shape_cell(reranker, ids, types)
    last["ok"] &= all(len(x) == max_len for x in ids)
    passed &= last["ok"]
    cells.append({"batch": len(ids), "seq_len": f">{max_len} (truncated)", **last})
    return {"passed": passed, "seq_lens": seq_lens, "batches": list(batches), "cells": cells}


def _shape_cell(reranker: Any, ids: list[list[int]], types: list[list[int]]) -> dict[str, Any]:
    try:
        scores, _ = reranker.score_ids(ids, types)
    except InferenceError as exc:
        return {"ok": False, "error": exc.message}
    return {"ok": scores.shape == (len(ids),) and bool(np.isfinite(scores).all())}


# --- batch invariance ---------------------------------------------------------


def check_batch_invariance(reranker: Any, pairs: Sequence[Pair]) -> dict[str, Any]:
    """A pair's raw score must not depend on its batch-mates or on padding."""
    pairs = list(pairs)
    alone = np.concatenate([reranker.score([p], raw=True) for p in pairs])
    together = reranker.score(pairs, raw=True)
    order = np.random.default_rng(1).permutation(len(pairs))
    shuffled = reranker.score([pairs[i] for i in order], raw=True)[np.argsort(order)]
    naive = type(reranker)(
        reranker.artifact,
        reranker.settings.model_copy(
            update={"token_aware_batching": False, "max_sub_batch_size": len(pairs)}
        ),
        judging=reranker.judging,
    )
    padded = naive.score(pairs, raw=True)
    diffs = {
        "batched": float(np.abs(alone - together).max()),
        "shuffled": float(np.abs(alone - shuffled).max()),
        "padded_to_longest": float(np.abs(alone - padded).max()),
    }
    return {
        "passed": all(v <= INVARIANCE_ABS for v in diffs.values()),
        "tolerance_abs": INVARIANCE_ABS,
        "pairs": len(pairs),
        "max_abs_diff": diffs,
    }


# --- truncation ---------------------------------------------------------------


def check_truncation(reranker: Any) -> dict[str, Any]:
    """Over the limit only the document is cut: the pair fills the window and begins with
    the whole query in its frame; a query that leaves the document no room is refused."""
    tok = reranker.tokenizer
    # Over half the window: cutting the longer side first would cut this query too.
    query = _sized_text(tok, int(tok.max_length * 0.7))
    document = evaldata.long_texts(tok.max_length * 2, 1)[0]
    (row,), _, cut = tok.encode_pairs([(query, document)])
    # The query's own pair with an empty document: its ids up to the document's place.
    (frame,), _, _ = tok.encode_pairs([(query, "")], truncate=False)
    head = frame[:-1]  # less the closing special token an empty document leaves
    section: dict[str, Any] = {
        "query_tokens": len(head),
        "pair_tokens": len(row),
        "document_cut": cut == 1 and len(row) == tok.max_length,
        "query_whole": row[: len(head)] == head,
    }
    try:
        tok.encode_pairs([(_sized_text(tok, tok.max_length + 8), document)])
        section["query_too_long"] = "scored (expected a refusal)"
        refused = False
    except InputTooLong as exc:
        section["query_too_long"] = f"refused: {exc.message}"
        refused = True
    section["passed"] = section["document_cut"] and section["query_whole"] and refused
    return section


# --- parity -------------------------------------------------------------------


def reference_scores(reference: Any, pairs: Sequence[Pair], *, raw: bool) -> np.ndarray:
    """``CrossEncoder.predict`` on ``pairs``, tokenised as the runtime tokenises them; raw
    (``activation_fn=Identity()``) or with the model's own activation."""
    import torch

    kwargs: dict[str, Any] = {"activation_fn": torch.nn.Identity()} if raw else {}
    scores = reference.predict(
        list(pairs),
        batch_size=32,
        show_progress_bar=False,
        convert_to_numpy=True,
        processing_kwargs=REFERENCE_TOKENISATION,
        **kwargs,
    )
    return np.asarray(scores, dtype=np.float32).reshape(len(pairs))


def check_parity(
    reranker: Any,
    reference: Any,
    segments: dict[str, list[Pair]],
    *,
    max_abs_diff: float = MAX_ABS_DIFF,
    step: Step | None = None,
) -> dict[str, Any]:
    """Runtime vs PyTorch ``CrossEncoder.predict`` per segment, raw and activated."""
    say = step or (lambda _m: None)
    out: dict[str, Any] = {"thresholds": {"max_abs_diff": max_abs_diff}, "segments": {}}
    worst = {"raw": 0.0, "activated": 0.0}
    for name, pairs in segments.items():
        say(f"pair parity {name} ({len(pairs)} pairs)")
        stats: dict[str, Any] = {"count": len(pairs)}
        for kind, raw in (("raw", True), ("activated", False)):
            diff = np.abs(
                reference_scores(reference, pairs, raw=raw) - reranker.score(pairs, raw=raw)
            )
            stats[f"{kind}_max_abs_diff"] = float(diff.max())
            worst[kind] = max(worst[kind], float(diff.max()))
            if diff.max() > max_abs_diff:
                q, d = pairs[int(np.argmax(diff))]
                stats.setdefault("worst_pair", [q[:60], d[:60]])
        stats["max_abs_diff"] = max(stats["raw_max_abs_diff"], stats["activated_max_abs_diff"])
        stats["passed"] = stats["max_abs_diff"] <= max_abs_diff
        out["segments"][name] = stats
    out["overall"] = {
        "count": sum(len(p) for p in segments.values()),
        "raw_max_abs_diff": worst["raw"],
        "activated_max_abs_diff": worst["activated"],
        "activation": reranker.config.activation,
    }
    out["passed"] = all(s["passed"] for s in out["segments"].values())
    return out


# --- the whole contract -------------------------------------------------------


def validate(
    artifact: Artifact,
    *,
    reference_dir: Path | None,
    settings: Settings | None = None,
    split: str = "test",
    limit_per_segment: int | None = None,
    shape_batches: Sequence[int] = SHAPE_BATCHES,
    step: Step | None = None,
) -> dict[str, Any]:
    """Run every pair check; the report's ``passed`` is the conjunction."""
    from embedkit.model.export import load_cross_encoder, source_checksum
    from embedkit.runtime.rerank import Reranker

    say = step or (lambda _m: None)
    settings = settings or Settings(providers=["CPUExecutionProvider"])
    report: dict[str, Any] = {
        "artifact": str(artifact.path),
        "tag": artifact.tag,
        "name": artifact.manifest.name,
        "task": artifact.manifest.task,
        "quantization": artifact.manifest.quantization.mode,
    }
    say("operators")
    report["operators"] = check_operators(artifact, settings)
    if not report["operators"]["passed"]:
        report["passed"] = False
        return report
    reranker = Reranker(artifact, settings)
    say("shape matrix (pairs)")
    report["shapes"] = check_shapes(reranker, batches=shape_batches)
    if not report["shapes"]["passed"]:
        report["passed"] = False
        return report
    segments = parity_segments(reranker.tokenizer, split, limit=limit_per_segment)
    sample = [p for pairs in segments.values() for p in pairs[:4]]
    say("batch invariance (pairs)")
    report["batch_invariance"] = check_batch_invariance(reranker, sample)
    say("truncation")
    report["truncation"] = check_truncation(reranker)
    if reference_dir is None:
        report["parity"] = {"passed": False, "error": "no PyTorch reference model given"}
    else:
        say("loading the PyTorch cross-encoder")
        source_ok = source_checksum(reference_dir) == artifact.manifest.source_sha256
        reference = load_cross_encoder(reference_dir)
        report["parity"] = check_parity(reranker, reference, segments, step=say)
        report["parity"]["reference_dir"] = str(reference_dir)
        report["parity"]["reference_matches_source"] = source_ok
        if not source_ok:
            report["parity"]["passed"] = False
            report["parity"]["error"] = "reference model files differ from the artifact's source"
        if reference.max_seq_length != reranker.tokenizer.max_length:
            report["parity"]["passed"] = False
            report["parity"]["error"] = (
                f"the reference cuts pairs at {reference.max_seq_length} tokens, the artifact "
                f"at {reranker.tokenizer.max_length}"
            )
    report["passed"] = all(report.get(k, {}).get("passed", False) for k in CHECKS)
    return report


def parity_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The compact parity record stored in a reranker's manifest."""
    parity = report.get("parity", {})
    keys = ("count", "raw_max_abs_diff", "activated_max_abs_diff", "passed")
    return {
        "passed": bool(report.get("passed")),
        "thresholds": parity.get("thresholds"),
        "overall": parity.get("overall"),
        "segments": {
            name: {k: s[k] for k in keys} for name, s in parity.get("segments", {}).items()
        },
        "checks": {
            k: report[k]["passed"]
            for k in ("operators", "shapes", "batch_invariance", "truncation")
            if k in report
        },
    }


def require_passed(report: dict[str, Any]) -> None:
    if not report.get("passed"):
        failed = [k for k in CHECKS if not report.get(k, {}).get("passed", False)]
        raise ContractViolation(f"pair contract failed: {', '.join(failed)}")
