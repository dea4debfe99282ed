"""`embedkit reembed`: a corpus (JSONL) through a running service into checkpointed vectors.

A client of the HTTP service, like any other: documents go to the bulk route (``/embed``)
in chunks, answers come back as base64 float32, and each chunk is written with the served
identity of the model that made it (the ``X-Embedkit-Model`` header, parsed by
:meth:`ServedIdentity.from_header`).

Exactly once, across crashes: chunk ``k`` is always input lines ``k*C+1 .. (k+1)*C``
(``C`` = ``chunk_size``, fixed by the first run). A finished chunk writes its vectors and
a sidecar (ids, line numbers, rejects, identity) to ``chunks/`` by rename, then the
checkpoint (``reembed.json``, also written by rename after an fsync) records it. A chunk
whose files exist but which the checkpoint does not name is redone and its files replaced,
so a kill at any instant neither loses nor duplicates a document; the output
(``index.jsonl``, written at the end) is built from the checkpoint alone. On resume every
finished chunk's ids are checked against the input (an edited input is refused), and the
service's identity against the one the output was made with (another model version,
variant or precision is refused: vectors of two models must not share an index).

Under admission control the service answers 429 (and 503 while it starts) with
``Retry-After``: those are waited out and retried, within ``max_wait_s`` per chunk.
A malformed line (not JSON, not an object, missing or mistyped id/text, a duplicate id,
a blank line) is named with its line number: ``on_bad_line="skip"`` records it in
``rejects.jsonl`` and goes on, ``"stop"`` finishes the chunks in flight and stops.

Sharded (``--shard I/N``, one pod of a Kubernetes Indexed Job each): shard ``I`` embeds the
chunks ``k`` with ``k % N == I`` (every shard reads the whole input, so line numbers, chunk
boundaries and duplicate ids are the same for all) and keeps its own checkpoint, index and
rejects (``reembed-shard-I-of-N.json``, ``index-shard-I-of-N.jsonl``, ...) beside the
others' in one output. Chunk files are named by their global index, so shards never write
the same file. The shard that finds all N checkpoints complete writes the merged
``index.jsonl`` and ``rejects.jsonl``, then ``reembed-shards.json``: its presence says the
whole corpus is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np

from embedkit.client import api
from embedkit.core.errors import (
    EmbedkitError,
    IdentityMismatch,
    InferenceError,
    InvalidInput,
    Overloaded,
)
from embedkit.runtime.vectors import decode_base64
from embedkit.serve.engine.identity import ServedIdentity

CHECKPOINT = "reembed.json"
SHARDS_DONE = "reembed-shards.json"  # written once every shard's checkpoint is complete
SHARD_CHECKPOINT = re.compile(r"reembed-shard-(\d+)-of-(\d+)\.json")
# What a shard may find in the output before it starts: its siblings' files and the chunks.
SHARD_FILE = re.compile(r"(reembed|index|rejects)-shard-\d+-of-(\d+)\.jsonl?")
STALE_CHUNK = re.compile(r"\.(\d{8})\.")  # the chunk index in a half-written chunk file's name
INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in each pod of an Indexed Job
FORMAT_VERSION = 1
RETRYABLE = {429, 503, 504}
# What makes two vectors comparable: the same model version, variant and precision. The
# provider and CPU ISA level are recorded per chunk but may differ between pods.
VECTOR_FIELDS = ("name", "version", "variant", "compatibility", "precision")

Format = Literal["npy", "jsonl"]
OnBadLine = Literal["skip", "stop"]


@dataclass(frozen=True)
class Shard:
    """This process's share of the chunks: those ``k`` with ``k % count == index``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise InvalidInput(f"shard {self.index}/{self.count}: want 0 <= I < N")

    @classmethod
    def parse(cls, text: str, source: str = "--shard") -> Shard:
        """``I/N`` with ``0 <= I < N``; ``source`` names where it came from in errors."""
        found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if found is None:
            raise InvalidInput(f"{source} {text!r} is not I/N (two integers, e.g. 0/4)")
        index, count = int(found[1]), int(found[2])
        if count < 1:
            raise InvalidInput(f"{source} {text!r}: N must be at least 1")
        if index >= count:
            raise InvalidInput(f"{source} {text!r}: I must be below N (0 <= I < N)")
        return cls(index, count)

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index

    @property
    def suffix(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def resolve_shard(
    shard: str | None, shards: int | None, environ: Mapping[str, str]
) -> Shard | None:
    """The shard from ``--shard I/N``, else from ``JOB_COMPLETION_INDEX`` and ``--shards N``
    (an Indexed Job: its completions count, which Kubernetes does not pass to the pod);
    None for an unsharded run."""
    if shards is not None and shards < 1:
        raise InvalidInput(f"--shards {shards}: must be at least 1")
    if shard is not None:
        parsed = Shard.parse(shard)
        if shards is not None and shards != parsed.count:
            raise InvalidInput(f"--shard {shard} and --shards {shards} disagree on N")
        return parsed
    index = environ.get(INDEX_ENV)
    if index is None:
        if shards is not None:
            raise InvalidInput(
                f"--shards {shards} without this process's index: give --shard I/{shards} "
                f"or run in an Indexed Job (which sets {INDEX_ENV})"
            )
        return None
    if shards is None:
        raise InvalidInput(
            f"{INDEX_ENV}={index} is set (a Kubernetes Indexed Job) but not the number of "
            "shards: give --shards N (the Job's completions) or --shard I/N"
        )
    return Shard.parse(f"{index}/{shards}", INDEX_ENV)


@dataclass(frozen=True)
class Options:
    url: str
    input: Path
    out: Path
    id_field: str = "id"
    text_field: str = "text"
    chunk_size: int = 64  # 64 abstracts of 256 tokens = the default token admission (16 384)
    concurrency: int = 2
    format: Format = "npy"
    on_bad_line: OnBadLine = "skip"
    api_key: str | None = None
    timeout_s: float = 120.0  # one request
    max_wait_s: float = 600.0  # one chunk's retries (429/503/504, connection errors) in all
    model: str | None = None  # a deployment serving several models: which one (None: default)
    shard: Shard | None = None  # this process's share of the chunks (None: all of them)


@dataclass
class Summary:
    identity: ServedIdentity
    documents: int = 0  # in the output, all runs
    embedded: int = 0  # by this run
    rejected: int = 0  # lines in rejects.jsonl, all runs
    chunks_resumed: int = 0  # found finished in the checkpoint
    retries: dict[str, int] = field(default_factory=dict)  # status (or "connect") -> count
    seconds: float = 0.0
    shards_complete: int | None = None  # sharded: shards whose checkpoint is complete


@dataclass(frozen=True)
class Chunk:
    index: int
    first_line: int
    lines: list[int]  # line numbers of the documents (1-based)
    ids: list[str | int]
    texts: list[str]
    rejects: list[dict[str, Any]]

    @property
    def size(self) -> int:
        """Input lines this chunk covers (documents and rejects)."""
        return len(self.lines) + len(self.rejects)

    @property
    def span(self) -> str:
        return f"lines {self.first_line}-{self.first_line + self.size - 1}"


Progress = Callable[[int, int, str], None]


# --- input ----------------------------------------------------------------------------


def _bad(lineno: int, reason: str, raw: str) -> dict[str, Any]:
    return {"line": lineno, "reason": reason, "raw": raw[:200]}


def parse_line(
    raw: str, lineno: int, id_field: str, text_field: str, seen: dict[str | int, int]
) -> tuple[str | int, str] | dict[str, Any]:
    """(id, text) of one JSONL line, or its reject record (line number and reason)."""
    if not raw.strip():
        return _bad(lineno, "blank line", raw)
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        return _bad(lineno, f"not JSON ({exc.msg} at column {exc.colno})", raw)
    if not isinstance(doc, dict):
        return _bad(lineno, f"not a JSON object but {type(doc).__name__}", raw)
    if id_field not in doc:
        return _bad(lineno, f"no {id_field!r} field", raw)
    ident = doc[id_field]
    if isinstance(ident, bool) or not isinstance(ident, str | int):
        return _bad(lineno, f"{id_field!r} is {type(ident).__name__}, not a string or integer", raw)
    if text_field not in doc:
        return _bad(lineno, f"no {text_field!r} field", raw)
    text = doc[text_field]
    if not isinstance(text, str):
        return _bad(lineno, f"{text_field!r} is {type(text).__name__}, not a string", raw)
    if ident in seen:
        return _bad(lineno, f"duplicate id {ident!r} (first at line {seen[ident]})", raw)
    seen[ident] = lineno
    return ident, text


def read_chunks(options: Options) -> Iterator[Chunk]:
    """The input cut into chunks of ``chunk_size`` lines, each line parsed."""
    seen: dict[str | int, int] = {}
    with open(options.input, encoding="utf-8", newline="\n") as fh:
        index, lineno = 0, 0
        while True:
            raws = [line for _, line in zip(range(options.chunk_size), fh, strict=False)]
            if not raws:
                return
            chunk = Chunk(index, lineno + 1, [], [], [], [])
            for raw in raws:
                lineno += 1
                parsed = parse_line(
                    raw.rstrip("\r\n"), lineno, options.id_field, options.text_field, seen
                )
                if isinstance(parsed, dict):
                    chunk.rejects.append(parsed)
                else:
                    chunk.lines.append(lineno)
                    chunk.ids.append(parsed[0])
                    chunk.texts.append(parsed[1])
            yield chunk
            index += 1


def count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        total = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
        if fh.tell():  # a last line without its newline
            fh.seek(-1, os.SEEK_END)
            total += fh.read(1) != b"\n"
    return total


# --- output -------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes) -> None:
    """``data`` at ``path`` or the old file, never half of it (write, fsync, rename)."""
    # pid and a random part: pods of one Job share the output and often the pid as well.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _ids_digest(ids: list[str | int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _ranges(done: set[int]) -> list[list[int]]:
    """Finished chunk indices as inclusive [first, last] runs (the checkpoint stays small)."""
    out: list[list[int]] = []
    for k in sorted(done):
        if out and out[-1][1] == k - 1:
            out[-1][1] = k
        else:
            out.append([k, k])
    return out


class Output:
    """The output directory: chunk files, the checkpoint, the final index and rejects (one
    of each per shard when sharded, beside the other shards')."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.shard = options.shard
        self.root = options.out
        self.chunks = self.root / "chunks"
        self.done: set[int] = set()
        self.identity: ServedIdentity | None = None
        self.dim: int | None = None
        tail = f"-{self.shard.suffix}" if self.shard else ""
        self.checkpoint = self.root / (f"reembed{tail}.json" if self.shard else CHECKPOINT)
        self.index_file = self.root / f"index{tail}.jsonl"
        self.rejects_file = self.root / f"rejects{tail}.jsonl"

    def owns(self, chunk: int) -> bool:
        return self.shard is None or self.shard.owns(chunk)

    def _settings(self) -> dict[str, Any]:
        o = self.options
        return {
            "input": str(o.input),
            "id_field": o.id_field,
            "text_field": o.text_field,
            "chunk_size": o.chunk_size,
            "format": o.format,
            "model": o.model,
        }

    def _check_settings(self, path: Path, theirs: dict[str, Any]) -> None:
        mine = self._settings()
        changed = [f"{k}: {theirs.get(k)!r} → {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if changed:
            raise InvalidInput(
                f"{path} was made with other settings ({'; '.join(changed)}): "
                "resume with the same ones or use a new --out"
            )

    def _read_state(self, path: Path) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(path.read_text())
        if state.get("format_version") != FORMAT_VERSION:
            raise InvalidInput(f"{path}: not a reembed checkpoint of this version")
        return state

    def _shard_checkpoints(self) -> dict[tuple[int, int], Path]:
        """(index, count) -> path of every shard checkpoint in the output."""
        if not self.root.is_dir():
            return {}
        found = {}
        for path in self.root.iterdir():
            m = SHARD_CHECKPOINT.fullmatch(path.name)
            if m:
                found[int(m[1]), int(m[2])] = path
        return found

    def _refuse_mixing(self, shards: dict[tuple[int, int], Path]) -> None:
        """One layout per output: unsharded, or N shards for one N."""
        counts = sorted({n for _, n in shards})
        if self.shard is None:
            if counts:
                raise InvalidInput(
                    f"{self.root} holds the checkpoints of a run in {counts[0]} shards: resume "
                    f"it with --shard I/{counts[0]} (or --shards {counts[0]}), or use a new --out"
                )
            return
        if (self.root / CHECKPOINT).exists():
            raise InvalidInput(
                f"{self.root} holds an unsharded checkpoint ({CHECKPOINT}): resume it without "
                "--shard, or use a new --out"
            )
        other = [n for n in counts if n != self.shard.count]
        if other:
            raise InvalidInput(
                f"{self.root} holds shards of a run in {other[0]} shards, not "
                f"{self.shard.count}: resume with --shards {other[0]}, or use a new --out"
            )

    def _foreign(self) -> list[str]:
        """Names in the output a fresh run (or shard) must not write beside."""
        if not self.root.exists():
            return []
        names = [p.name for p in self.root.iterdir()]
        if self.shard is None:
            return names
        count = str(self.shard.count)
        return [
            n
            for n in names
            if n != "chunks"
            and not (n.startswith(".") and n.endswith(".tmp"))  # a sibling's write in flight
            and not ((m := SHARD_FILE.fullmatch(n)) and m[2] == count)
        ]

    def load(self) -> bool:
        """Read an existing checkpoint; False when there is none (a fresh output, or shard)."""
        shards = self._shard_checkpoints()
        self._refuse_mixing(shards)
        # The other shards' settings are this one's (their chunks share one index).
        for (i, _), path in sorted(shards.items()):
            if self.shard is not None and i != self.shard.index:
                self._check_settings(path, self._read_state(path)["settings"])
        path = self.checkpoint
        if not path.exists():
            foreign = self._foreign()
            if foreign:
                what = f"shard checkpoints of {self.shard.count}" if self.shard else CHECKPOINT
                raise InvalidInput(
                    f"{self.root} is not empty and holds no {what} (it holds {foreign[0]}): "
                    "use a new --out"
                )
            return False
        state = self._read_state(path)
        self._check_settings(self.root, state["settings"])
        self.identity = ServedIdentity.from_dict(state["identity"])
        self.dim = state["dimensions"]
        self.done = {k for first, last in state["done"] for k in range(first, last + 1)}
        return True

    def sibling_identities(self) -> dict[Path, ServedIdentity]:
        """The served identity each other shard's checkpoint records."""
        if self.shard is None:
            return {}
        return {
            path: ServedIdentity.from_dict(self._read_state(path)["identity"])
            for (i, _), path in sorted(self._shard_checkpoints().items())
            if i != self.shard.index
        }

    def start(self, identity: ServedIdentity, *, fresh: bool) -> None:
        self.identity = identity
        if fresh:  # the checkpoint first: a directory holding one is ours to resume
            self.root.mkdir(parents=True, exist_ok=True)
            self.save()
        self.chunks.mkdir(exist_ok=True)
        for stale in self.chunks.glob(".*.tmp"):  # a killed run's half-written files
            m = STALE_CHUNK.match(stale.name)
            if m is None or self.owns(int(m[1])):  # another shard's may be in flight
                stale.unlink(missing_ok=True)

    def vectors_file(self, index: int) -> Path:
        return self.chunks / f"{index:08d}.{self.options.format}"

    def sidecar(self, index: int) -> Path:
        return self.chunks / f"{index:08d}.json"

    def check_unchanged(self, chunk: Chunk) -> None:
        """A finished chunk's documents are still the input's at those lines."""
        recorded = json.loads(self.sidecar(chunk.index).read_text())
        if recorded["ids_sha256"] != _ids_digest(chunk.ids) or recorded["lines"] != chunk.lines:
            raise InvalidInput(
                f"{self.options.input} changed since {self.root} was written ({chunk.span} "
                "no longer hold the same documents): use a new --out"
            )

    def write_chunk(self, chunk: Chunk, vectors: np.ndarray | None, header: str | None) -> None:
        """The chunk's files, then the checkpoint naming it (the order makes it exactly once)."""
        if vectors is not None:
            self.dim = int(vectors.shape[1])
            if self.options.format == "npy":
                buf = _npy_bytes(vectors)
            else:
                rows = (
                    json.dumps({"id": i, "embedding": v})
                    for i, v in zip(chunk.ids, vectors.tolist(), strict=True)
                )
                buf = ("\n".join(rows) + "\n").encode()
            atomic_write(self.vectors_file(chunk.index), buf)
        side = {
            "chunk": chunk.index,
            "lines": chunk.lines,
            "ids": chunk.ids,
            "ids_sha256": _ids_digest(chunk.ids),
            "rejects": chunk.rejects,
            "served": header,
        }
        atomic_write(self.sidecar(chunk.index), json.dumps(side).encode())
        self.done.add(chunk.index)
        self.save()

    def save(self, complete: bool = False) -> None:
        assert self.identity is not None
        state: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "settings": self._settings(),
            "identity": self.identity.as_dict(),
            "served": self.identity.header_value(),
            "dimensions": self.dim,
            "done": _ranges(self.done),
            "complete": complete,
        }
        if self.shard is not None:
            state["shard"] = {"index": self.shard.index, "count": self.shard.count}
        atomic_write(self.checkpoint, json.dumps(state, indent=1).encode())

    def _index(self, chunks: Iterable[int]) -> tuple[list[str], list[Any]]:
        """index.jsonl lines (input order) and rejects of ``chunks``, from their sidecars."""
        index: list[str] = []
        rejects: list[Any] = []
        for k in chunks:
            side = json.loads(self.sidecar(k).read_text())
            rejects += side["rejects"]
            name = self.vectors_file(k).relative_to(self.root).as_posix()
            for row, (line, ident) in enumerate(zip(side["lines"], side["ids"], strict=True)):
                index.append(json.dumps({"id": ident, "line": line, "file": name, "row": row}))
        return index, rejects

    def _write_index(self, index: list[str], rejects: list[Any], *, merged: bool = False) -> None:
        """The index and rejects: this run's, or (``merged``) the whole sharded output's."""
        index_path = self.root / "index.jsonl" if merged else self.index_file
        rejects_path = self.root / "rejects.jsonl" if merged else self.rejects_file
        atomic_write(index_path, "".join(x + "\n" for x in index).encode())
        atomic_write(rejects_path, "".join(json.dumps(r) + "\n" for r in rejects).encode())

    def finish(self, total_chunks: int) -> tuple[int, int]:
        """The index (one line per document, input order) and the rejects of this run's
        chunks, from the checkpoint's chunks only; (documents, rejects)."""
        index, rejects = self._index([k for k in range(total_chunks) if self.owns(k)])
        self._write_index(index, rejects)
        self.save(complete=True)
        return len(index), len(rejects)

    def merge_shards(self, total_chunks: int) -> int:
        """Once every shard's checkpoint is complete, the whole output's ``index.jsonl``,
        ``rejects.jsonl`` and then ``reembed-shards.json``; the number of complete shards.

        Each shard calls this after saving its own complete checkpoint, so the last to
        finish sees them all; two finishing together write the same bytes."""
        assert self.shard is not None and self.identity is not None
        n = self.shard.count
        states = {}
        for (i, count), path in self._shard_checkpoints().items():
            if count == n:
                states[i] = self._read_state(path)
        complete = sum(1 for s in states.values() if s["complete"])
        if complete < n:
            return complete
        for i, state in sorted(states.items()):
            where = self.root / f"reembed-shard-{i}-of-{n}.json"
            self._check_settings(where, state["settings"])
            theirs = ServedIdentity.from_dict(state["identity"])
            _check_identity(theirs, self.identity, str(where), "this shard's is")
            done = {k for first, last in state["done"] for k in range(first, last + 1)}
            missing = [k for k in range(i, total_chunks, n) if k not in done]
            if missing:  # complete but not covering its chunks: made from another input
                raise InvalidInput(
                    f"{where} is complete but lacks chunk {missing[0]}: the shards were run "
                    "over different inputs; use a new --out"
                )
        index, rejects = self._index(range(total_chunks))
        self._write_index(index, rejects, merged=True)
        summary = {
            "format_version": FORMAT_VERSION,
            "shards": n,
            "complete": True,
            "documents": len(index),
            "rejected": len(rejects),
            "served": self.identity.header_value(),
            "identity": self.identity.as_dict(),
        }
        atomic_write(self.root / SHARDS_DONE, json.dumps(summary, indent=1).encode())
        return complete


