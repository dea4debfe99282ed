"""`embedkit embed-corpus` with the local engine: the service's vectors, resume after a
crash, --previous, refusals, bad input, duplicates. Small corpora, tiny partitions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedkit.batch import corpus, partitions
from embedkit.core.errors import IdentityMismatch, InvalidInput
from embedkit.core.settings import Settings
from embedkit.model.evaldata import sts_sentences
from embedkit.runtime.engine import Engine
from embedkit.serve.engine.identity import ServedIdentity

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SETTINGS = Settings(intra_op_threads=2)
TEXTS = sts_sentences("test")


@pytest.fixture(scope="module")
def engine(fp32_artifact) -> Engine:
    return Engine(fp32_artifact, SETTINGS)


@pytest.fixture(scope="module")
def embedder(fp32_artifact) -> corpus.Embedder:
    return corpus.local_embedder(
        corpus.Options(Path("-"), Path("-"), str(fp32_artifact.path)), SETTINGS
    )


class Counting:
    """An embedder's function that counts its calls and texts; ``fail_at``: the call
    (0-based) that raises, as a crash would."""

    def __init__(self, embedder: corpus.Embedder, fail_at: int | None = None) -> None:
        self.inner, self.fail_at = embedder.embed, fail_at
        self.calls = self.texts = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray | partitions.Chunked:
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.texts += len(texts)
        return self.inner(texts)


def counting(embedder: corpus.Embedder, fail_at: int | None = None) -> tuple[Any, Counting]:
    fn = Counting(embedder, fail_at)
    return replace(embedder, embed=fn), fn


def write_jsonl(path: Path, texts: Sequence[str], ids: Sequence[Any] | None = None) -> Path:
    ids = ids if ids is not None else [f"doc-{i}" for i in range(len(texts))]
    path.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts, strict=True))
    )
    return path


def options(tmp_path: Path, src: Path, **kw: Any) -> corpus.Options:
    kw.setdefault("partition_rows", 50)
    return corpus.Options(src, kw.pop("out", tmp_path / "out"), **kw)


def read_output(out: Path) -> tuple[list[str], np.ndarray, list[str]]:
    ids: list[str] = []
    vectors, shas = [], []
    for path in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(path)
        ids += table["id"].to_pylist()
        shas += table["text_sha256"].to_pylist()
        vectors.append(partitions.read_vectors(path))
    return ids, np.concatenate(vectors), shas


def test_vectors_are_the_services(tmp_path: Path, engine: Engine, embedder) -> None:
    """Every row's vector is what Engine.encode returns (the service's prompt, truncation
    and post-processing); the files carry the schema and the metadata promised."""
    texts = TEXTS[:200]
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    report = corpus.run(options(tmp_path, src, partition_rows=64), embedder)
    assert (report.partitions, report.computed, report.copied, report.documents) == (4, 200, 0, 200)
    ids, vectors, shas = read_output(tmp_path / "out")
    assert ids == [f"doc-{i}" for i in range(200)]
    np.testing.assert_allclose(vectors, engine.encode(texts), atol=1e-5)
    assert shas == [partitions.text_sha256(t) for t in texts]
    first = tmp_path / "out" / "part-000000.parquet"
    schema = pq.read_schema(first)
    assert schema.field("id").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 384)
    meta = partitions.read_meta(first)
    assert meta["rows"] == 64 and len(meta["input_sha256"]) == 64
    assert meta["identity"]["name"] == "all-minilm-l6-v2" and meta["identity"]["variant"] == "fp32"
    assert meta["vectors"] == {
        "normalize": True,
        "dimensions": None,
        "encoding": "float",
        "prompt": None,
        "truncate": True,
        "chunking": None,
        "ranges": None,
    }
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["complete"] and saved["computed"] == 200 and saved["docs_per_s"] > 0


def test_matryoshka_dimensions_match_the_engine(tmp_path: Path, engine, fp32_artifact) -> None:
    texts = TEXTS[:40]
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    opts = options(tmp_path, src, model=str(fp32_artifact.path), dimensions=64)
    corpus.run(opts, corpus.local_embedder(opts, SETTINGS))
    _, vectors, _ = read_output(tmp_path / "out")
    np.testing.assert_allclose(vectors, engine.encode(texts, dimensions=64), atol=1e-5)


def test_resume_after_a_crash_embeds_each_id_once(tmp_path: Path, embedder) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:300])
    crashing, _ = counting(embedder, fail_at=2)  # after partitions 0 and 1 are written
    with pytest.raises(RuntimeError, match="simulated crash"):
        corpus.run(options(tmp_path, src), crashing)
    out = tmp_path / "out"
    assert [p.name for p in sorted(out.glob("part-*"))] == [
        "part-000000.parquet",
        "part-000001.parquet",
    ]
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / corpus.MANIFEST).read_text())["complete"] is False
    before = partitions.read_vectors(out / "part-000001.parquet")
    again, count = counting(embedder)
    report = corpus.run(options(tmp_path, src), again)
    assert (count.calls, count.texts) == (4, 200), "finished partitions were recomputed"
    assert report.partitions_resumed == 2 and report.computed == 200 and report.complete
    ids, _, _ = read_output(out)
    assert sorted(ids) == sorted(f"doc-{i}" for i in range(300)) and len(set(ids)) == 300
    np.testing.assert_array_equal(partitions.read_vectors(out / "part-000001.parquet"), before)
    third, count = counting(embedder)  # a finished output: nothing to do
    assert corpus.run(options(tmp_path, src), third).partitions_resumed == 6 and count.calls == 0


def test_previous_copies_unchanged_rows(tmp_path: Path, engine, embedder) -> None:
    texts = TEXTS[:1000]
    first = corpus.run(
        options(
            tmp_path,
            write_jsonl(tmp_path / "a.jsonl", texts),
            out=tmp_path / "v1",
            partition_rows=200,
        ),
        embedder,
    )
    assert first.computed == 1000
    changed = list(texts)
    for i in range(5, 1000, 100):  # 10 texts edited
        changed[i] = changed[i] + " (edited)"
    emb, count = counting(embedder)
    report = corpus.run(
        options(
            tmp_path,
            write_jsonl(tmp_path / "b.jsonl", changed),
            out=tmp_path / "v2",
            partition_rows=200,
            previous=tmp_path / "v1",
        ),
        emb,
    )
    assert (report.computed, report.copied, count.texts) == (10, 990, 10)
    saved = json.loads((tmp_path / "v2" / "report.json").read_text())
    assert (saved["computed"], saved["copied"], saved["bad_lines"], saved["duplicates"]) == (
        10,
        990,
        0,
        0,
    )
    ids, vectors, _ = read_output(tmp_path / "v2")
    assert ids == [f"doc-{i}" for i in range(1000)]
    edited = list(range(5, 1000, 100))
    np.testing.assert_allclose(
        vectors[edited], engine.encode([changed[i] for i in edited]), atol=1e-5
    )


def test_previous_of_other_settings_copies_nothing(tmp_path: Path, embedder, fp32_artifact) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:20])
    corpus.run(options(tmp_path, src, out=tmp_path / "v1"), embedder)
    opts = options(
        tmp_path,
        src,
        out=tmp_path / "v2",
        dimensions=32,
        previous=tmp_path / "v1",
        model=str(fp32_artifact.path),
    )
    report = corpus.run(opts, corpus.local_embedder(opts, SETTINGS))
    assert (report.computed, report.copied) == (20, 0) and "nothing copied" in (
        report.previous or ""
    )


def test_changed_settings_or_input_are_refused_without_restart(
    tmp_path: Path, embedder, fp32_artifact
) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:100])
    corpus.run(options(tmp_path, src), embedder)
    opts = options(tmp_path, src, dimensions=64, model=str(fp32_artifact.path))
    truncated = corpus.local_embedder(opts, SETTINGS)
    with pytest.raises(InvalidInput, match=r"other settings \(vectors: .*--restart"):
        corpus.run(opts, truncated)
    with pytest.raises(InvalidInput, match="partition_rows"):
        corpus.run(options(tmp_path, src, partition_rows=25), embedder)
    reexported = replace(embedder, graph_sha256="0" * 64)  # the same name:version, another graph
    with pytest.raises(InvalidInput, match=r"other settings \(identity: .*'graph'"):
        corpus.run(options(tmp_path, src), reexported)
    report = corpus.run(replace(opts, restart=True), truncated)
    assert report.computed == 100 and report.partitions_resumed == 0
    assert partitions.read_vectors(tmp_path / "out" / "part-000001.parquet").shape == (50, 64)
    # the input edited under a finished partition
    write_jsonl(src, [*TEXTS[:10], "an edited line", *TEXTS[11:100]])
    with pytest.raises(InvalidInput, match=r"rows 1-50 changed .*--restart"):
        corpus.run(opts, truncated)
    assert corpus.run(replace(opts, restart=True), truncated).computed == 100


def test_another_models_output_is_refused_even_with_restart(tmp_path: Path, embedder) -> None:
    other = replace(
        embedder,
        identity=ServedIdentity(
            "other-model", "v3", "fp32", "index-compatible", "fp32", "CPU", "avx2"
        ),
        embed=lambda texts: np.zeros((len(texts), 384), np.float32),
    )
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:20])
    corpus.run(options(tmp_path, src), other)
    for restart in (False, True):
        with pytest.raises(IdentityMismatch, match="holds vectors of other-model:v3"):
            corpus.run(options(tmp_path, src, restart=restart), embedder)
    # partitions of another model without a manifest: named too, and never deleted
    (tmp_path / "out" / corpus.MANIFEST).unlink()
    with pytest.raises(IdentityMismatch, match="other-model"):
        corpus.run(options(tmp_path, src, restart=True), embedder)
    assert (tmp_path / "out" / "part-000000.parquet").exists()


def test_bad_lines_fail_or_are_skipped(tmp_path: Path, embedder) -> None:
    lines = [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(TEXTS[:12])]
    lines[3] = json.dumps({"id": "d3"})  # no text
    lines[7] = json.dumps({"id": "d7", "text": 42})  # not a string
    lines[9] = "{not json"
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInput, match=r"c.jsonl line 4: no 'text' field \(--on-bad-line fail"):
        corpus.run(options(tmp_path, src, partition_rows=5), embedder)
    out = tmp_path / "out"
    assert not list(out.glob("part-*")) and not (out / "report.json").exists()
    warned: list[str] = []
    report = corpus.run(
        options(tmp_path, src, partition_rows=5, on_bad_line="skip"), embedder, warn=warned.append
    )
    assert (report.documents, report.bad_lines, report.input_rows) == (9, 3, 12)
    assert any("line 8: 'text' is int, not a string: skipped" in w for w in warned)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [4, 8, 10]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.jsonl", "is not a file"),
        (lambda d: d, "is not a file"),
        (lambda d: write_jsonl(d / "e.jsonl", []), "is empty"),
    ],
)
def test_unreadable_input_is_one_error(tmp_path: Path, embedder, make, message) -> None:
    with pytest.raises(InvalidInput, match=message):
        corpus.run(options(tmp_path, make(tmp_path)), embedder)


def test_parquet_input(tmp_path: Path, engine, embedder) -> None:
    texts = TEXTS[:60]
    src = tmp_path / "c.parquet"
    # small row groups that do not align with the partitions
    pq.write_table(pa.table({"doc": list(range(60)), "body": texts}), src, row_group_size=7)
    report = corpus.run(
        options(tmp_path, src, partition_rows=25, id_field="doc", text_field="body"), embedder
    )
    assert report.partitions == 3 and report.documents == 60
    ids, vectors, _ = read_output(tmp_path / "out")
    assert ids == [str(i) for i in range(60)]
    np.testing.assert_allclose(vectors, engine.encode(texts), atol=1e-5)
    assert [partitions.read_meta(p)["rows"] for p in sorted((tmp_path / "out").glob("part-*"))] == [
        25,
        25,
        10,
    ]
    with pytest.raises(InvalidInput, match="no column 'text'"):
        corpus.run(options(tmp_path, src, out=tmp_path / "o2", id_field="doc"), embedder)
    with pytest.raises(InvalidInput, match="column 'doc' is int64, not a string"):
        corpus.run(
            options(tmp_path, src, out=tmp_path / "o3", id_field="body", text_field="doc"), embedder
        )
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InvalidInput, match="not a readable Parquet file"):
        corpus.run(options(tmp_path, tmp_path / "bad.parquet", out=tmp_path / "o4"), embedder)


def test_duplicate_ids_fail_or_are_reported(tmp_path: Path, embedder) -> None:
    ids: list[Any] = [f"d{i}" for i in range(30)]
    ids[25] = "d2"  # a duplicate in another partition
    ids[26] = 26  # an integer id: written as the string "26"
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:30], ids)
    with pytest.raises(
        InvalidInput,
        match=r"1 id\(s\) occur more than once .*'d2' at "
        r"part-000000.parquet\[2\], part-000002.parquet\[5\]",
    ):
        corpus.run(options(tmp_path, src, partition_rows=10), embedder)
    out = tmp_path / "out"
    assert json.loads((out / corpus.MANIFEST).read_text())["complete"] is False
    report = corpus.run(options(tmp_path, src, partition_rows=10, on_duplicate="report"), embedder)
    assert report.duplicates == 1 and report.complete and report.partitions_resumed == 3
    assert json.loads((out / "duplicates.jsonl").read_text())["id"] == "d2"


def test_cli(tmp_path: Path, fp32_artifact) -> None:
    from typer.testing import CliRunner

    from embedkit.cli import app

    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:30])
    args = [
        "embed-corpus",
        str(src),
        "--out",
        str(tmp_path / "out"),
        "--artifact",
        str(fp32_artifact.path),
        *("--engine", "local"),
    ]
    result = CliRunner().invoke(app, [*args, "--partition-rows", "10"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["computed"] == 30 and report["partitions"] == 3
    result = CliRunner().invoke(app, [*args, "--partition-rows", "20"])
    assert result.exit_code == 1
    assert (
        result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    )


def test_a_text_over_the_limit_without_truncation_names_its_line(
    tmp_path: Path, fp32_artifact
) -> None:
    from embedkit.core.errors import InputTooLong

    src = write_jsonl(tmp_path / "c.jsonl", [*TEXTS[:12], "word " * 400, *TEXTS[12:14]])
    opts = options(tmp_path, src, partition_rows=5, truncate=False, model=str(fp32_artifact.path))
    with pytest.raises(InputTooLong, match=r"c.jsonl: line 13 has \d+ tokens"):
        corpus.run(opts, corpus.local_embedder(opts, SETTINGS))
    done = sorted(p.name for p in (tmp_path / "out").glob("part-*"))
    assert done == ["part-000000.parquet", "part-000001.parquet"]


def test_previous_must_not_be_the_output(tmp_path: Path, embedder) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:5])
    with pytest.raises(InvalidInput, match="--previous must be another output"):
        corpus.run(options(tmp_path, src, previous=tmp_path / "out"), embedder)
