"""A corpus cut into deterministic partitions, and one partition's vectors as a Parquet file.

Partition ``k`` is always input rows ``k*N .. (k+1)*N-1`` (``N`` = ``partition_rows``), in
input order, whatever ran before. The driver's one pass over the input (:func:`scan`) keeps
only a small :class:`Partition` descriptor per partition (where its rows lie: byte offsets
in JSONL, a row range in Parquet; the sha256 of its raw rows; its row count), never a text.
Whoever embeds a partition reads its rows itself (:func:`read_rows`: the local engine, or a
Ray actor from the shared filesystem or object store), checks them against the
descriptor's checksum, and parses them; so a finished partition proves which input rows
made it, and an input edited mid-run is refused instead of half-embedded.

Files live wherever :class:`Location` points: a local path or any URI
``pyarrow.fs.FileSystem.from_uri`` opens (``s3://``, ``gs://``, ``file://``, ...).

JSONL lines are parsed by `embedkit reembed`'s own parser (:func:`client.reembed.parse_line`),
so both jobs accept and refuse the same lines with the same reasons. Duplicate ids are not
judged here: a partition knows only itself, so the run's final pass finds them across all.

:func:`embed_partition` is the per-partition work (copy what ``--previous`` already holds,
embed the rest); it reads no global state. :func:`write_partition` publishes the file
atomically, so a partition file that exists is a finished one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.client.reembed import atomic_write, parse_line
from embedkit.core.errors import EmbedkitError, InvalidInput, MissingExtra

META_KEY = b"embedkit.corpus"  # the Parquet key-value metadata entry we own
PARTITION_GLOB = "part-*.parquet"
BLOCK = 1 << 20  # bytes read at a time by the JSONL scan
# Object stores publish an object whole when its upload completes: no rename needed.
OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})

CHUNK = "chunk"  # the column of a chunk's number in its document (--chunk-aggregate none)


@dataclass(frozen=True)
class Chunked:
    """One row per chunk (``--chunk-aggregate none``): every text's chunk rows in text
    order, and how many rows each text has (at least one)."""

    rows: np.ndarray
    counts: np.ndarray


# texts -> one row per text ([n, width] of float32 or codes), or per chunk (Chunked),
# already post-processed as the service does.
Embed = Callable[[Sequence[str]], "np.ndarray | Chunked"]


def pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.fs
        import pyarrow.parquet  # pa.parquet and pa.fs are submodules: import them
    except ModuleNotFoundError:
        raise MissingExtra("embed-corpus needs pyarrow: pip install 'embedkit[batch]'") from None
    return pa


def reword(exc: EmbedkitError, message: str) -> None:
    """Give ``exc`` a message its reader understands (str() and the CLI's line alike)."""
    exc.message = message
    exc.args = (message,)


def text_sha256(text: str) -> str:
    # surrogatepass: JSON may carry a lone surrogate ("\\ud800"); hash it, do not crash
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def partition_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


# --- where files live ---------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())  # S3 errors span lines; the CLI prints one


class Location:
    """A file or directory on a local disk or anything ``pyarrow.fs`` opens.

    Picklable (a Ray actor gets it as is); ``str()`` is what the user typed, for messages.
    Storage errors become one-line :class:`InvalidInput` naming the location.
    """

    def __init__(self, fs: Any, path: str, shown: str) -> None:
        self.fs, self.path, self.shown = fs, path, shown

    @classmethod
    def of(cls, where: str | os.PathLike[str] | Location) -> Location:
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        pa = pyarrow()
        if "://" not in text:  # a plain path, relative or not
            return cls(pa.fs.LocalFileSystem(), os.path.abspath(text), text)
        try:
            fs, path = pa.fs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, OSError, ValueError) as exc:
            raise InvalidInput(
                f"{text}: not a location pyarrow.fs opens ({_one_line(exc)})"
            ) from None
        return cls(fs, path.rstrip("/") or path, text.split("?", 1)[0].rstrip("/"))

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        return f"Location({self.shown!r})"

    def _key(self) -> tuple[str, str]:
        # Local: two spellings (a symlink, "a/../b") of one directory are one location.
        return (self.fs.type_name, os.path.realpath(self.path) if self.local else self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def local(self) -> bool:
        return bool(self.fs.type_name == "local")

    def child(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.shown}/{name}")

    def _error(self, exc: BaseException) -> InvalidInput:
        return InvalidInput(f"{self.shown}: {_one_line(exc)}")

    def _type(self) -> Any:
        try:
            return self.fs.get_file_info(self.path).type
        except OSError as exc:
            raise self._error(exc) from None

    def is_file(self) -> bool:
        return bool(self._type() == pyarrow().fs.FileType.File)

    def is_dir(self) -> bool:
        return bool(self._type() == pyarrow().fs.FileType.Directory)

    def exists(self) -> bool:
        return bool(self._type() != pyarrow().fs.FileType.NotFound)

    def list(self, pattern: str = "*") -> list[Location]:
        """This directory's children whose name matches ``pattern``, sorted by name."""
        pa = pyarrow()
        try:
            infos = self.fs.get_file_info(pa.fs.FileSelector(self.path, allow_not_found=True))
        except OSError as exc:
            raise self._error(exc) from None
        names = sorted(i.base_name for i in infos if fnmatch.fnmatchcase(i.base_name, pattern))
        return [self.child(n) for n in names]

    def open(self) -> Any:
        """A random-access reader (seek, read)."""
        try:
            return self.fs.open_input_file(self.path)
        except OSError as exc:
            raise self._error(exc) from None

    def read_bytes(self) -> bytes:
        with self.open() as fh:
            data: bytes = fh.read()
        return data

    def write_atomic(self, data: bytes | Any) -> None:
        """``data`` at this location whole, or nothing there (the old file, if any)."""
        if self.local:  # temporary name, fsync, rename
            atomic_write(Path(self.path), bytes(data))
            return
        try:
            if self.fs.type_name in OBJECT_STORES:
                # One PUT (or one multipart upload): the object appears only once complete,
                # so a crash mid-upload leaves nothing that looks finished. A rename here
                # would be a copy plus a delete, and no more atomic.
                with self.fs.open_output_stream(self.path) as fh:
                    fh.write(data)
            else:  # other filesystems (HDFS, ...): a temporary name, then a rename
                tmp = f"{self.path.rsplit('/', 1)[0]}/.{self.name}.{os.getpid()}.tmp"
                with self.fs.open_output_stream(tmp) as fh:
                    fh.write(data)
                self.fs.move(tmp, self.path)
        except OSError as exc:
            raise self._error(exc) from None

    def delete(self) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc) from None

    def mkdir(self) -> None:
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as exc:
            raise self._error(exc) from None