def _npy_bytes(vectors: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vectors, dtype="<f4"))
    return buf.getvalue()


# --- the service ---------------------------------------------------------------------------


class Service:
    """The bulk route of one service, with retries on 429/503/504 and broken connections."""

    def __init__(
        self,
        options: Options,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api = api.Client(
            options.url, api_key=options.api_key, timeout_s=options.timeout_s, transport=transport
        )
        self.client = self.api.http
        self.max_wait_s = options.max_wait_s
        self.model = options.model
        self.sleep = sleep
        self.retries: dict[str, int] = {}

    def close(self) -> None:
        self.api.close()

    def _call(self, what: str, send: Callable[[], httpx.Response]) -> httpx.Response:
        deadline = time.monotonic() + self.max_wait_s
        for attempt in range(1_000_000):
            response: httpx.Response | None = None
            try:
                response = send()
            except api.TransportError as exc:
                reason = f"connection: {type(exc).__name__}"
            else:
                if response.status_code not in RETRYABLE:
                    if response.status_code != 200:
                        raise api.error_for(response, what)
                    return response
                reason = str(response.status_code)
            # Backoff with jitter; Retry-After, when given, is the server's own estimate.
            wait_s = api.retry_after(response)
            if wait_s is None:
                wait_s = min(30.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)
            if time.monotonic() + wait_s > deadline:
                raise Overloaded(
                    f"gave up on {what} after {self.max_wait_s:.0f} s of retries "
                    f"(last: {reason}); rerun the same command to resume"
                )
            key = reason.partition(":")[0]
            self.retries[key] = self.retries.get(key, 0) + 1
            self.sleep(wait_s)
        raise AssertionError("unreachable")

    def identity(self) -> ServedIdentity:
        """What the service serves now (``/v1/models``), before any work is sent."""
        response = self._call("GET /v1/models", lambda: self.api.get(api.MODELS_PATH))
        try:
            cards = response.json()["data"]
            card = cards[0] if self.model is None else _card(cards, self.model)
            if card is None:
                served = ", ".join(repr(c.get("id")) for c in cards)
                raise InvalidInput(
                    f"{self.client.base_url} does not serve model {self.model!r}; "
                    f"it serves: {served}"
                )
            return ServedIdentity.from_dict(card["embedkit"])
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise InvalidInput(
                f"{self.client.base_url} is not an embedkit service (/v1/models: {exc})"
            ) from None

    def embed(self, chunk: Chunk) -> tuple[np.ndarray, ServedIdentity, str]:
        what = chunk.span
        response = self._call(
            what,
            lambda: self.api.embed(
                chunk.texts, model=self.model, check=False, encoding_format="base64"
            ),
        )
        header = api.served_header(response) or ""
        try:
            served = api.served_identity(response)
            answer = response.json()
            vectors = decode_base64(answer["embeddings"], int(answer["dimensions"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise InferenceError(f"unexpected answer to {what}: {exc}") from None
        if vectors.shape[0] != len(chunk.texts):
            raise InferenceError(f"{what}: {vectors.shape[0]} vectors for {len(chunk.texts)} texts")
        return vectors, served, header


def _card(cards: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
    return next((c for c in cards if c.get("id") == model), None)


def _vector_key(identity: ServedIdentity) -> tuple[str, ...]:
    return tuple(str(getattr(identity, f)) for f in VECTOR_FIELDS)


def _show(i: ServedIdentity) -> str:
    return f"{i.tag} (variant={i.variant}, class={i.compatibility}, precision={i.precision})"


def _check_identity(
    made_with: ServedIdentity,
    now: ServedIdentity,
    where: str,
    now_is: str = "the service now serves",
) -> None:
    if _vector_key(made_with) != _vector_key(now):
        raise IdentityMismatch(
            f"{where} was made with {_show(made_with)} but {now_is} {_show(now)}: "
            "vectors of two models must not mix; re-embed into a new --out"
        )


# --- the run -----------------------------------------------------------------------------


def run(
    options: Options,
    *,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Summary:
    """Embed ``options.input`` (or, with ``options.shard``, its share of the chunks) into
    ``options.out``, resuming what a previous run left. ``progress(lines done, lines, text)``
    follows the work; ``warn`` gets each rejected line (number and reason) as it is found."""
    if options.chunk_size < 1 or options.concurrency < 1:
        raise InvalidInput("--chunk-size and --concurrency must be at least 1")
    if options.on_bad_line not in ("skip", "stop") or options.format not in ("npy", "jsonl"):
        raise InvalidInput("--on-bad-line is skip or stop; --format is npy or jsonl")
    if not options.input.is_file():
        raise InvalidInput(f"{options.input} is not a file")
    total_lines = count_lines(options.input)
    if total_lines == 0:
        raise InvalidInput(f"{options.input} is empty (expected one JSON document a line)")
    started = time.monotonic()
    output = Output(options)
    resumed = output.load()
    total_chunks = -(-total_lines // options.chunk_size)
    service = Service(options, transport=transport, sleep=sleep)
    try:
        now = service.identity()
        if output.identity is not None:
            _check_identity(output.identity, now, str(options.out))
        # A shard joining the others: their vectors and its own must come from one model.
        for path, theirs in output.sibling_identities().items():
            _check_identity(theirs, now, str(path))
        output.start(output.identity or now, fresh=not resumed)
        summary = Summary(identity=output.identity or now, chunks_resumed=len(output.done))
        own_lines = sum(
            min(options.chunk_size, total_lines - k * options.chunk_size)
            for k in range(total_chunks)
            if output.owns(k)
        )
        try:
            _embed_all(options, output, service, summary, own_lines, progress, warn)
        finally:
            summary.retries = dict(service.retries)
        summary.documents, summary.rejected = output.finish(total_chunks)
        if options.shard is not None:
            summary.shards_complete = output.merge_shards(total_chunks)
    finally:
        service.close()
    summary.seconds = time.monotonic() - started
    return summary


def _embed_all(
    options: Options,
    output: Output,
    service: Service,
    summary: Summary,
    total_lines: int,
    progress: Progress | None,
    warn: Callable[[str], None] | None,
) -> None:
    assert output.identity is not None
    made_with = output.identity
    lines_done = 0
    pending: dict[Future[tuple[np.ndarray, ServedIdentity, str]], Chunk] = {}
    stop: EmbedkitError | None = None

    def report(description: str) -> None:
        if progress is not None:
            progress(lines_done, total_lines, description)

    def collect() -> None:
        nonlocal lines_done, stop
        finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for future in finished:
            chunk = pending.pop(future)
            try:
                vectors, served, header = future.result()
                _check_identity(made_with, served, str(options.out))
            except EmbedkitError as exc:
                stop = stop or exc  # finish the others in flight, then stop
                continue
            output.write_chunk(chunk, vectors, header)
            summary.embedded += len(chunk.ids)
            lines_done += chunk.size
            report(f"{summary.embedded} embedded")

    with ThreadPoolExecutor(options.concurrency) as pool:
        for chunk in read_chunks(options):
            if stop is not None:
                break
            if not output.owns(chunk.index):  # another shard's (parsed all the same: the
                continue  # duplicate ids and line numbers are the whole input's)
            if chunk.index in output.done:
                output.check_unchanged(chunk)
                lines_done += chunk.size
                report("resuming")
                continue
            if chunk.rejects and options.on_bad_line == "stop":
                bad = chunk.rejects[0]
                stop = InvalidInput(
                    f"{options.input} line {bad['line']}: {bad['reason']} (--on-bad-line stop)"
                )
                break
            for bad in chunk.rejects:
                if warn is not None:
                    warn(f"{options.input} line {bad['line']}: {bad['reason']}: skipped")
            if not chunk.texts:  # every line of it rejected: nothing to send
                output.write_chunk(chunk, None, None)
                lines_done += chunk.size
                continue
            pending[pool.submit(service.embed, chunk)] = chunk
            while len(pending) >= options.concurrency:
                collect()
        while pending:
            collect()
    if stop is not None:
        raise stop
