"""A corpus cut into deterministic partitions, and one partition's vectors as a Parquet file.

Partition ``k`` is always input rows ``k*N .. (k+1)*N-1`` (``N`` = ``partition_rows``), in
input order, whatever ran before: a rerun, or a worker of a distributed engine, rebuilds
exactly the same partition from the input alone. Each partition carries the sha256 of its
raw input (JSONL lines as bytes, Parquet rows as canonical JSON), so a finished partition
can prove it was made from the same input.

JSONL lines are parsed by `embedkit reembed`'s own parser (:func:`client.reembed.parse_line`),
so both jobs accept and refuse the same lines with the same reasons. Duplicate ids are not
judged here: a partition knows only itself, so the run's final pass finds them across all.

:func:`embed_partition` is the per-partition work (copy what ``--previous`` already holds,
embed the rest), the function a Ray Data ``map_batches`` actor calls as is; it reads no
global state. :func:`write_partition` publishes it by rename, so a partition file that
exists is a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.client.reembed import parse_line
from embedkit.core.errors import EmbedkitError, InvalidInput, MissingExtra

META_KEY = b"embedkit.corpus"  # the Parquet key-value metadata entry we own
PARTITION_GLOB = "part-*.parquet"

# texts -> float32 [n, dim], already post-processed as the service does.
Embed = Callable[[Sequence[str]], np.ndarray]


def pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet  # pa.parquet is a submodule: import it
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


@dataclass
class Partition:
    """Input rows ``first_row .. first_row + rows - 1`` (0-based), parsed."""

    index: int
    first_row: int
    rows: int = 0
    ids: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # each document's input line (1-based)
    texts: list[str] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)  # {"line", "reason", "raw"}
    checksum: str = ""  # sha256 of the raw rows


# --- input -----------------------------------------------------------------------------


def read_partitions(
    path: Path, rows: int, id_field: str = "id", text_field: str = "text"
) -> Iterator[Partition]:
    """The input (``.parquet``, else JSONL) as partitions of ``rows`` rows each."""
    if rows < 1:
        raise InvalidInput("--partition-rows must be at least 1")
    if not path.is_file():
        raise InvalidInput(f"{path} is not a file")
    if path.suffix == ".parquet":
        yield from _parquet_partitions(path, rows, id_field, text_field)
    else:
        yield from _jsonl_partitions(path, rows, id_field, text_field)


def _jsonl_partitions(path: Path, rows: int, id_field: str, text_field: str) -> Iterator[Partition]:
    with open(path, "rb") as fh:
        index, lineno = 0, 0
        while True:
            raws = [line for _, line in zip(range(rows), fh, strict=False)]
            if not raws:
                return
            part = Partition(index, lineno, len(raws))
            digest = hashlib.sha256()
            for raw in raws:
                lineno += 1
                digest.update(raw)
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    part.rejects.append({"line": lineno, "reason": f"not UTF-8 ({exc.reason})"})
                    continue
                # A fresh `seen` per line: duplicates are the final pass's to judge.
                parsed = parse_line(line, lineno, id_field, text_field, {})
                if isinstance(parsed, dict):
                    part.rejects.append(parsed)
                else:
                    part.ids.append(str(parsed[0]))
                    part.lines.append(lineno)
                    part.texts.append(parsed[1])
            part.checksum = digest.hexdigest()
            yield part
            index += 1


def _parquet_partitions(
    path: Path, rows: int, id_field: str, text_field: str
) -> Iterator[Partition]:
    pa = pyarrow()
    try:
        source = pa.parquet.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput(f"{path}: not a readable Parquet file ({exc})") from None
    names = source.schema_arrow.names
    for column in (id_field, text_field):
        if column not in names:
            raise InvalidInput(f"{path}: no column {column!r} (it has: {', '.join(names)})")
    text_type = source.schema_arrow.field(text_field).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise InvalidInput(f"{path}: column {text_field!r} is {text_type}, not a string")
    buffered: list[tuple[Any, Any]] = []
    index, row = 0, 0

    def cut(chunk: list[tuple[Any, Any]]) -> Partition:
        nonlocal index, row
        part = Partition(index, row, len(chunk))
        digest = hashlib.sha256()
        for ident, text in chunk:
            row += 1
            digest.update(json.dumps([ident, text], default=str).encode() + b"\n")
            if ident is None or isinstance(ident, bool) or not isinstance(ident, str | int):
                part.rejects.append({"line": row, "reason": f"{id_field!r} is not a string"})
            elif not isinstance(text, str):
                part.rejects.append(
                    {"line": row, "reason": f"{text_field!r} is {type(text).__name__}"}
                )
            else:
                part.ids.append(str(ident))
                part.lines.append(row)
                part.texts.append(text)
        part.checksum = digest.hexdigest()
        index += 1
        return part

    # Row groups need not align with partitions: buffer, then cut exactly ``rows`` each.
    for batch in source.iter_batches(batch_size=rows, columns=[id_field, text_field]):
        buffered += zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)
        while len(buffered) >= rows:
            yield cut(buffered[:rows])
            buffered = buffered[rows:]
    if buffered:
        yield cut(buffered)


# --- the per-partition work -------------------------------------------------------------


class Previous:
    """What an earlier output holds: (id, text_sha256) -> its vector, read on demand."""

    def __init__(self, files: Sequence[Path]) -> None:
        pa = pyarrow()
        self._where: dict[tuple[str, str], tuple[int, int]] = {}
        self._files = list(files)
        self._cache: tuple[int, np.ndarray] | None = None
        for f, path in enumerate(self._files):
            table = pa.parquet.read_table(path, columns=["id", "text_sha256"])
            for row, key in enumerate(
                zip(table["id"].to_pylist(), table["text_sha256"].to_pylist(), strict=True)
            ):
                self._where.setdefault(key, (f, row))

    def __len__(self) -> int:
        return len(self._where)

    def lookup(self, ident: str, sha: str) -> np.ndarray | None:
        hit = self._where.get((ident, sha))
        if hit is None:
            return None
        f, row = hit
        if self._cache is None or self._cache[0] != f:  # partitions are read in order
            self._cache = (f, read_vectors(self._files[f]))
        return self._cache[1][row]


@dataclass
class Embedded:
    """One partition's output: rows in input order, and how each vector came to be."""

    part: Partition
    vectors: np.ndarray  # float32 [rows, dim]
    shas: list[str]
    computed: int
    copied: int


