"""The contract beyond all-MiniLM-L6-v2: four tiny architectures (tests/tiny_models.py)
exported with the real Optimum path pass every check, and what each needed holds.

Served over HTTP: tests/http/test_served_architectures.py. What each architecture needed:
docs/models.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.tiny_models import TINY_ARCHITECTURES

from embedkit.core.settings import Settings
from embedkit.model import evaldata
from embedkit.model.artifact import Artifact, finalize
from embedkit.model.export import load_reference
from embedkit.model.recipe import read_embedding_config
from embedkit.quality import contract
from embedkit.runtime.engine import Engine

CPU = Settings(providers=["CPUExecutionProvider"], intra_op_threads=1)
# Every check and every parity segment; STS capped per genre (the full split adds ~2,500
# PyTorch encodes per model and no new kind of input).
PER_SEGMENT = 100
# name → (dimension, pad id, special frame of an encoded text): what each manifest must say.
EXPECTED = {
    "bert-cls": (32, 0, ("[CLS]", "[SEP]")),
    "bert-dense": (16, 0, ("[CLS]", "[SEP]")),
    "xlm-roberta": (32, 1, ("<s>", "</s>")),
    "mpnet": (32, 1, ("<s>", "</s>")),
}


def test_expectations_cover_every_tiny_architecture() -> None:
    assert set(EXPECTED) == set(TINY_ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_full_contract(tiny_architecture, name: str) -> None:
    """Operators, the whole shape matrix, batch invariance and parity on every segment
    (STS genres, multilingual scripts, emoji, control characters, empty, over-length)."""
    src, artifact = tiny_architecture(name)
    dimension, pad_id, _ = EXPECTED[name]
    m = artifact.manifest
    assert m.inputs == ["input_ids", "attention_mask"]  # the graph takes no token_type_ids
    assert m.embedding_config.dimension == dimension and m.tokenizer.pad_id == pad_id
    assert m.tokenizer.max_length == 64
    report = contract.validate(
        artifact, reference_dir=src, settings=CPU, limit_per_segment=PER_SEGMENT
    )
    failed = {
        k: v for k, v in report.get("parity", {}).get("segments", {}).items() if not v["passed"]
    }
    assert report["passed"], (report["operators"]["passed"], report.get("shapes"), failed)
    assert report["parity"]["overall"]["min_cosine"] >= contract.MIN_COSINE


@pytest.mark.parametrize("name", sorted(TINY_ARCHITECTURES))
def test_tokens_match_the_reference_tokenizer(tiny_architecture, name: str) -> None:
    """Ids, frame and truncation as sentence-transformers makes them; token-array input is
    framed with the model's own special tokens."""
    src, artifact = tiny_architecture(name)
    reference = load_reference(src)
    engine = Engine(artifact, CPU)
    texts = [
        *evaldata.sts_sentences("test")[:100],
        *(pair[0] for pair in evaldata.multilingual("ru")[:20]),
        *(t for cases in evaldata.edge_cases().values() for t in cases),
    ]
    want = reference.tokenizer(texts, truncation=True, max_length=64)["input_ids"]
    got = engine.tokenizer.encode(texts)
    assert got == want
    first, last = EXPECTED[name][2]
    vocab = reference.tokenizer.convert_ids_to_tokens
    assert vocab(got[0][0]) == first and vocab(got[0][-1]) == last
    assert max(len(row) for row in got) == 64  # the long texts were cut to the limit
    content = reference.tokenizer(texts[:3], add_special_tokens=False)["input_ids"]
    assert engine.tokenizer.check_ids(content) == got[:3]


def test_undeclared_max_length_follows_sentence_transformers(tiny_architecture) -> None:
    # The tiny XLM-R declares no max_seq_length and 66 positions for 64 tokens, as XLM-R
    # declares 514 for 512: the position table alone would overrun itself.
    src, _ = tiny_architecture("xlm-roberta")
    assert "max_seq_length" not in json.loads((src / "sentence_bert_config.json").read_text())
    assert json.loads((src / "config.json").read_text())["max_position_embeddings"] == 66
    assert read_embedding_config(src).max_seq_length == load_reference(src).max_seq_length == 64


def test_shape_matrix_fails_a_max_length_past_the_position_table(
    tiny_architecture, tmp_path: Path
) -> None:
    # What the export wrote before it followed sentence-transformers: a clean failed cell.
    _, artifact = tiny_architecture("xlm-roberta")
    copy = tmp_path / "artifact"
    shutil.copytree(artifact.path, copy)
    fields = Artifact.read_manifest(copy).model_dump(exclude={"files"})
    fields["tokenizer"]["max_length"] = 66
    section = contract.check_shapes(Engine(finalize(copy, fields), CPU), batches=(1,))
    assert not section["passed"]
    bad = [c for c in section["cells"] if not c["ok"]]
    assert [c["seq_len"] for c in bad] == [66, ">66 (truncated)"]
    assert "position_embeddings" in bad[0]["error"] and "\n" not in bad[0]["error"]
