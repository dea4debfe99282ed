"""`embedkit embed-corpus`: a corpus embedded in-process into resumable Parquet partitions.

The engine-independent core: :class:`Embedder` says who embeds (its served identity, the
settings that change vectors, a texts → vectors function), :func:`run` drives the
partitions (:mod:`embedkit.batch.partitions`) through it. ``--engine local`` is
:func:`local_embedder`, the artifact's :class:`~embedkit.runtime.engine.Engine` with the
service's post-processing: prompt, truncation, chunking (``Engine.encode`` /
``Engine.encode_chunked`` give the raw pooled rows, as the Embedder does), then the
front's own steps on them (``runtime.chunking.pool``, then ``runtime.vectors.finish``:
Matryoshka dimensions, normalisation, output encodings).

Input, ``--out`` and ``--previous`` are local paths or any URI ``pyarrow.fs`` opens
(:class:`~embedkit.batch.partitions.Location`). The driver holds partition descriptors,
not texts: whoever embeds a partition reads its rows (:func:`make_partition`).

One output, one model, one input: ``DIR/embed-corpus.json`` records the identity (name,
version, variant, class, precision), the vector settings and the partitioning; so does
every partition file's metadata, with the sha256 of the input rows it was made from. A
rerun skips partitions whose file exists and whose metadata match (a file exists only
once complete: it is published by rename), and redoes the rest. Anything else is refused
in one line: another model's output always (use a new ``--out``); a changed version,
setting or input unless ``--restart``, which deletes this output's own files first.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from embedkit.batch import partitions
from embedkit.batch.partitions import Embed, Embedded, Location, Previous
from embedkit.client.reembed import VECTOR_FIELDS
from embedkit.core.errors import (
    EmbedkitError,
    EncodingUnavailable,
    IdentityMismatch,
    InvalidChunking,
    InvalidInput,
)
from embedkit.core.settings import Settings
from embedkit.runtime.chunking import Chunking
from embedkit.serve.engine.identity import ServedIdentity

MANIFEST = "embed-corpus.json"
REPORT = "report.json"
REJECTS = "rejects.jsonl"
DUPLICATES = "duplicates.jsonl"
FORMAT_VERSION = 1

OnBadLine = Literal["fail", "skip"]
OnDuplicate = Literal["fail", "report"]
Progress = Callable[[int, int, str], None]
# (partitions to make, the run's metadata, --previous's index or None) -> one
# (partition index, computed, copied) per partition written, as each finishes.
Dispatch = Callable[
    [list[partitions.Partition], dict[str, Any], Previous | None],
    Iterable[tuple[int, int, int]],
]
# A local path, or a URI pyarrow.fs opens (s3://bucket/key, gs://..., file://...).
Where = str | os.PathLike[str]


@dataclass(frozen=True)
class Options:
    input: Where
    out: Where
    model: str | None = None  # artifact dir or tag; None: settings.model
    id_field: str = "id"
    text_field: str = "text"
    partition_rows: int = 10_000
    on_bad_line: OnBadLine = "fail"
    on_duplicate: OnDuplicate = "fail"
    previous: Where | None = None
    restart: bool = False
    normalize: bool | None = None  # None: the model's
    dimensions: int | None = None  # Matryoshka truncation
    prompt_name: str | None = None  # None: the model's default prompt, as the service
    truncate: bool = True  # False: a text over the token limit stops the run
    encoding: str = "float"  # the service's encoding_format, base64 aside (docs)
    chunking: Chunking | None = None  # None: texts over the limit are truncated


@dataclass(frozen=True)
class Embedder:
    """Who embeds: what the output records of it, and the function that does it."""

    identity: ServedIdentity
    dim: int  # width of the rows written (Matryoshka dims; binary codes: bytes)
    vectors: dict[str, Any]  # the settings that change vectors, as recorded
    embed: Embed
    # The graph's sha256: two local exports both read "name:local", their graphs differ.
    graph_sha256: str | None = None
    dtype: Any = field(default=np.float32)  # of the rows: float32, or int8/uint8 codes
    chunked: bool = False  # one row per chunk (--chunk-aggregate none)

    def partition(self, rows: partitions.Rows, previous: Previous | None) -> Embedded:
        """One partition's rows embedded (or copied from ``previous``)."""
        return partitions.embed_partition(
            rows, self.embed, self.dim, previous, dtype=self.dtype, chunked=self.chunked
        )