def embed_partition(
    part: Partition, embed: Embed, dim: int, previous: Previous | None = None
) -> Embedded:
    """The partition's vectors: copied from ``previous`` where its id and text match,
    embedded (one call for the rest) otherwise."""
    shas = [text_sha256(t) for t in part.texts]
    vectors = np.empty((len(part.texts), dim), dtype=np.float32)
    todo: list[int] = []
    for i, (ident, sha) in enumerate(zip(part.ids, shas, strict=True)):
        old = previous.lookup(ident, sha) if previous is not None else None
        if old is None:
            todo.append(i)
        else:
            vectors[i] = old
    if todo:
        try:
            fresh = np.asarray(embed([part.texts[i] for i in todo]), dtype=np.float32)
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
        if fresh.shape != (len(todo), dim):
            raise InvalidInput(f"embedder returned {list(fresh.shape)} for {len(todo)} texts")
        vectors[todo] = fresh
    return Embedded(part, vectors, shas, len(todo), len(part.texts) - len(todo))


# --- partition files --------------------------------------------------------------------


def write_partition(path: Path, done: Embedded, meta: dict[str, Any]) -> None:
    """The Parquet file at ``path`` or nothing: written under a temporary name, fsynced,
    renamed. ``meta`` (the run's identity and settings) goes into the file's metadata with
    the partition's own facts, so each file proves what made it."""
    pa = pyarrow()
    part = done.part
    dim = done.vectors.shape[1]
    flat = pa.array(done.vectors.reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "id": pa.array(part.ids, type=pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
            "text_sha256": pa.array(done.shas, type=pa.string()),
        }
    )
    own = {
        **meta,
        "partition": part.index,
        "first_row": part.first_row,
        "input_rows": part.rows,
        "rows": len(part.ids),
        "input_sha256": part.checksum,
        "rejects": part.rejects,
        "computed": done.computed,
        "copied": done.copied,
    }
    table = table.replace_schema_metadata({META_KEY: json.dumps(own).encode()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pa.parquet.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_meta(path: Path) -> dict[str, Any]:
    """A partition file's own metadata; InvalidInput when it has none (not ours)."""
    pa = pyarrow()
    try:
        schema = pa.parquet.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput(f"{path}: not a readable partition ({exc})") from None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise InvalidInput(f"{path}: not an embed-corpus partition (no {META_KEY.decode()})")
    meta: dict[str, Any] = json.loads(raw)
    return meta


def read_ids(path: Path) -> list[str]:
    ids: list[str] = pyarrow().parquet.read_table(path, columns=["id"])["id"].to_pylist()
    return ids


def read_vectors(path: Path) -> np.ndarray:
    column = pyarrow().parquet.read_table(path, columns=["embedding"])["embedding"]
    dim = column.type.list_size
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(column), dim)
