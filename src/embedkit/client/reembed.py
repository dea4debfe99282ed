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
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
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
FORMAT_VERSION = 1
RETRYABLE = {429, 503, 504}
# What makes two vectors comparable: the same model version, variant and precision. The
# provider and CPU ISA level are recorded per chunk but may differ between pods.
VECTOR_FIELDS = ("name", "version", "variant", "compatibility", "precision")

Format = Literal["npy", "jsonl"]
OnBadLine = Literal["skip", "stop"]


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


@dataclass
class Summary:
    identity: ServedIdentity
    documents: int = 0  # in the output, all runs
    embedded: int = 0  # by this run
    rejected: int = 0  # lines in rejects.jsonl, all runs
    chunks_resumed: int = 0  # found finished in the checkpoint
    retries: dict[str, int] = field(default_factory=dict)  # status (or "connect") -> count
    seconds: float = 0.0


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
    """The output directory: chunk files, the checkpoint, the final index and rejects."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.root = options.out
        self.chunks = self.root / "chunks"
        self.done: set[int] = set()
        self.identity: ServedIdentity | None = None
        self.dim: int | None = None

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

    def load(self) -> bool:
        """Read an existing checkpoint; False when there is none (a fresh output)."""
        path = self.root / CHECKPOINT
        if not path.exists():
            if self.root.exists() and any(self.root.iterdir()):
                raise InvalidInput(f"{self.root} is not empty and holds no {CHECKPOINT}")
            return False
        state = json.loads(path.read_text())
        if state.get("format_version") != FORMAT_VERSION:
            raise InvalidInput(f"{path}: not a reembed checkpoint of this version")
        mine, theirs = self._settings(), state["settings"]
        changed = [f"{k}: {theirs.get(k)!r} → {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if changed:
            raise InvalidInput(
                f"{self.root} was made with other settings ({'; '.join(changed)}): "
                "resume with the same ones or use a new --out"
            )
        self.identity = ServedIdentity.from_dict(state["identity"])
        self.dim = state["dimensions"]
        self.done = {k for first, last in state["done"] for k in range(first, last + 1)}
        return True

    def start(self, identity: ServedIdentity, *, fresh: bool) -> None:
        self.identity = identity
        if fresh:  # the checkpoint first: a directory holding one is ours to resume
            self.root.mkdir(parents=True, exist_ok=True)
            self.save()
        self.chunks.mkdir(exist_ok=True)
        for stale in self.chunks.glob(".*.tmp"):  # a killed run's half-written files
            stale.unlink()

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
        state = {
            "format_version": FORMAT_VERSION,
            "settings": self._settings(),
            "identity": self.identity.as_dict(),
            "served": self.identity.header_value(),
            "dimensions": self.dim,
            "done": _ranges(self.done),
            "complete": complete,
        }
        atomic_write(self.root / CHECKPOINT, json.dumps(state, indent=1).encode())

    def finish(self, total_chunks: int) -> tuple[int, int]:
        """index.jsonl (one line per document, input order) and rejects.jsonl, from the
        checkpoint's chunks only; (documents, rejects)."""
        docs, index, rejects = 0, [], []
        for k in range(total_chunks):
            side = json.loads(self.sidecar(k).read_text())
            rejects += side["rejects"]
            name = self.vectors_file(k).relative_to(self.root).as_posix()
            for row, (line, ident) in enumerate(zip(side["lines"], side["ids"], strict=True)):
                index.append(json.dumps({"id": ident, "line": line, "file": name, "row": row}))
            docs += len(side["ids"])
        atomic_write(self.root / "index.jsonl", "".join(x + "\n" for x in index).encode())
        self.write_rejects(rejects)
        self.save(complete=True)
        return docs, len(rejects)

    def write_rejects(self, rejects: list[dict[str, Any]]) -> None:
        atomic_write(
            self.root / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects).encode()
        )


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


def _check_identity(made_with: ServedIdentity, now: ServedIdentity, where: str) -> None:
    if _vector_key(made_with) != _vector_key(now):

        def show(i: ServedIdentity) -> str:
            return (
                f"{i.tag} (variant={i.variant}, class={i.compatibility}, precision={i.precision})"
            )

        raise IdentityMismatch(
            f"{where} was made with {show(made_with)} but the service now serves {show(now)}: "
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
    """Embed ``options.input`` into ``options.out``, resuming what a previous run left.
    ``progress(lines done, lines, text)`` follows the work; ``warn`` gets each rejected
    line (number and reason) as it is found."""
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
    service = Service(options, transport=transport, sleep=sleep)
    try:
        now = service.identity()
        if output.identity is not None:
            _check_identity(output.identity, now, str(options.out))
        output.start(output.identity or now, fresh=not resumed)
        summary = Summary(identity=output.identity or now, chunks_resumed=len(output.done))
        try:
            _embed_all(options, output, service, summary, total_lines, progress, warn)
        finally:
            summary.retries = dict(service.retries)
        summary.documents, summary.rejected = output.finish(-(-total_lines // options.chunk_size))
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
