"""`embedkit embed-corpus --encoding` and `--chunk-*`: the service's codes and chunk
vectors, in Parquet; resume and --previous keyed on them.

"The service" here is its own in-process pipeline: the HTTP front's ``POST /embed``
(:class:`~embedkit.serve.pipeline.front.Front`: validation, chunk planning, pooling and
post-processing) over the single-process Embedder (``LocalEmbedder`` on an
``EmbedderCore``), on a copy of the session's fp32 artifact with int8 ranges calibrated
as a release does (on fewer texts). The served-HTTP comparison is tests/http's.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedkit.batch import corpus, partitions
from embedkit.core.errors import EncodingUnavailable, InvalidChunking, InvalidInput
from embedkit.core.settings import Settings
from embedkit.model.artifact import Artifact
from embedkit.model.evaldata import sts_sentences
from embedkit.runtime.chunking import Chunking

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SETTINGS = Settings(intra_op_threads=2, front_coalescing=False)
DIM = 384
CODE_TYPES = {"int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}
# Long documents: ~400-900 tokens, several windows of 128 tokens each.
LONG = [" ".join(sts_sentences("test")[k : k + n]) for k, n in ((100, 60), (200, 90), (300, 40))]
TEXTS = [*sts_sentences("test")[:20], *LONG, ""]


@pytest.fixture(scope="module")
def calibrated(fp32_artifact, tmp_path_factory) -> Artifact:
    from embedkit.model.artifact import seal
    from embedkit.release.calibration import calibrate, with_ranges

    dest = tmp_path_factory.mktemp("calibrated") / "artifact"
    shutil.copytree(fp32_artifact.path, dest)
    art = Artifact.load(dest)
    return seal(with_ranges(art, calibrate(art, SETTINGS, limit=100)))


@pytest.fixture(scope="module")
def service(calibrated) -> Any:
    """``service(texts, **body)``: ``POST /embed``'s answer in-process, as (rows, chunks)."""
    from embedkit.serve.engine.embedder import EmbedderCore, LocalEmbedder
    from embedkit.serve.pipeline.front import Front

    front = Front(calibrated, SETTINGS)
    embedder = LocalEmbedder(EmbedderCore(calibrated, SETTINGS))

    def call(texts: list[str], **body: Any) -> tuple[np.ndarray, list[dict[str, Any]] | None]:
        response = asyncio.run(front.native(embedder, {"texts": texts, **body}, "bulk"))
        assert response.status_code == 200, response.body
        answer = json.loads(response.body)
        encoding = body.get("encoding_format", "float")
        rows = np.asarray(answer["embeddings"], dtype=CODE_TYPES.get(encoding, np.float32))
        return rows, answer.get("chunks")

    return call


def write_jsonl(path: Path, texts: list[str], ids: list[str] | None = None) -> Path:
    ids = ids if ids is not None else [f"doc-{i}" for i in range(len(texts))]
    path.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts, strict=True))
    )
    return path


def run(artifact: Artifact, src: Path, out: Path, **kw: Any) -> corpus.Report:
    kw.setdefault("partition_rows", 10)
    opts = corpus.Options(src, out, str(artifact.path), **kw)
    return corpus.run(opts, corpus.local_embedder(opts, SETTINGS))