# --- input: descriptors, then rows --------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """Where input rows ``first_row .. first_row + rows - 1`` (0-based) lie; no text.

    ``start``/``end``: byte offsets in a JSONL input, row numbers in a Parquet one.
    """

    index: int
    first_row: int
    rows: int
    start: int
    end: int
    checksum: str  # sha256 of the raw rows


@dataclass
class Rows:
    """One partition's rows, read and parsed by whoever embeds it."""

    part: Partition
    ids: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # each document's input line (1-based)
    texts: list[str] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)  # {"line", "reason", "raw"}


def is_parquet(source: Location) -> bool:
    return source.name.endswith(".parquet")


def scan(
    source: Location, rows: int, id_field: str = "id", text_field: str = "text"
) -> Iterator[Partition]:
    """The input's partitions of ``rows`` rows each, in one streaming pass (memory: one
    read block or record batch, whatever the input's size)."""
    if rows < 1:
        raise InvalidInput("--partition-rows must be at least 1")
    if not source.is_file():
        raise InvalidInput(f"{source} is not a file")
    if is_parquet(source):
        yield from _parquet_scan(source, rows, id_field, text_field)
    else:
        yield from _jsonl_scan(source, rows)


def _jsonl_scan(source: Location, rows: int) -> Iterator[Partition]:
    index = start = offset = count = 0  # offset: of the block; count: lines since start
    digest = hashlib.sha256()
    last = b""
    with source.open() as fh:
        while block := fh.read(BLOCK):
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 0x0A)
            used = cut = 0  # newlines and bytes of this block already in a partition
            while used + rows - count <= len(newlines):
                end = int(newlines[used + rows - count - 1]) + 1
                digest.update(block[cut:end])
                yield Partition(index, index * rows, rows, start, offset + end, digest.hexdigest())
                index, start, cut, used, count = (
                    index + 1,
                    offset + end,
                    end,
                    used + rows - count,
                    0,
                )
                digest = hashlib.sha256()
            digest.update(block[cut:])
            count += len(newlines) - used
            offset += len(block)
            last = block[-1:]
    if offset > start:  # a last, shorter partition (its last line may lack its newline)
        count += last != b"\n"
        yield Partition(index, index * rows, count, start, offset, digest.hexdigest())


