"""`embedkit embed-corpus` at scale: the driver's scan keeps descriptors, never texts, in
bounded memory; whoever embeds a partition reads its rows and checks them; input, --out and
--previous on an S3-compatible object store (moto's server on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedkit.batch import corpus, partitions
from embedkit.batch.partitions import Location
from embedkit.core.errors import InvalidInput
from embedkit.core.settings import Settings
from embedkit.model.evaldata import sts_sentences

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pafs = pytest.importorskip("pyarrow.fs")

SETTINGS = Settings(intra_op_threads=2)
TEXTS = sts_sentences("test")


def write_jsonl(path: Path, texts: Sequence[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return path


# --- the scan: descriptors, exact and bounded ---------------------------------------------

line = st.one_of(
    st.builds(lambda i, t: json.dumps({"id": i, "text": t}), st.integers(0, 99), st.text()),
    st.sampled_from(["", "{not json", '{"id": 1}', "\r"]),
)


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(line, max_size=40),
    last_newline=st.booleans(),
    rows=st.integers(1, 9),
    block=st.integers(1, 64),
)
def test_jsonl_scan_cuts_every_n_lines_whatever_the_read_blocks(
    tmp_path_factory: pytest.TempPathFactory,
    lines: list[str],
    last_newline: bool,
    rows: int,
    block: int,
) -> None:
    """Each descriptor is exactly N input lines (the last may be shorter), its offsets and
    checksum those of their raw bytes, and reading it back gives those lines, whatever the
    scan's read block size (a line may span blocks)."""
    raw = "\n".join(lines).encode() + (b"\n" if last_newline and lines else b"")
    src = tmp_path_factory.mktemp("scan") / "c.jsonl"
    src.write_bytes(raw)
    expected = [x + b"\n" for x in raw.split(b"\n")]
    if raw.endswith(b"\n") or not raw:
        expected.pop()
    else:
        expected[-1] = expected[-1][:-1]
    where = Location.of(src)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(partitions, "BLOCK", block)
        parts = list(partitions.scan(where, rows))
    groups = [expected[i : i + rows] for i in range(0, len(expected), rows)]
    assert [p.rows for p in parts] == [len(g) for g in groups]
    for part, group in zip(parts, groups, strict=True):
        chunk = b"".join(group)
        assert raw[part.start : part.end] == chunk
        assert part.checksum == hashlib.sha256(chunk).hexdigest()
        assert part.first_row == part.index * rows
        got = partitions.read_rows(where, part, "id", "text")
        assert sorted(got.lines + [r["line"] for r in got.rejects]) == list(
            range(part.first_row + 1, part.first_row + part.rows + 1)
        )