def read(out: Path) -> tuple[Any, np.ndarray]:
    """All partitions' columns (a pyarrow table, no embedding) and their rows, in order."""
    files = sorted(out.glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    rows = np.concatenate([partitions.read_vectors(f) for f in files])
    return table.drop(["embedding"]), rows


@pytest.mark.parametrize(
    ("encoding", "dimensions"),
    [
        ("float", None),
        ("int8", None),
        ("uint8", None),
        ("binary", None),
        ("ubinary", None),
        ("int8", 100),  # codes of fewer dimensions: the first codes of the whole vector's
        ("binary", 100),  # 100 sign bits: 13 bytes, the last zero-padded
    ],
)
def test_codes_are_the_services(
    tmp_path: Path, calibrated, service, encoding: str, dimensions: int | None
) -> None:
    """Each row is what ``POST /embed`` answers for its text with the same encoding_format
    and dimensions: the Parquet column holds the codes (int8/uint8, binary packed)."""
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    report = run(calibrated, src, tmp_path / "out", encoding=encoding, dimensions=dimensions)
    assert report.documents == report.rows == len(TEXTS) and report.complete
    table, rows = read(tmp_path / "out")
    assert table["id"].to_pylist() == [f"doc-{i}" for i in range(len(TEXTS))]
    want, _ = service(TEXTS, encoding_format=encoding, dimensions=dimensions)
    dims = dimensions or DIM
    width = -(-dims // 8) if encoding in ("binary", "ubinary") else dims
    value_type = {"int8": pa.int8(), "uint8": pa.uint8()}
    dtype = {"binary": "int8", "ubinary": "uint8"}.get(encoding, encoding)
    schema = pq.read_schema(tmp_path / "out" / "part-000000.parquet")
    assert schema.field("embedding").type == pa.list_(value_type.get(dtype, pa.float32()), width)
    assert rows.dtype == want.dtype and rows.shape == want.shape == (len(TEXTS), width)
    if encoding == "float":
        np.testing.assert_allclose(rows, want, atol=1e-6)
    else:
        np.testing.assert_array_equal(rows, want)
    vectors = partitions.read_meta(tmp_path / "out" / "part-000000.parquet")["vectors"]
    assert vectors["encoding"] == encoding and vectors["dimensions"] == dimensions
    assert (vectors["ranges"] is not None) == (encoding in ("int8", "uint8"))


def test_chunking_mean_and_none_are_the_services(tmp_path: Path, calibrated, service) -> None:
    """--chunk-aggregate mean: one row per document, /embed's token-weighted mean; none:
    one row per chunk, (id, chunk) in text order, the document's text_sha256 on each."""
    chunking = {"max_tokens": 128, "overlap": 16}
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    mean = run(calibrated, src, tmp_path / "mean", chunking=Chunking(128, 16, "mean"))
    table, rows = read(tmp_path / "mean")
    assert mean.rows == mean.documents == len(TEXTS) and "chunk" not in table.column_names
    want, _ = service(TEXTS, chunking={**chunking, "aggregate": "mean"})
    np.testing.assert_allclose(rows, want, atol=1e-6)
    plain, _ = service(TEXTS[:20])  # a text within the window is one chunk: its plain vector
    np.testing.assert_allclose(rows[:20], plain, atol=1e-6)

    none = run(calibrated, src, tmp_path / "none", chunking=Chunking(128, 16, "none"))
    table, rows = read(tmp_path / "none")
    want, chunks = service(TEXTS, chunking={**chunking, "aggregate": "none"})
    assert chunks is not None and len(chunks) >= len(TEXTS) + 9  # the long ones: 4+ each
    assert (none.documents, none.rows) == (len(TEXTS), len(chunks))
    np.testing.assert_allclose(rows, want, atol=1e-6)
    ids = [f"doc-{c['index']}" for c in chunks]
    numbers = [sum(1 for d in chunks[:k] if d["index"] == c["index"]) for k, c in enumerate(chunks)]
    assert table["id"].to_pylist() == ids and table["chunk"].to_pylist() == numbers
    assert table.schema.field("chunk").type == pa.int32()
    shas = [partitions.text_sha256(TEXTS[c["index"]]) for c in chunks]
    assert table["text_sha256"].to_pylist() == shas
    meta = partitions.read_meta(tmp_path / "none" / "part-000002.parquet")
    assert meta["vectors"]["chunking"] == {"max_tokens": 128, "overlap": 16, "aggregate": "none"}
    assert meta["documents"] == 4 and meta["rows"] >= 13  # the three long ones and ""
    # Codes of chunk rows: the same rows, encoded as the service encodes them.
    run(calibrated, src, tmp_path / "codes", chunking=Chunking(128, 16, "none"), encoding="int8")
    _, codes = read(tmp_path / "codes")
    want, _ = service(TEXTS, chunking={**chunking, "aggregate": "none"}, encoding_format="int8")
    np.testing.assert_array_equal(codes, want)


def test_bad_encoding_or_chunking_is_one_line_before_anything_is_written(
    tmp_path: Path, fp32_artifact, calibrated
) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:5])
    out = tmp_path / "out"
    cases: list[tuple[Any, dict[str, Any], type[Exception], str]] = [
        (fp32_artifact, {"encoding": "uint8"}, EncodingUnavailable, r"--encoding uint8 needs"),
        (calibrated, {"encoding": "int8", "normalize": False}, EncodingUnavailable, "normalised"),
        (calibrated, {"encoding": "base64"}, InvalidInput, "Parquet stores float32 already"),
        (calibrated, {"chunking": Chunking(2)}, InvalidChunking, r"--chunk-tokens must be"),
        (calibrated, {"chunking": Chunking(64, 62)}, InvalidChunking, r"--chunk-overlap must"),
    ]
    for artifact, kw, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            run(artifact, src, out, **kw)
        assert "\n" not in str(caught.value)
        assert not out.exists(), kw
    # binary needs no ranges: the model without them makes it
    assert run(fp32_artifact, src, out, encoding="binary").complete


def test_resume_with_another_encoding_or_chunking_is_refused(tmp_path: Path, calibrated) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    out = tmp_path / "out"
    run(calibrated, src, out, encoding="int8")
    for kw, changed in (
        ({"encoding": "uint8"}, "'encoding': 'uint8'"),
        ({"encoding": "int8", "chunking": Chunking(128)}, "'chunking': {'max_tokens': 128"),
    ):
        with pytest.raises(InvalidInput, match=r"other settings \(vectors: .*--restart") as caught:
            run(calibrated, src, out, **kw)
        assert changed in str(caught.value) and "\n" not in str(caught.value)
    report = run(calibrated, src, out, encoding="int8")  # the same settings: all resumed
    assert report.partitions_resumed == report.partitions == 3 and report.computed == 0
    report = run(calibrated, src, out, encoding="ubinary", restart=True)
    assert report.computed == len(TEXTS) and read(out)[1].dtype == np.uint8