def _parquet_file(source: Location) -> Any:
    pa = pyarrow()
    try:
        return pa.parquet.ParquetFile(source.open())
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput(f"{source}: not a readable Parquet file ({_one_line(exc)})") from None


def _parquet_columns(source: Location, parquet: Any, id_field: str, text_field: str) -> None:
    pa = pyarrow()
    names = parquet.schema_arrow.names
    for column in (id_field, text_field):
        if column not in names:
            raise InvalidInput(f"{source}: no column {column!r} (it has: {', '.join(names)})")
    text_type = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise InvalidInput(f"{source}: column {text_field!r} is {text_type}, not a string")


def _parquet_row(ident: Any, text: Any) -> bytes:
    return json.dumps([ident, text], default=str).encode() + b"\n"


def _parquet_scan(
    source: Location, rows: int, id_field: str, text_field: str
) -> Iterator[Partition]:
    parquet = _parquet_file(source)
    _parquet_columns(source, parquet, id_field, text_field)
    index = count = 0
    digest = hashlib.sha256()
    # Row groups need not align with partitions: hash row by row, cut every ``rows``.
    for batch in parquet.iter_batches(batch_size=min(rows, 65_536), columns=[id_field, text_field]):
        for ident, text in zip(
            batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True
        ):
            digest.update(_parquet_row(ident, text))
            count += 1
            if count == rows:
                first = index * rows
                yield Partition(index, first, rows, first, first + rows, digest.hexdigest())
                index, count, digest = index + 1, 0, hashlib.sha256()
    if count:
        first = index * rows
        yield Partition(index, first, count, first, first + count, digest.hexdigest())


def read_rows(source: Location, part: Partition, id_field: str, text_field: str) -> Rows:
    """The partition's rows, parsed; InvalidInput when they are not the rows it described
    (the input changed since the scan)."""
    if is_parquet(source):
        raws, got = _parquet_rows(source, part, id_field, text_field)
    else:
        raws, got = _jsonl_rows(source, part, id_field, text_field)
    if raws != part.rows:
        raise _changed(source, part)
    return got


def _changed(source: Location, part: Partition) -> InvalidInput:
    return InvalidInput(
        f"{source} rows {part.first_row + 1}-{part.first_row + part.rows} changed during "
        "the run: rerun once it no longer changes"
    )