def test_descriptors_carry_no_text_and_the_scan_holds_one_block(tmp_path: Path) -> None:
    """A 24 MB input: the scan's peak Python memory stays near one read block, and what the
    driver keeps (and ships to a Ray actor) per partition is a few integers and a hash."""
    fields = {f.name: f.type for f in dataclasses.fields(partitions.Partition)}
    assert fields == {
        "index": "int",
        "first_row": "int",
        "rows": "int",
        "start": "int",
        "end": "int",
        "checksum": "str",
    }
    text = "x" * 1000
    src = tmp_path / "big.jsonl"
    with open(src, "w") as fh:
        for i in range(24_000):
            fh.write(json.dumps({"id": i, "text": f"{i} {text}"}) + "\n")
    tracemalloc.start()
    try:
        parts = list(partitions.scan(Location.of(src), 1_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(parts) == 24 and sum(p.rows for p in parts) == 24_000
    assert peak < 4 * partitions.BLOCK, f"the scan held {peak} bytes"
    assert all(len(p.checksum) == 64 for p in parts)
    from embedkit.batch import ray_engine  # imports Ray lazily: no Ray needed here

    row = ray_engine._row(parts[3])  # what a Ray actor receives per partition
    assert set(row) == set(fields) and ray_engine._partition(row) == parts[3]


def test_run_hands_the_engine_descriptors_only(tmp_path: Path) -> None:
    """What --engine ray's dispatch receives: descriptors (no text anywhere in them); the
    partition's rows are read by the worker from the input itself."""
    texts = [f"document number {i} with its own words" for i in range(40)]
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    opts = corpus.Options(src, tmp_path / "out", partition_rows=10)
    fake = corpus.Embedder(
        partitions_identity(),
        4,
        {"normalize": True},
        lambda batch: np.ones((len(batch), 4), np.float32),
    )
    seen: list[Any] = []

    def dispatch(
        pending: list[partitions.Partition], meta: dict[str, Any], previous: Any
    ) -> Iterator[tuple[int, int, int]]:
        seen.extend(pending)
        for part in pending:
            done = corpus.make_partition(
                opts, part, meta, lambda rows: partitions.embed_partition(rows, fake.embed, 4)
            )
            yield part.index, done.computed, done.copied

    report = corpus.run(opts, fake, dispatch=dispatch)
    assert report.documents == 40 and len(seen) == 4
    assert all(isinstance(p, partitions.Partition) for p in seen)
    shipped = repr(seen)
    assert not any(t in shipped for t in texts) and "doc-" not in shipped


def partitions_identity() -> Any:
    from embedkit.serve.engine.identity import ServedIdentity

    return ServedIdentity("fake", "v1", "fp32", "index-compatible", "fp32", "CPU", "avx2")


def test_an_input_changed_after_the_scan_is_refused(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:20])
    where = Location.of(src)
    parts = list(partitions.scan(where, 10))
    write_jsonl(src, [*TEXTS[:15], "an edited line", *TEXTS[16:20]])
    assert partitions.read_rows(where, parts[0], "id", "text").ids[0] == "doc-0"
    with pytest.raises(InvalidInput, match=r"c\.jsonl rows 11-20 changed during the run"):
        partitions.read_rows(where, parts[1], "id", "text")


def test_parquet_rows_are_read_by_range(tmp_path: Path) -> None:
    src = tmp_path / "c.parquet"
    texts = TEXTS[:50]
    pq.write_table(pa.table({"id": list(range(50)), "text": texts}), src, row_group_size=7)
    where = Location.of(src)
    parts = list(partitions.scan(where, 12))
    assert [(p.start, p.end) for p in parts] == [(0, 12), (12, 24), (24, 36), (36, 48), (48, 50)]
    got = partitions.read_rows(where, parts[2], "id", "text")
    assert got.ids == [str(i) for i in range(24, 36)] and got.texts == texts[24:36]
    pq.write_table(pa.table({"id": list(range(50)), "text": texts[::-1]}), src)
    with pytest.raises(InvalidInput, match="rows 25-36 changed during the run"):
        partitions.read_rows(where, parts[2], "id", "text")


def test_previous_index_is_compact_and_confirms_each_hit(tmp_path: Path) -> None:
    """24 bytes per id, no id strings or vectors; a key that matches but whose row holds
    another id (a 64-bit key collision) gives no vector."""
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:30])
    fake = corpus.Embedder(
        partitions_identity(),
        3,
        {"normalize": True},
        lambda batch: np.arange(len(batch) * 3, dtype=np.float32).reshape(-1, 3),
    )
    corpus.run(corpus.Options(src, tmp_path / "v1", partition_rows=10), fake)
    index = partitions.Previous(Location.of(tmp_path / "v1").list(partitions.PARTITION_GLOB))
    assert len(index) == 30 and index.nbytes() == 30 * 24
    assert {k: v.dtype.itemsize for k, v in vars(index).items() if isinstance(v, np.ndarray)} == {
        "key": 8,
        "sha": 8,
        "file": 4,
        "row": 4,
    }
    sha = partitions.text_sha256(TEXTS[12])
    found = index.lookup(["doc-12", "doc-13"], [sha, sha])
    assert list(found) == [0]  # doc-13's text differs
    np.testing.assert_array_equal(
        found[0], partitions.read_vectors(tmp_path / "v1" / "part-000001.parquet")[2]
    )
    # A collision: doc-12's key and sha key, but the row it points to is another id.
    real = partitions.id_key
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(partitions, "id_key", lambda ident: real("doc-12"))
        assert index.lookup(["not-doc-12"], [sha]) == {}


