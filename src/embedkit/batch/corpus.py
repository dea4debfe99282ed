"""`embedkit embed-corpus`: a corpus embedded in-process into resumable Parquet partitions.

The engine-independent core: :class:`Embedder` says who embeds (its served identity, the
settings that change vectors, a texts → vectors function), :func:`run` drives the
partitions (:mod:`embedkit.batch.partitions`) through it. ``--engine local`` is
:func:`local_embedder`, the artifact's :class:`~embedkit.runtime.engine.Engine` with the
service's post-processing (prompt, truncation, Matryoshka dimensions, normalisation:
``Engine.encode`` runs the same ``runtime.vectors`` code as ``/v1/embeddings``).

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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from embedkit.batch import partitions
from embedkit.batch.partitions import Embed, Previous
from embedkit.client.reembed import VECTOR_FIELDS, atomic_write, count_lines
from embedkit.core.errors import EmbedkitError, IdentityMismatch, InvalidInput
from embedkit.core.settings import Settings
from embedkit.serve.engine.identity import ServedIdentity

MANIFEST = "embed-corpus.json"
REPORT = "report.json"
REJECTS = "rejects.jsonl"
DUPLICATES = "duplicates.jsonl"
FORMAT_VERSION = 1

OnBadLine = Literal["fail", "skip"]
OnDuplicate = Literal["fail", "report"]
Progress = Callable[[int, int, str], None]
# (partitions to make, the run's metadata, whether --previous gives vectors) -> one
# (partition index, computed, copied) per partition written, as each finishes.
Dispatch = Callable[
    [list[partitions.Partition], dict[str, Any], bool], Iterable[tuple[int, int, int]]
]


@dataclass(frozen=True)
class Options:
    input: Path
    out: Path
    model: str | None = None  # artifact dir or tag; None: settings.model
    id_field: str = "id"
    text_field: str = "text"
    partition_rows: int = 10_000
    on_bad_line: OnBadLine = "fail"
    on_duplicate: OnDuplicate = "fail"
    previous: Path | None = None
    restart: bool = False
    normalize: bool | None = None  # None: the model's
    dimensions: int | None = None  # Matryoshka truncation
    prompt_name: str | None = None  # None: the model's default prompt, as the service
    truncate: bool = True  # False: a text over the token limit stops the run


@dataclass(frozen=True)
class Embedder:
    """Who embeds: what the output records of it, and the function that does it."""

    identity: ServedIdentity
    dim: int  # of the vectors written (after Matryoshka truncation)
    vectors: dict[str, Any]  # the settings that change vectors, as recorded
    embed: Embed
    # The graph's sha256: two local exports both read "name:local", their graphs differ.
    graph_sha256: str | None = None


def local_embedder(options: Options, settings: Settings | None = None) -> Embedder:
    """The artifact's engine in this process (``--engine local``)."""
    from embedkit.core.settings import get_settings
    from embedkit.model import toolchain
    from embedkit.model.artifact import MODEL_FILE
    from embedkit.runtime.engine import Engine
    from embedkit.runtime.vectors import check_dimensions
    from embedkit.serve.engine import identity

    settings = settings or get_settings()
    engine = Engine.load(options.model or settings.model, settings)
    dims = check_dimensions(options.dimensions, engine.dimension)
    prompt = engine.prompts.resolve(options.prompt_name)  # an unknown name fails now
    normalize = (
        engine.manifest.embedding.normalize if options.normalize is None else options.normalize
    )
    served = identity.build(
        engine.artifact,
        provider=engine.provider,
        precision=engine.precision.compute,
        isa=toolchain.detect_isa().level,
    )
    recorded = {
        "normalize": normalize,
        "dimensions": dims,
        "encoding": "float",
        "prompt": None if prompt is None else {"name": prompt.name, "text": prompt.text},
        "truncate": options.truncate,
    }

    def embed(texts: Any) -> Any:
        return engine.encode(
            texts,
            normalize=normalize,
            dimensions=dims,
            truncate=options.truncate,
            prompt_name=options.prompt_name,
        )

    files = engine.manifest.files
    graph = files.get(MODEL_FILE) or files.get(engine.artifact.model_path.name)
    return Embedder(served, dims or engine.dimension, recorded, embed, graph)