def test_previous_copies_a_documents_chunks_whole(tmp_path: Path, calibrated, service) -> None:
    """With chunk rows, an unchanged document's chunks are all copied; an edited one is
    embedded anew (all its chunks); a document whose chunk rows do not all check out is
    recomputed whole; an output of other chunking gives nothing."""
    chunking = Chunking(128, 16, "none")
    run(calibrated, write_jsonl(tmp_path / "a.jsonl", TEXTS), tmp_path / "v1", chunking=chunking)
    before, rows_before = read(tmp_path / "v1")
    # Tamper with the second chunk of doc-21's row in v1: that document no longer checks out.
    v1 = tmp_path / "v1" / "part-000002.parquet"
    table = pq.read_table(v1)
    shas = table["text_sha256"].to_pylist()
    pairs = zip(table["id"].to_pylist(), table["chunk"].to_pylist(), strict=True)
    at = next(k for k, pair in enumerate(pairs) if pair == ("doc-21", 1))
    shas[at] = "0" * 64
    column = table.schema.get_field_index("text_sha256")
    pq.write_table(table.set_column(column, "text_sha256", pa.array(shas)), v1)

    edited = list(TEXTS)
    edited[3] += " (edited)"
    edited[22] += " And one sentence more at its end."
    src = write_jsonl(tmp_path / "b.jsonl", edited)
    report = run(calibrated, src, tmp_path / "v2", chunking=chunking, previous=tmp_path / "v1")
    assert (report.computed, report.copied) == (3, len(TEXTS) - 3)  # doc-3, doc-22, doc-21
    after, rows = read(tmp_path / "v2")
    want, chunks = service(edited, chunking={"max_tokens": 128, "overlap": 16, "aggregate": "none"})
    assert after["id"].to_pylist() == [f"doc-{c['index']}" for c in chunks]
    np.testing.assert_allclose(rows, want, atol=1e-6)
    unchanged = np.isin(before["id"].to_numpy(zero_copy_only=False), ["doc-3", "doc-21", "doc-22"])
    kept = ~np.isin(after["id"].to_numpy(zero_copy_only=False), ["doc-3", "doc-21", "doc-22"])
    np.testing.assert_array_equal(rows[kept], rows_before[~unchanged])  # copied as they were

    other = run(
        calibrated, src, tmp_path / "v3", chunking=Chunking(64, 0, "none"), previous=tmp_path / "v1"
    )
    assert (other.computed, other.copied) == (len(TEXTS), 0)
    assert "made with another vectors" in (other.previous or "")


def test_duplicates_are_documents_not_chunks(tmp_path: Path, calibrated) -> None:
    """A document's chunk rows share its id: not duplicates; a document id twice is one."""
    texts = [LONG[0], *TEXTS[:8], LONG[1]]
    ids = [f"d{i}" for i in range(len(texts))]
    ids[-1] = "d0"  # two long documents under one id, in different partitions
    src = write_jsonl(tmp_path / "c.jsonl", texts, ids)
    with pytest.raises(
        InvalidInput,
        match=r"1 id\(s\) occur more than once .*'d0' at "
        r"part-000000.parquet\[0\], part-000001.parquet\[0\]",
    ):
        run(calibrated, src, tmp_path / "out", partition_rows=9, chunking=Chunking(128, 0, "none"))
    ok = write_jsonl(tmp_path / "ok.jsonl", texts[:-1])
    report = run(calibrated, ok, tmp_path / "ok", chunking=Chunking(128, 0, "none"))
    assert report.duplicates == 0 and report.complete and report.rows > report.documents


def test_cli(tmp_path: Path, fp32_artifact, calibrated) -> None:
    from typer.testing import CliRunner

    from embedkit.cli import app

    src = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    args = ["embed-corpus", str(src), "--engine", "local", "--partition-rows", "10"]
    chunked = [*args, "--out", str(tmp_path / "out"), "--artifact", str(calibrated.path)]
    result = CliRunner().invoke(
        app,
        [*chunked, "--encoding", "ubinary", "--chunk-tokens", "128", "--chunk-aggregate", "none"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["documents"] == len(TEXTS) and report["rows"] > len(TEXTS)
    schema = pq.read_schema(tmp_path / "out" / "part-000000.parquet")
    assert schema.field("embedding").type == pa.list_(pa.uint8(), 48)
    for extra, message in (
        (["--encoding", "ubinary"], "other settings"),  # chunking dropped: refused
        (["--encoding", "base64", "--restart"], "Parquet stores float32 already"),
    ):
        result = CliRunner().invoke(app, [*chunked, *extra])
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    plain = [*args, "--out", str(tmp_path / "o2"), "--artifact", str(fp32_artifact.path)]
    result = CliRunner().invoke(app, [*plain, "--encoding", "int8"])
    assert result.exit_code == 1 and "needs int8 ranges" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()