def _jsonl_rows(
    source: Location, part: Partition, id_field: str, text_field: str
) -> tuple[int, Rows]:
    with source.open() as fh:
        fh.seek(part.start)
        data: bytes = fh.read(part.end - part.start)
    if hashlib.sha256(data).hexdigest() != part.checksum:
        raise _changed(source, part)
    raws = data.split(b"\n")
    if data.endswith(b"\n"):
        raws.pop()
    got = Rows(part)
    for lineno, raw in enumerate(raws, start=part.first_row + 1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            got.rejects.append({"line": lineno, "reason": f"not UTF-8 ({exc.reason})"})
            continue
        # A fresh `seen` per line: duplicates are the final pass's to judge.
        parsed = parse_line(line, lineno, id_field, text_field, {})
        if isinstance(parsed, dict):
            got.rejects.append(parsed)
        else:
            got.ids.append(str(parsed[0]))
            got.lines.append(lineno)
            got.texts.append(parsed[1])
    return len(raws), got


def _parquet_rows(
    source: Location, part: Partition, id_field: str, text_field: str
) -> tuple[int, Rows]:
    parquet = _parquet_file(source)
    _parquet_columns(source, parquet, id_field, text_field)
    # Only the row groups that hold rows start..end-1 are read.
    groups, first, at = [], None, 0
    for g in range(parquet.metadata.num_row_groups):
        n = parquet.metadata.row_group(g).num_rows
        if at < part.end and at + n > part.start:
            groups.append(g)
            first = at if first is None else first
        at += n
    if first is None:
        raise _changed(source, part)
    table = parquet.read_row_groups(groups, columns=[id_field, text_field])
    table = table.slice(part.start - first, part.end - part.start)
    got = Rows(part)
    digest = hashlib.sha256()
    pairs = zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True)
    for row, (ident, text) in enumerate(pairs, start=part.first_row + 1):
        digest.update(_parquet_row(ident, text))
        if ident is None or isinstance(ident, bool) or not isinstance(ident, str | int):
            got.rejects.append({"line": row, "reason": f"{id_field!r} is not a string"})
        elif not isinstance(text, str):
            got.rejects.append({"line": row, "reason": f"{text_field!r} is {type(text).__name__}"})
        else:
            got.ids.append(str(ident))
            got.lines.append(row)
            got.texts.append(text)
    if digest.hexdigest() != part.checksum:
        raise _changed(source, part)
    return table.num_rows, got


# --- --previous: what an earlier output holds ---------------------------------------------