# --- S3: a real S3-compatible server on 127.0.0.1 -----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server_module = pytest.importorskip("moto.server", reason="moto[server] is a dev extra")
    server = server_module.ThreadedMotoServer(
        ip_address="127.0.0.1", port=_free_port(), verbose=False
    )
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Any:
    """An empty bucket; pyarrow (any S3 client) finds the server through the environment."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    name = "corpus-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    fs = pafs.S3FileSystem(
        endpoint_override=s3_endpoint,
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir(name)
    return fs, name


def put(fs: Any, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def s3_ids(fs: Any, prefix: str) -> list[str]:
    files = sorted(
        i.path
        for i in fs.get_file_info(pafs.FileSelector(prefix))
        if i.base_name.startswith("part-")
    )
    return [i for f in files for i in pq.read_table(f, filesystem=fs)["id"].to_pylist()]


@pytest.fixture(scope="module")
def embedder(fp32_artifact) -> corpus.Embedder:
    return corpus.local_embedder(corpus.Options("-", "-", str(fp32_artifact.path)), SETTINGS)


class Crash:
    def __init__(self, inner: Any, fail_at: int | None) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return np.asarray(self.inner(texts))


def test_s3_input_to_s3_output_resumes_and_reuses_previous(
    bucket: Any, embedder: corpus.Embedder, fp32_artifact, tmp_path: Path
) -> None:
    fs, name = bucket
    texts = TEXTS[:120]
    body = "".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    put(fs, f"{name}/in/corpus.jsonl", body.encode())
    opts = corpus.Options(f"s3://{name}/in/corpus.jsonl", f"s3://{name}/v1", partition_rows=25)
    crashing = Crash(embedder.embed, fail_at=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        corpus.run(opts, replace(embedder, embed=crashing))
    assert s3_ids(fs, f"{name}/v1") == [f"doc-{i}" for i in range(50)]
    manifest = json.loads(fs.open_input_file(f"{name}/v1/{corpus.MANIFEST}").read())
    assert manifest["complete"] is False
    again = Crash(embedder.embed, fail_at=None)
    report = corpus.run(opts, replace(embedder, embed=again))
    assert (report.partitions, report.partitions_resumed, report.computed) == (5, 2, 70)
    assert again.calls == 3 and report.complete and report.out == f"s3://{name}/v1"
    ids = s3_ids(fs, f"{name}/v1")
    assert ids == [f"doc-{i}" for i in range(120)]
    local = corpus.run(
        corpus.Options(write_jsonl(tmp_path / "c.jsonl", texts), tmp_path / "l", partition_rows=25),
        embedder,
    )
    assert local.documents == 120
    for k in range(5):
        got = pq.read_table(f"{name}/v1/part-{k:06d}.parquet", filesystem=fs)
        want = pq.read_table(tmp_path / "l" / f"part-{k:06d}.parquet")
        assert got["id"].to_pylist() == want["id"].to_pylist()
        np.testing.assert_allclose(
            partitions._vectors(got["embedding"]), partitions._vectors(want["embedding"]), atol=1e-6
        )
    # The CLI, --previous on S3: two edited documents are all it embeds.
    from typer.testing import CliRunner

    from embedkit.cli import app

    edited = list(texts)
    edited[7] = edited[90] = "an edited document"
    put(
        fs,
        f"{name}/in/corpus-2.jsonl",
        "".join(
            json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(edited)
        ).encode(),
    )
    result = CliRunner().invoke(
        app,
        [
            *("embed-corpus", f"s3://{name}/in/corpus-2.jsonl", "--out", f"s3://{name}/v2"),
            *("--previous", f"s3://{name}/v1", "--partition-rows", "25", "--engine", "local"),
            *("--artifact", str(fp32_artifact.path)),
        ],
    )
    assert result.exit_code == 0, result.output
    cli_report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (cli_report["computed"], cli_report["copied"], cli_report["complete"]) == (2, 118, True)
    assert s3_ids(fs, f"{name}/v2") == [f"doc-{i}" for i in range(120)]
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{name}/v2"))}
    assert {corpus.REPORT, corpus.MANIFEST, corpus.REJECTS, corpus.DUPLICATES} <= names
    assert not [n for n in names if n.endswith(".tmp")]


def test_s3_bad_locations_are_one_line(bucket: Any, embedder: corpus.Embedder) -> None:
    fs, name = bucket
    missing = corpus.Options(f"s3://{name}/nothing.jsonl", f"s3://{name}/out")
    with pytest.raises(InvalidInput, match=rf"s3://{name}/nothing.jsonl is not a file"):
        corpus.run(missing, embedder)
    with pytest.raises(InvalidInput, match=r"not a location pyarrow\.fs opens"):
        corpus.run(corpus.Options("nope://x/y.jsonl", f"s3://{name}/out"), embedder)
    put(fs, f"{name}/c.jsonl", b'{"id": 1, "text": "a"}\n')
    with pytest.raises(InvalidInput, match=r"--previous s3://.*/none: no embed-corpus\.json"):
        corpus.run(
            corpus.Options(
                f"s3://{name}/c.jsonl", f"s3://{name}/out", previous=f"s3://{name}/none"
            ),
            embedder,
        )