# --encoding's values: the service's encoding_format, where Parquet has a use for it.
ENCODINGS = ("float", "int8", "uint8", "binary", "ubinary")
CODE_TYPES = {"int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}
# CLI names of the service's chunking fields, for its messages.
_CHUNK_FLAGS = {
    "chunking.max_tokens": "--chunk-tokens",
    "chunking.overlap": "--chunk-overlap",
    "chunking.aggregate": "--chunk-aggregate",
}


def _check_encoding(encoding: str, normalize: bool, ranges: Any) -> None:
    """The service's refusals (serve.pipeline.jobs.check_encoding), in this command's words."""
    from embedkit.serve.pipeline.jobs import check_encoding

    if encoding == "base64":
        raise InvalidInput(
            "--encoding base64 is the HTTP wire format of float32 vectors; Parquet stores "
            "float32 already: use --encoding float"
        )
    if encoding not in ENCODINGS:
        raise InvalidInput(f"--encoding is one of {', '.join(ENCODINGS)}, not {encoding!r}")
    try:
        check_encoding(encoding, normalize=normalize, base64_codes=False, ranges=ranges)
    except EncodingUnavailable as exc:
        if exc.param == "normalize":
            raise EncodingUnavailable(
                f"--encoding {encoding}: this model's ranges were calibrated on "
                f"{'normalised' if normalize is False else 'unnormalised'} vectors; "
                f"--{'no-' if normalize is False else ''}normalize cannot use them"
            ) from None
        raise EncodingUnavailable(
            f"--encoding {encoding} needs int8 ranges calibrated at release and this model's "
            "manifest has none: use float, binary or ubinary, or a model released with "
            "`embedkit release`"
        ) from None


def _chunking(options: Options, engine: Any) -> dict[str, Any] | None:
    """--chunk-*, checked as the service checks ``chunking`` (runtime.chunking), as recorded
    (max_tokens resolved: the model's limit when not given)."""
    from embedkit.runtime.chunking import window_room

    chunking = options.chunking
    if chunking is None:
        return None
    try:
        room, overlap = window_room(chunking, engine.tokenizer)
    except InvalidChunking as exc:
        message = exc.message
        for name, flag in _CHUNK_FLAGS.items():
            message = message.replace(name, flag)
        raise InvalidChunking(message, param=exc.param) from None
    # As /embed: a prompt would have to open every window; refused, never dropped.
    if engine.prompts.resolve(options.prompt_name) is not None:
        raise InvalidInput(
            "chunking with a prompt (--prompt-name, or the model's default prompt) is not "
            "supported, as in the service; embed without --chunk-* options"
        )
    frame = sum(map(len, engine.tokenizer.frame))
    return {"max_tokens": room + frame, "overlap": overlap, "aggregate": chunking.aggregate}


def local_embedder(options: Options, settings: Settings | None = None) -> Embedder:
    """The artifact's engine in this process (``--engine local``)."""
    from embedkit.core.settings import get_settings
    from embedkit.model import toolchain
    from embedkit.model.artifact import MODEL_FILE
    from embedkit.runtime import vectors
    from embedkit.runtime.engine import Engine
    from embedkit.runtime.vectors import check_dimensions
    from embedkit.serve.engine import identity

    settings = settings or get_settings()
    engine = Engine.load(options.model or settings.model, settings)
    dims = check_dimensions(options.dimensions, engine.dimension)
    prompt = engine.prompts.resolve(options.prompt_name)  # an unknown name fails now
    normalize = (
        engine.manifest.embedding_config.normalize
        if options.normalize is None
        else options.normalize
    )
    encoding = options.encoding
    ranges = engine.manifest.encoding_ranges
    _check_encoding(encoding, normalize, ranges)  # before anything is written
    chunking = _chunking(options, engine)
    served = identity.build(
        engine.artifact,
        provider=engine.provider,
        precision=engine.precision.compute,
        isa=toolchain.detect_isa().level,
    )
    recorded = {
        "normalize": normalize,
        "dimensions": dims,
        "encoding": encoding,
        "prompt": None if prompt is None else {"name": prompt.name, "text": prompt.text},
        "truncate": options.truncate,
        "chunking": chunking,
        # The buckets of int8/uint8 codes: another release's ranges give other codes.
        "ranges": _ranges_sha256(ranges) if encoding in ("int8", "uint8") else None,
    }
    buckets = None if ranges is None else np.array([ranges.min, ranges.max])

    def finish(raw: np.ndarray) -> np.ndarray:
        # What the front does with the Embedder's raw rows (serve.pipeline.front.Front.embed).
        return vectors.finish(
            raw,
            encoding,
            normalize=normalize,
            dimensions=dims,
            model_dim=engine.dimension,
            ranges=buckets,
        )

    def embed(texts: Any) -> np.ndarray | partitions.Chunked:
        if options.chunking is None:
            # normalize=False, all dimensions: the raw pooled rows, exactly (postprocess
            # leaves float32 rows as they are); `finish` then does what the service does.
            raw = engine.encode(
                texts, normalize=False, truncate=options.truncate, prompt_name=options.prompt_name
            )
            return finish(raw)
        # Raw chunk rows, or per text their token-weighted mean (runtime.chunking.pool).
        raw, plan = engine.encode_chunked(texts, options.chunking, normalize=False)
        if options.chunking.aggregate == "mean":
            return finish(raw)
        counts = np.bincount([c.index for c in plan.chunks], minlength=len(texts))
        return partitions.Chunked(finish(raw), counts)

    files = engine.manifest.files
    graph = files.get(MODEL_FILE) or files.get(engine.artifact.model_path.name)
    width = dims or engine.dimension
    if encoding in ("binary", "ubinary"):
        width = -(-width // 8)  # sign bits packed 8 to a byte, the last byte zero-padded
    return Embedder(
        served,
        width,
        recorded,
        embed,
        graph,
        dtype=CODE_TYPES.get(encoding, np.float32),
        chunked=chunking is not None and chunking["aggregate"] == "none",
    )


def _ranges_sha256(ranges: Any) -> str:
    import hashlib

    data = json.dumps([ranges.min, ranges.max, ranges.normalized]).encode()
    return hashlib.sha256(data).hexdigest()


@dataclass
class Report:
    served: str
    input: str
    out: str
    partitions: int = 0
    partitions_resumed: int = 0
    input_rows: int = 0
    documents: int = 0  # in the output, all runs
    rows: int = 0  # in the output: documents, or their chunks with --chunk-aggregate none
    computed: int = 0  # by this run
    copied: int = 0  # by this run, from --previous
    bad_lines: int = 0  # skipped, all runs (rejects.jsonl)
    duplicates: int = 0  # ids found in more than one row (duplicates.jsonl)
    previous: str | None = None  # why --previous was not used, when it was not
    seconds: float = 0.0
    docs_per_s: float | None = None
    complete: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _identity(embedder: Embedder) -> dict[str, str | None]:
    served = embedder.identity
    return {**{f: str(getattr(served, f)) for f in VECTOR_FIELDS}, "graph": embedder.graph_sha256}


def _show(identity: dict[str, Any]) -> str:
    return (
        f"{identity.get('name')}:{identity.get('version')} (variant={identity.get('variant')}, "
        f"class={identity.get('compatibility')}, precision={identity.get('precision')})"
    )


def run_meta(options: Options, embedder: Embedder) -> dict[str, Any]:
    """What every partition and the manifest record; equal between runs to resume."""
    return {
        "format_version": FORMAT_VERSION,
        "identity": _identity(embedder),
        "vectors": embedder.vectors,
        "dim": embedder.dim,
        "input": {
            "id_field": options.id_field,
            "text_field": options.text_field,
            "partition_rows": options.partition_rows,
        },
    }


def _differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    keys = ("format_version", "identity", "vectors", "dim", "input")
    return [f"{k}: {theirs.get(k)!r} → {mine[k]!r}" for k in keys if theirs.get(k) != mine[k]]


class Output:
    """The output directory: partitions, the manifest, the end-of-run files."""

    def __init__(self, options: Options, meta: dict[str, Any]) -> None:
        self.options = options
        self.root = Location.of(options.out)
        self.meta = meta

    def path(self, index: int) -> Location:
        return self.root.child(partitions.partition_name(index))

    def files(self) -> list[Location]:
        return self.root.list(partitions.PARTITION_GLOB)

    def _check(self, theirs: dict[str, Any], where: Location) -> None:
        """``theirs`` (a manifest's or partition's metadata) was made as this run makes."""
        made_by = theirs.get("identity") or {}
        if made_by.get("name") != self.meta["identity"]["name"]:
            raise IdentityMismatch(
                f"{where} holds vectors of {_show(made_by)}, not of "
                f"{_show(self.meta['identity'])}: vectors of two models must not mix; "
                "use a new --out"
            )
        changed = _differences(self.meta, theirs)
        if changed:
            raise InvalidInput(
                f"{where} was made with other settings ({'; '.join(changed)}): "
                "rerun with --restart to redo it all, or use a new --out"
            )

    def open(self) -> None:
        """Check what the directory holds (or wipe it: --restart); write the manifest."""
        manifest = self.root.child(MANIFEST)
        if self.root.is_file():
            raise InvalidInput(f"{self.root} is not a directory")
        if manifest.is_file():
            try:
                state = json.loads(manifest.read_bytes())
            except ValueError:
                raise InvalidInput(f"{manifest}: not an embed-corpus manifest") from None
            try:
                self._check(state, self.root)
            except IdentityMismatch:
                raise
            except InvalidInput:
                if not self.options.restart:
                    raise
                self._wipe()
        elif self.root.list():
            found = self.files()
            if found:  # another tool's (or a lost manifest's) partitions: say whose
                self._check(partitions.read_meta(found[0]), found[0])
            raise InvalidInput(f"{self.root} is not empty and holds no {MANIFEST}: use a new --out")
        if self.options.restart:
            self._wipe()
        self.root.mkdir()
        for stale in self.root.list(".*.tmp"):  # a killed run's half-written files
            stale.delete()
        self.save(complete=False)

    def _wipe(self) -> None:
        """--restart: this output's own files, nothing else."""
        for path in self.files():
            path.delete()
        for name in (MANIFEST, REPORT, REJECTS, DUPLICATES):
            self.root.child(name).delete()

    def write(self, name: str, data: bytes) -> None:
        self.root.child(name).write_atomic(data)

    def save(self, *, complete: bool, **facts: Any) -> None:
        state = {**self.meta, "complete": complete, **facts}
        self.write(MANIFEST, json.dumps(state, indent=1).encode())

    def finished(self, part: partitions.Partition) -> dict[str, Any] | None:
        """The metadata of the partition's file when it is finished and still right."""
        path = self.path(part.index)
        if not path.exists():
            return None
        theirs = partitions.read_meta(path)
        self._check(theirs, path)
        if theirs.get("input_sha256") != part.checksum or theirs.get("input_rows") != part.rows:
            last = part.first_row + part.rows
            raise InvalidInput(
                f"{self.options.input} rows {part.first_row + 1}-{last} changed since {path} "
                "was written: rerun with --restart to redo it all, or use a new --out"
            )
        return theirs


def _previous(where: Location | None, meta: dict[str, Any]) -> tuple[Previous | None, str | None]:
    """--previous as an index, or why it cannot give vectors (another model or settings)."""
    if where is None:
        return None, None
    manifest = where.child(MANIFEST)
    if not manifest.is_file():
        raise InvalidInput(f"--previous {where}: no {MANIFEST} (not an embed-corpus output)")
    try:
        state = json.loads(manifest.read_bytes())
    except ValueError:
        raise InvalidInput(f"{manifest}: not an embed-corpus manifest") from None
    for key in ("identity", "vectors", "dim"):
        if state.get(key) != meta[key]:
            return None, f"made with another {key} ({state.get(key)!r}): nothing copied"
    return Previous(where.list(partitions.PARTITION_GLOB)), None


def make_partition(
    options: Options,
    part: partitions.Partition,
    meta: dict[str, Any],
    embed: Callable[[partitions.Rows], Embedded],
) -> Embedded:
    """One partition, start to end, by whoever embeds it (this process or a Ray actor):
    read its rows from the input, apply --on-bad-line, embed, publish the file."""
    source = Location.of(options.input)
    rows = partitions.read_rows(source, part, options.id_field, options.text_field)
    if rows.rejects and options.on_bad_line == "fail":
        bad = rows.rejects[0]
        raise InvalidInput(
            f"{source} line {bad['line']}: {bad['reason']} "
            "(--on-bad-line fail; skip leaves such lines out)"
        )
    done = embed(rows)
    out = Location.of(options.out).child(partitions.partition_name(part.index))
    partitions.write_partition(out, done, meta)
    return done


def _name_input(exc: EmbedkitError, source: Location) -> None:
    """An error from a partition's work names the input once."""
    if not exc.message.startswith(str(source)):
        partitions.reword(exc, f"{source}: {exc.message}")


def run(
    options: Options,
    embedder: Embedder | None = None,
    *,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    dispatch: Dispatch | None = None,
) -> Report:
    """Embed ``options.input`` into ``options.out``, resuming what an earlier run left;
    the report is also written to ``DIR/report.json``. ``dispatch``: another engine makes
    the unfinished partitions (``--engine ray``); None: this process, one at a time."""
    if options.on_bad_line not in ("fail", "skip"):
        raise InvalidInput("--on-bad-line is fail or skip")
    if options.on_duplicate not in ("fail", "report"):
        raise InvalidInput("--on-duplicate is fail or report")
    if options.partition_rows < 1:
        raise InvalidInput("--partition-rows must be at least 1")
    source, out = Location.of(options.input), Location.of(options.out)
    before = None if options.previous is None else Location.of(options.previous)
    if before is not None and before == out:
        raise InvalidInput("--previous must be another output than --out")
    # One pass over the input: descriptors only (offsets, checksums, row counts).
    descriptors = list(
        partitions.scan(source, options.partition_rows, options.id_field, options.text_field)
    )
    if not descriptors:  # before the output directory exists: nothing to resume, nothing made
        raise InvalidInput(f"{source} is empty (no rows)")
    total = sum(p.rows for p in descriptors)
    started = time.monotonic()
    embedder = embedder or local_embedder(options)
    meta = run_meta(options, embedder)
    previous, report_previous = _previous(before, meta)
    output = Output(options, meta)
    output.open()
    report = Report(
        embedder.identity.header_value(), str(source), str(out), previous=report_previous
    )
    metas: dict[int, dict[str, Any]] = {}
    pending: list[partitions.Partition] = []  # checked, in input order
    rows_done = 0

    def tell() -> None:
        if progress is not None:
            rate = (report.computed + report.copied) / max(time.monotonic() - started, 1e-9)
            progress(rows_done, total, f"{rate:.0f} docs/s")

    def made(part: partitions.Partition, computed: int, copied: int) -> None:
        nonlocal rows_done
        # The file was published whole: its metadata are the record.
        metas[part.index] = done = partitions.read_meta(output.path(part.index))
        for bad in done["rejects"]:
            if warn is not None:
                warn(f"{source} line {bad['line']}: {bad['reason']}: skipped")
        report.computed += computed
        report.copied += copied
        rows_done += part.rows
        tell()

    for part in descriptors:
        finished = output.finished(part)
        if finished is None:
            pending.append(part)
        else:
            report.partitions_resumed += 1
            metas[part.index] = finished
            rows_done += part.rows
    tell()
    try:
        if dispatch is None:
            for part in pending:
                embedded = make_partition(
                    options, part, meta, lambda rows: embedder.partition(rows, previous)
                )
                made(part, embedded.computed, embedded.copied)
        elif pending:
            by_index = {p.index: p for p in pending}
            for index, computed, copied in dispatch(pending, meta, previous):
                made(by_index[index], computed, copied)
    except EmbedkitError as exc:
        _name_input(exc, source)
        raise
    missing = [p.index for p in pending if p.index not in metas]
    if missing:
        raise InvalidInput(f"the engine did not write partition(s) {missing[:5]}: rerun")
    ours = {partitions.partition_name(k) for k in metas}
    files = output.files()
    stray = [p for p in files if p.name not in ours]
    if stray:
        raise InvalidInput(
            f"{stray[0]} lies past the input's end (the input shrank since it was written): "
            "rerun with --restart to redo it all, or use a new --out"
        )
    report.partitions = len(metas)
    ordered = [metas[k] for k in sorted(metas)]
    report.input_rows = sum(m["input_rows"] for m in ordered)
    report.documents = sum(m.get("documents", m["rows"]) for m in ordered)
    report.rows = sum(m["rows"] for m in ordered)
    rejects = [r for m in ordered for r in m["rejects"]]
    report.bad_lines = len(rejects)
    output.write(REJECTS, "".join(json.dumps(r) + "\n" for r in rejects).encode())
    duplicates = find_duplicates(files)
    report.duplicates = len(duplicates)
    output.write(DUPLICATES, "".join(json.dumps(d) + "\n" for d in duplicates).encode())
    report.seconds = round(time.monotonic() - started, 3)
    count = report.computed + report.copied
    report.docs_per_s = round(count / report.seconds, 1) if count and report.seconds else None
    report.complete = not (duplicates and options.on_duplicate == "fail")
    output.write(REPORT, json.dumps(report.as_dict(), indent=1).encode())
    output.save(complete=report.complete, partitions=report.partitions)
    if not report.complete:
        first = "; ".join(
            f"{d['id']!r} at {', '.join(f'{p}[{r}]' for p, r in d['at'])}" for d in duplicates[:3]
        )
        raise InvalidInput(
            f"{len(duplicates)} id(s) occur more than once in {out}: {first} "
            f"(all in {out.child(DUPLICATES)}; --on-duplicate report keeps them)"
        )
    return report


def find_duplicates(files: list[Location]) -> list[dict[str, Any]]:
    """Ids found in more than one document of the partitions, each with every (file, row)
    (of a document's chunk rows, chunk 0's: (id, chunk) pairs repeat only if ids do).

    Two passes, so that memory is 8 bytes per row, not a map of every id: the first sorts
    64-bit keys of all ids; the second collects the rows of the ids whose key repeats
    (a key collision of two different ids is then told apart by the ids themselves)."""
    keys = [
        np.fromiter((partitions.id_key(i) for _, i in partitions.read_documents(f)), np.uint64)
        for f in files
    ]
    ordered = np.sort(np.concatenate(keys)) if keys else np.empty(0, np.uint64)
    repeated = set(np.unique(ordered[1:][ordered[1:] == ordered[:-1]]).tolist())
    if not repeated:
        return []
    where: dict[str, list[tuple[str, int]]] = {}
    for path in files:
        for row, ident in partitions.read_documents(path):
            if partitions.id_key(ident) in repeated:
                where.setdefault(ident, []).append((path.name, row))
    return [{"id": i, "at": at} for i, at in where.items() if len(at) > 1]