@dataclass
class Report:
    served: str
    input: str
    out: str
    partitions: int = 0
    partitions_resumed: int = 0
    input_rows: int = 0
    documents: int = 0  # rows in the output, all runs
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
        self.root = options.out
        self.meta = meta

    def path(self, index: int) -> Path:
        return self.root / partitions.partition_name(index)

    def files(self) -> list[Path]:
        return sorted(self.root.glob(partitions.PARTITION_GLOB))

    def _check(self, theirs: dict[str, Any], where: Path) -> None:
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
        manifest = self.root / MANIFEST
        if self.root.exists() and not self.root.is_dir():
            raise InvalidInput(f"{self.root} is not a directory")
        if manifest.exists():
            try:
                state = json.loads(manifest.read_text())
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
        elif self.root.exists() and any(self.root.iterdir()):
            found = self.files()
            if found:  # another tool's (or a lost manifest's) partitions: say whose
                self._check(partitions.read_meta(found[0]), found[0])
            raise InvalidInput(f"{self.root} is not empty and holds no {MANIFEST}: use a new --out")
        if self.options.restart:
            self._wipe()
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".*.tmp"):  # a killed run's half-written files
            stale.unlink()
        self.save(complete=False)

    def _wipe(self) -> None:
        """--restart: this output's own files, nothing else."""
        for path in self.files():
            path.unlink()
        for name in (MANIFEST, REPORT, REJECTS, DUPLICATES):
            (self.root / name).unlink(missing_ok=True)

    def save(self, *, complete: bool, **facts: Any) -> None:
        state = {**self.meta, "complete": complete, **facts}
        atomic_write(self.root / MANIFEST, json.dumps(state, indent=1).encode())

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


def _previous(options: Options, meta: dict[str, Any]) -> tuple[Previous | None, str | None]:
    """--previous as a lookup, or why it cannot give vectors (another model or settings)."""
    if options.previous is None:
        return None, None
    manifest = options.previous / MANIFEST
    if not manifest.is_file():
        raise InvalidInput(
            f"--previous {options.previous}: no {MANIFEST} (not an embed-corpus output)"
        )
    state = json.loads(manifest.read_text())
    for key in ("identity", "vectors", "dim"):
        if state.get(key) != meta[key]:
            return None, f"made with another {key} ({state.get(key)!r}): nothing copied"
    files = sorted(options.previous.glob(partitions.PARTITION_GLOB))
    return Previous(files), None