def id_key(ident: str) -> int:
    """A 64-bit key of an id: what the in-memory indexes hold instead of the id itself."""
    digest = hashlib.blake2b(ident.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _sha_key(sha: str) -> int:
    return int(sha[:16], 16)


class Previous:
    """An earlier output as a compact index: per document, 64-bit keys of its id and
    text_sha256, its file and (first) row (24 bytes per id, sorted arrays; no id string,
    no vector). A hit is confirmed against the file's own id and text_sha256 before its
    vector is copied, so a key collision costs a recomputation, never a wrong vector.
    An output of chunk rows (``chunk`` column) is indexed by each document's chunk 0; a
    hit copies all of its chunks (rows ``0, 1, ...`` that follow) or, when any does not
    check out, none. Picklable: a Ray actor gets the arrays as built (zero-copy from the
    object store)."""

    def __init__(self, files: Sequence[Location]) -> None:
        pa = pyarrow()
        self.files = list(files)
        self.chunked = False
        keys, shas, where, rows = [], [], [], []
        for f, loc in enumerate(self.files):
            names = pa.parquet.read_schema(loc.path, filesystem=loc.fs).names
            chunked = CHUNK in names
            self.chunked |= chunked
            columns = ["id", "text_sha256", *([CHUNK] if chunked else [])]
            table = pa.parquet.read_table(loc.path, columns=columns, filesystem=loc.fs)
            mine = _document_rows(table)
            n = len(mine)
            ids, file_shas = table["id"].to_pylist(), table["text_sha256"].to_pylist()
            keys.append(np.fromiter((id_key(ids[r]) for r in mine), np.uint64, n))
            shas.append(np.fromiter((_sha_key(file_shas[r]) for r in mine), np.uint64, n))
            where.append(np.full(n, f, dtype=np.uint32))
            rows.append(mine.astype(np.uint32))
        key = np.concatenate(keys) if keys else np.empty(0, np.uint64)
        order = np.argsort(key, kind="stable")  # stable: an id's first row wins, as a dict's
        self.key = key[order]
        self.sha = (np.concatenate(shas) if shas else np.empty(0, np.uint64))[order]
        self.file = (np.concatenate(where) if where else np.empty(0, np.uint32))[order]
        self.row = (np.concatenate(rows) if rows else np.empty(0, np.uint32))[order]
        self._cache: tuple[int, Any] | None = None  # the last file read: (its index, table)

    def __len__(self) -> int:
        return len(self.key)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def nbytes(self) -> int:
        return int(self.key.nbytes + self.sha.nbytes + self.file.nbytes + self.row.nbytes)

    def _table(self, f: int) -> Any:
        if self._cache is None or self._cache[0] != f:
            loc = self.files[f]
            table = pyarrow().parquet.read_table(loc.path, filesystem=loc.fs)
            self._cache = (f, table)
        return self._cache[1]

    def lookup(self, ids: Sequence[str], shas: Sequence[str]) -> dict[int, np.ndarray]:
        """The vectors of the rows (by position in ``ids``) whose id and text are there
        (of a chunked output: each document's chunk rows, ``[chunks, width]``); each file
        read once per call."""
        if not len(self.key) or not ids:
            return {}
        keys = np.fromiter(map(id_key, ids), np.uint64, len(ids))
        pos = np.minimum(np.searchsorted(self.key, keys), len(self.key) - 1)
        sha = np.fromiter(map(_sha_key, shas), np.uint64, len(shas))
        hits = np.flatnonzero((self.key[pos] == keys) & (self.sha[pos] == sha))
        found: dict[int, np.ndarray] = {}
        for f in np.unique(self.file[pos[hits]]):
            table = self._table(int(f))
            mine = hits[self.file[pos[hits]] == f]
            first = self.row[pos[mine]].astype(np.int64)
            if CHUNK in table.column_names:
                found.update(_chunk_blocks(table, first, mine, ids, shas))
                continue
            theirs = table.take(first)
            vectors = _vectors(theirs["embedding"])
            their_ids = theirs["id"].to_pylist()
            their_shas = theirs["text_sha256"].to_pylist()
            for k, i in enumerate(mine):
                if their_ids[k] == ids[i] and their_shas[k] == shas[i]:
                    found[int(i)] = vectors[k]
        return found


def _document_rows(table: Any) -> np.ndarray:
    """The row of each document in a partition's table: every row, or each chunk 0."""
    if CHUNK not in table.column_names:
        return np.arange(table.num_rows, dtype=np.int64)
    chunks = table[CHUNK].to_numpy(zero_copy_only=False)
    return np.flatnonzero(chunks == 0).astype(np.int64)


def _chunk_blocks(
    table: Any, first: np.ndarray, mine: np.ndarray, ids: Sequence[str], shas: Sequence[str]
) -> dict[int, np.ndarray]:
    """Per hit, its document's chunk rows (from ``first`` to the next chunk 0), when every
    one of them carries the id and text_sha256 asked for and the chunks run 0, 1, ...;
    else nothing for it (recomputed whole)."""
    starts = _document_rows(table)
    ends = np.append(starts[1:], table.num_rows)
    chunk = table[CHUNK].to_numpy(zero_copy_only=False)
    vectors = _vectors(table["embedding"])
    their_ids, their_shas = table["id"], table["text_sha256"]
    found: dict[int, np.ndarray] = {}
    for start, i in zip(first.tolist(), mine.tolist(), strict=True):
        k = int(np.searchsorted(starts, start))
        if k >= len(starts) or starts[k] != start:
            continue  # the index points at a row that is no chunk 0: not this file's
        end = int(ends[k])
        block_ids = their_ids.slice(start, end - start).to_pylist()
        block_shas = their_shas.slice(start, end - start).to_pylist()
        if (
            all(x == ids[i] for x in block_ids)
            and all(x == shas[i] for x in block_shas)
            and np.array_equal(chunk[start:end], np.arange(end - start))
        ):
            found[i] = vectors[start:end]
    return found


# --- the per-partition work -------------------------------------------------------------


@dataclass
class Embedded:
    """One partition's output: rows in input order, and how each vector came to be."""

    part: Rows
    vectors: np.ndarray  # [output rows, width]: float32, or int8/uint8 codes
    shas: list[str]
    computed: int  # documents
    copied: int  # documents
    # Rows per document with --chunk-aggregate none (its chunks); None: one row each.
    counts: np.ndarray | None = None


def embed_partition(
    part: Rows,
    embed: Embed,
    width: int,
    previous: Previous | None = None,
    *,
    dtype: Any = np.float32,
    chunked: bool = False,
) -> Embedded:
    """The partition's vectors: copied from ``previous`` where its id and text match,
    embedded (one call for the rest) otherwise. ``width`` and ``dtype``: of each row
    written (codes are int8/uint8, binary ones dim/8 bytes wide); ``chunked``: ``embed``
    gives :class:`Chunked` rows, a document's chunks copied or embedded together."""
    dtype = np.dtype(dtype)
    shas = [text_sha256(t) for t in part.texts]
    n = len(part.texts)
    old = previous.lookup(part.ids, shas) if previous is not None else {}
    todo = [i for i in range(n) if i not in old]
    blocks: dict[int, np.ndarray] = {i: np.asarray(v).reshape(-1, width) for i, v in old.items()}
    if todo:
        try:
            result = embed([part.texts[i] for i in todo])
        except EmbedkitError as exc:
            # The engine names items of this call (`input[i]`); the user thinks in lines.
            reword(
                exc,
                re.sub(
                    r"input\[(\d+)\]",
                    lambda m: f"line {part.lines[todo[int(m.group(1))]]}",
                    exc.message,
                ),
            )
            raise
        fresh, counts = _rows(result, len(todo), chunked)
        if fresh.shape != (int(counts.sum()), width) or not _same_kind(fresh.dtype, dtype):
            raise InvalidInput(
                f"embedder returned {list(fresh.shape)} {fresh.dtype} for {len(todo)} texts, "
                f"not [{int(counts.sum())}, {width}] {dtype}"
            )
        if not chunked:  # one row per text: no per-text blocks needed
            vectors = np.empty((n, width), dtype=dtype)
            vectors[todo] = fresh
            for i, block in blocks.items():
                vectors[i] = block[0]
            return Embedded(part, vectors, shas, len(todo), n - len(todo))
        ends = np.cumsum(counts)
        for i, end, count in zip(todo, ends.tolist(), counts.tolist(), strict=True):
            blocks[i] = fresh[end - count : end]
    ordered = [blocks[i] for i in range(n)]
    vectors = (
        np.concatenate(ordered).astype(dtype, copy=False) if n else np.empty((0, width), dtype)
    )
    counts_out = np.array([len(b) for b in ordered], dtype=np.int64) if chunked else None
    return Embedded(part, vectors, shas, len(todo), n - len(todo), counts_out)


def _rows(result: np.ndarray | Chunked, texts: int, chunked: bool) -> tuple[np.ndarray, np.ndarray]:
    """An embed function's answer as (rows, rows per text)."""
    if isinstance(result, Chunked):
        if not chunked:
            raise InvalidInput("embedder returned chunk rows for an output of one row per text")
        counts = np.asarray(result.counts, dtype=np.int64)
        if counts.shape != (texts,) or (counts < 1).any():
            raise InvalidInput(f"embedder returned chunk counts {counts.tolist()[:5]}...")
        return np.asarray(result.rows), counts
    if chunked:
        raise InvalidInput("embedder returned one row per text for an output of chunk rows")
    return np.asarray(result), np.ones(texts, dtype=np.int64)


def _same_kind(got: np.dtype, want: np.dtype) -> bool:
    # Floats of any width are float32 once written; codes must be the very dtype.
    return got == want or (got.kind == want.kind == "f")


# --- partition files --------------------------------------------------------------------


def write_partition(where: Location, done: Embedded, meta: dict[str, Any]) -> None:
    """The Parquet file at ``where`` or nothing (:meth:`Location.write_atomic`). ``meta``
    (the run's identity and settings) goes into the file's metadata with the partition's
    own facts, so each file proves what made it. With chunk rows (``done.counts``) a
    document's id and text_sha256 repeat on each of its rows, ``chunk`` numbering them."""
    pa = pyarrow()
    rows, part = done.part, done.part.part
    width = done.vectors.shape[1]
    flat = pa.array(done.vectors.reshape(-1), type=pa.from_numpy_dtype(done.vectors.dtype))
    ids, shas = rows.ids, done.shas
    columns: dict[str, Any] = {}
    if done.counts is not None:
        ids = np.repeat(np.asarray(ids, dtype=object), done.counts).tolist()
        shas = np.repeat(np.asarray(shas, dtype=object), done.counts).tolist()
        starts = np.cumsum(done.counts) - done.counts
        number = np.arange(len(ids), dtype=np.int32) - np.repeat(starts, done.counts)
        columns[CHUNK] = pa.array(number.astype(np.int32), type=pa.int32())
    table = pa.table(
        {
            "id": pa.array(ids, type=pa.string()),
            **columns,
            "embedding": pa.FixedSizeListArray.from_arrays(flat, width),
            "text_sha256": pa.array(shas, type=pa.string()),
        }
    )
    own = {
        **meta,
        "partition": part.index,
        "first_row": part.first_row,
        "input_rows": part.rows,
        "rows": table.num_rows,
        "documents": len(rows.ids),
        "input_sha256": part.checksum,
        "rejects": rows.rejects,
        "computed": done.computed,
        "copied": done.copied,
    }
    table = table.replace_schema_metadata({META_KEY: json.dumps(own).encode()})
    # Serialised in memory first (a partition is N × dim × 4 bytes): a failure while
    # encoding must not leave an open upload that closing would publish half-made.
    sink = pa.BufferOutputStream()
    pa.parquet.write_table(table, sink)
    where.write_atomic(sink.getvalue())


def read_meta(where: Location | Path) -> dict[str, Any]:
    """A partition file's own metadata; InvalidInput when it has none (not ours)."""
    pa = pyarrow()
    where = Location.of(where)
    try:
        schema = pa.parquet.read_schema(where.path, filesystem=where.fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput(f"{where}: not a readable partition ({_one_line(exc)})") from None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise InvalidInput(f"{where}: not an embed-corpus partition (no {META_KEY.decode()})")
    meta: dict[str, Any] = json.loads(raw)
    return meta


def read_ids(where: Location | Path) -> list[str]:
    """Every row's id (a document's chunk rows each carry its id)."""
    loc = Location.of(where)
    table = pyarrow().parquet.read_table(loc.path, columns=["id"], filesystem=loc.fs)
    ids: list[str] = table["id"].to_pylist()
    return ids


def read_documents(where: Location | Path) -> list[tuple[int, str]]:
    """Each document's (row, id) in a partition file: every row, or each chunk 0 of an
    output of chunk rows (its other chunks carry the same id: not duplicates)."""
    loc = Location.of(where)
    pa = pyarrow()
    chunked = CHUNK in pa.parquet.read_schema(loc.path, filesystem=loc.fs).names
    columns = ["id", *([CHUNK] if chunked else [])]
    table = pa.parquet.read_table(loc.path, columns=columns, filesystem=loc.fs)
    ids = table["id"].to_pylist()
    return [(r, ids[r]) for r in _document_rows(table).tolist()]


def _vectors(column: Any) -> np.ndarray:
    """A fixed-size list column as ``[rows, width]`` of its own value type (float32 or
    int8/uint8 codes)."""
    dim = column.type.list_size
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat).reshape(len(column), dim)


def read_vectors(where: Location | Path) -> np.ndarray:
    loc = Location.of(where)
    table = pyarrow().parquet.read_table(loc.path, columns=["embedding"], filesystem=loc.fs)
    return _vectors(table["embedding"])
