"""`embedkit embed-corpus --engine local` makes the service's vectors: on the same texts,
each of its Parquet rows is within the parity contract's limits (cos >= 0.99999,
max |Δ| <= 1e-4) of what a running server's `/v1/embeddings` answers through the `openai`
client. Varied texts (STS sentences, empty and blank, CJK, emoji, right-to-left, accents,
code, texts far over the 256-token limit, which both truncate), with the model's
defaults, with Matryoshka dimensions (truncated, then normalised again), and with a named
prompt on the tiny prompt model (its own server).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.model.evaldata import sts_sentences
from embedkit_bench.server import Server

pq = pytest.importorskip("pyarrow.parquet", reason="embed-corpus needs the batch extra")

COS_MIN, MAX_ABS = 0.99999, 1e-4  # the parity contract's fp32 thresholds (docs/models.md)
LONG = " ".join(f"token{i} and some more words about the topic" for i in range(120))
SPECIAL = [
    "",
    "   ",
    "a",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "東京は日本の首都です。桜の季節はとても美しい。",
    "한국어 문장도 잘 처리되어야 합니다.",
    "🚀🔥 launch day! 🎉🎉 👩‍👩‍👧‍👦",
    "naïve café résumé — façade, Zürich, São Paulo",
    "مرحبا بالعالم، هذا نص عربي قصير",
    "def f(x):\n    return x ** 2  # code\n\tand a tab",
    "3.14159 2.71828 1.41421 — numbers only 42",
    LONG,  # far over 256 tokens: truncated by both
    "数据" * 400,  # CJK over the limit too
]


def texts() -> list[str]:
    return sts_sentences("test")[:37] + SPECIAL  # 50


def embed_corpus(tmp_path: Path, model: str, texts: list[str], *extra: str) -> np.ndarray:
    """`embedkit embed-corpus --engine local` over ``texts`` (ids t0, t1, ...), its vectors
    read from the Parquet partitions in input order, each id exactly once."""
    source = tmp_path / "corpus.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    out = tmp_path / "out"
    args = ["embed-corpus", str(source), "--out", str(out), "--engine", "local"]
    result = CliRunner().invoke(app, [*args, "--model", model, "--partition-rows", "16", *extra])
    assert result.exit_code == 0, result.output
    rows: dict[str, np.ndarray] = {}
    for part in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["id", "embedding"])
        for ident, vector in zip(
            table["id"].to_pylist(), table["embedding"].to_pylist(), strict=True
        ):
            assert ident not in rows, f"{ident} twice"
            rows[ident] = np.asarray(vector, np.float32)
    assert list(rows) == [f"t{i}" for i in range(len(texts))]
    return np.stack(list(rows.values()))


def served(server: Server, model: str, texts: list[str], **kw: Any) -> np.ndarray:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    answer = client.embeddings.create(model=model, input=texts, **kw)
    assert [d.index for d in answer.data] == list(range(len(texts)))
    return np.array([d.embedding for d in answer.data], np.float32)


def assert_contract(got: np.ndarray, want: np.ndarray, texts: list[str]) -> None:
    assert got.shape == want.shape
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    delta = np.abs(got - want).max(1)
    bad = [
        f"{texts[i][:30]!r}: cos {cos[i]:.7f}, max |Δ| {delta[i]:.2e}"
        for i in range(len(texts))
        if not (cos[i] >= COS_MIN and delta[i] <= MAX_ABS)
    ]
    assert not bad, f"{len(bad)} of {len(texts)} outside the contract: {bad[:5]}"


def test_default_settings_give_the_services_vectors(server, model_tag, tmp_path: Path) -> None:
    batch = texts()
    got = embed_corpus(tmp_path, model_tag, batch)
    want = served(server, "all-minilm-l6-v2", batch, encoding_format="float")
    assert_contract(got, want, batch)
    # Truncation happened (and alike): the long text and its 256-token prefix agree.
    head = served(server, "all-minilm-l6-v2", [LONG + " and a tail past the limit"])
    assert_contract(got[batch.index(LONG)][None], head, [LONG])


def test_matryoshka_dimensions_give_the_services_vectors(server, model_tag, tmp_path: Path) -> None:
    batch = texts()
    got = embed_corpus(tmp_path, model_tag, batch, "--dimensions", "64")
    want = served(server, "all-minilm-l6-v2", batch, dimensions=64)
    assert got.shape == (50, 64)
    assert_contract(got, want, batch)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised after cutting


@pytest.fixture(scope="module")
def prompt_server(prompt_artifact, launcher) -> tuple[Server, str]:
    from embedkit.model.artifact import register

    tag = register(prompt_artifact)
    return launcher.start(tag), tag


def test_a_named_prompt_gives_the_services_vectors(prompt_server, tmp_path: Path) -> None:
    server, tag = prompt_server
    batch = texts()
    got = embed_corpus(tmp_path, tag, batch, "--prompt-name", "query")
    want = served(server, "tiny-prompts", batch, extra_body={"prompt_name": "query"})
    assert_contract(got, want, batch)
    plain = served(server, "tiny-prompts", batch)  # the prompt changes these vectors
    assert np.abs(plain - want).max() > 1e-2