def _total_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        try:
            rows: int = partitions.pyarrow().parquet.ParquetFile(path).metadata.num_rows
        except Exception:  # reading the partitions names the problem
            return -1
        return rows
    return count_lines(path) if path.is_file() else 0


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
    if not options.input.is_file():
        raise InvalidInput(f"{options.input} is not a file")
    if options.previous is not None and options.previous.resolve() == options.out.resolve():
        raise InvalidInput("--previous must be another output than --out")
    total = _total_rows(options.input)
    if total == 0:  # before the output directory exists: nothing to resume, nothing made
        raise InvalidInput(f"{options.input} is empty (no rows)")
    started = time.monotonic()
    embedder = embedder or local_embedder(options)
    meta = run_meta(options, embedder)
    previous, report_previous = _previous(options, meta)
    output = Output(options, meta)
    output.open()
    report = Report(
        embedder.identity.header_value(),
        str(options.input),
        str(options.out),
        previous=report_previous,
    )
    metas: dict[int, dict[str, Any]] = {}
    pending: list[partitions.Partition] = []  # for `dispatch`, checked and in input order
    rows_done = 0

    def tell(text: str) -> None:
        if progress is not None:
            progress(rows_done, max(total, rows_done), text)

    for part in partitions.read_partitions(
        options.input, options.partition_rows, options.id_field, options.text_field
    ):
        done = output.finished(part)
        if done is None:
            if part.rejects and options.on_bad_line == "fail":
                bad = part.rejects[0]
                raise InvalidInput(
                    f"{options.input} line {bad['line']}: {bad['reason']} "
                    "(--on-bad-line fail; skip leaves such lines out)"
                )
            for bad in part.rejects:
                if warn is not None:
                    warn(f"{options.input} line {bad['line']}: {bad['reason']}: skipped")
            if dispatch is not None:
                pending.append(part)
                continue
            try:
                embedded = partitions.embed_partition(part, embedder.embed, embedder.dim, previous)
            except EmbedkitError as exc:
                partitions.reword(exc, f"{options.input}: {exc.message}")
                raise
            partitions.write_partition(output.path(part.index), embedded, meta)
            done = partitions.read_meta(output.path(part.index))
            report.computed += embedded.computed
            report.copied += embedded.copied
        else:
            report.partitions_resumed += 1
        metas[part.index] = done
        rows_done += part.rows
        rate = (report.computed + report.copied) / max(time.monotonic() - started, 1e-9)
        tell(f"{rate:.0f} docs/s")
    if pending and dispatch is not None:
        sizes = {p.index: p.rows for p in pending}
        try:
            for index, computed, copied in dispatch(pending, meta, previous is not None):
                # The worker published the file by rename: its metadata are the record.
                metas[index] = partitions.read_meta(output.path(index))
                report.computed += computed
                report.copied += copied
                rows_done += sizes[index]
                rate = (report.computed + report.copied) / max(time.monotonic() - started, 1e-9)
                tell(f"{rate:.0f} docs/s")
        except EmbedkitError as exc:
            partitions.reword(exc, f"{options.input}: {exc.message}")
            raise
        missing = sorted(sizes.keys() - metas.keys())
        if missing:
            raise InvalidInput(f"the engine did not write partition(s) {missing[:5]}: rerun")
    if not metas:
        raise InvalidInput(f"{options.input} is empty (no rows)")
    ours = {partitions.partition_name(k) for k in metas}
    stray = [p for p in output.files() if p.name not in ours]
    if stray:
        raise InvalidInput(
            f"{stray[0]} lies past the input's end (the input shrank since it was written): "
            "rerun with --restart to redo it all, or use a new --out"
        )
    report.partitions = len(metas)
    ordered = [metas[k] for k in sorted(metas)]
    report.input_rows = sum(m["input_rows"] for m in ordered)
    report.documents = sum(m["rows"] for m in ordered)
    rejects = [r for m in ordered for r in m["rejects"]]
    report.bad_lines = len(rejects)
    atomic_write(options.out / REJECTS, "".join(json.dumps(r) + "\n" for r in rejects).encode())
    duplicates = find_duplicates(output.files())
    report.duplicates = len(duplicates)
    atomic_write(
        options.out / DUPLICATES, "".join(json.dumps(d) + "\n" for d in duplicates).encode()
    )
    report.seconds = round(time.monotonic() - started, 3)
    made = report.computed + report.copied
    report.docs_per_s = round(made / report.seconds, 1) if made and report.seconds else None
    report.complete = not (duplicates and options.on_duplicate == "fail")
    atomic_write(options.out / REPORT, json.dumps(report.as_dict(), indent=1).encode())
    output.save(complete=report.complete, partitions=report.partitions)
    if not report.complete:
        first = "; ".join(
            f"{d['id']!r} at {', '.join(f'{p}[{r}]' for p, r in d['at'])}" for d in duplicates[:3]
        )
        raise InvalidInput(
            f"{len(duplicates)} id(s) occur more than once in {options.out}: {first} "
            f"(all in {options.out / DUPLICATES}; --on-duplicate report keeps them)"
        )
    return report


def find_duplicates(files: list[Path]) -> list[dict[str, Any]]:
    """Ids found in more than one row of the partitions, each with every (file, row)."""
    where: dict[str, list[tuple[str, int]]] = {}
    for path in files:
        for row, ident in enumerate(partitions.read_ids(path)):
            where.setdefault(ident, []).append((path.name, row))
    return [{"id": i, "at": at} for i, at in where.items() if len(at) > 1]
