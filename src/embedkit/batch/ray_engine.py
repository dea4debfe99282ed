"""`embed-corpus --engine ray`: the unfinished partitions made by a pool of Ray Data actors.

The driver (:func:`embedkit.batch.corpus.run`) scans the input into partition descriptors
(offsets and checksums, no text), skips the finished partitions, and hands the rest to
:func:`dispatcher`'s function: they become a Ray dataset of one small row per descriptor,
``map_batches(PartitionWorker, batch_size=1)`` over ``actors`` actors of ``threads`` CPUs.
Each actor loads the verified artifact once (``Engine.load`` through
:func:`~embedkit.batch.corpus.local_embedder`), refuses to work if its identity or settings
differ from the driver's (another artifact on that node), and per partition calls
:func:`~embedkit.batch.corpus.make_partition`: it reads the partition's rows from the input
itself (a shared filesystem or an object store), embeds them and publishes the file
atomically, returning a small status row. The driver then runs the same final pass as
``--engine local``. ``--previous``'s index is built once by the driver and put in Ray's
object store, which the actors of a node share.

Exactly once: a partition file exists only once complete, so an actor killed mid-partition
leaves nothing; Ray restarts it and retries the partition (``max_restarts`` /
``max_task_retries``), and a second write of the same partition replaces the file with the
same rows. The input, ``--out`` and ``--previous`` must be locations every actor reaches
alike: a shared filesystem, or an object store URI (``s3://...``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedkit.batch import corpus, partitions
from embedkit.core.errors import EmbedkitError, IdentityMismatch, InvalidInput, MissingExtra
from embedkit.core.settings import Settings

# Bounded, unlike Ray Data's default (-1: forever): a partition that kills its actor every
# time (a text that crashes the runtime) must end the run, not loop.
RETRIES = 3


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # join this cluster; None: start a local one
    actors: int = 1
    threads: int = 1  # per actor: its intra_op_threads and its Ray num_cpus
    num_cpus: int | None = None  # of a local cluster; None: actors * threads


def ray() -> Any:
    try:
        import ray as ray_module
        import ray.data  # a submodule: import it
    except ModuleNotFoundError:
        raise MissingExtra("--engine ray needs Ray Data: pip install 'embedkit[batch]'") from None
    return ray_module


def _row(part: partitions.Partition) -> dict[str, Any]:
    return dataclasses.asdict(part)  # a descriptor: offsets and a checksum, no text


def _partition(row: dict[str, Any]) -> partitions.Partition:
    return partitions.Partition(
        index=int(row["index"]),
        first_row=int(row["first_row"]),
        rows=int(row["rows"]),
        start=int(row["start"]),
        end=int(row["end"]),
        checksum=str(row["checksum"]),
    )


class PartitionWorker:
    """One actor: the artifact loaded once, one partition per call."""

    def __init__(
        self,
        options: corpus.Options,
        settings: Settings,
        meta: dict[str, Any],
        previous: Any,  # the driver's partitions.Previous, or a Ray ObjectRef of it, or None
    ) -> None:
        self.options = options
        self.embedder = corpus.local_embedder(options, settings)
        mine = corpus.run_meta(options, self.embedder)
        if mine != meta:
            raise IdentityMismatch(
                f"the actor on {os.uname().nodename} loaded another artifact or settings "
                f"({mine['identity']} {mine['vectors']}) than the driver "
                f"({meta['identity']} {meta['vectors']})"
            )
        self.meta = meta
        if isinstance(previous, ray().ObjectRef):  # shared by the node's actors, zero-copy
            previous = ray().get(previous)
        self.previous: partitions.Previous | None = previous

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        done: list[tuple[int, int, int]] = []
        for row in batch.to_pylist():  # batch_size=1: one partition, but any size works
            part = _partition(row)
            # The actor reads the partition's rows from the input itself.
            embedded = corpus.make_partition(self.options, part, self.meta, self.embed)
            done.append((part.index, embedded.computed, embedded.copied))
        return {
            "index": np.array([d[0] for d in done], dtype=np.int64),
            "computed": np.array([d[1] for d in done], dtype=np.int64),
            "copied": np.array([d[2] for d in done], dtype=np.int64),
        }

    def embed(self, rows: partitions.Rows) -> partitions.Embedded:
        return self.embedder.partition(rows, self.previous)


def _cause(exc: BaseException) -> EmbedkitError | None:
    """Our own error inside Ray's wrappers (RayTaskError, UserCodeException), if any."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        # RayTaskError(InvalidInput) is both, without our message: take its `cause`.
        if isinstance(e, EmbedkitError) and not type(e).__module__.startswith("ray"):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def dispatcher(
    ray_options: RayOptions,
    options: corpus.Options,
    settings: Settings,
    worker: type[PartitionWorker] = PartitionWorker,
) -> corpus.Dispatch:
    """The function :func:`corpus.run` hands the unfinished partitions to."""
    if ray_options.actors < 1 or ray_options.threads < 1:
        raise InvalidInput("--actors and --threads-per-actor must be at least 1")
    ray_module = ray()
    # The actors' engines use exactly the CPUs Ray reserved for them (no oversubscription).
    actor_settings = settings.model_copy(update={"intra_op_threads": ray_options.threads})

    def dispatch(
        pending: list[partitions.Partition],
        meta: dict[str, Any],
        previous: partitions.Previous | None,
    ) -> Iterator[tuple[int, int, int]]:
        started_here = not ray_module.is_initialized()
        if started_here:
            if ray_options.address is not None:
                ray_module.init(address=ray_options.address, log_to_driver=False)
            else:
                ray_module.init(
                    num_cpus=ray_options.num_cpus or ray_options.actors * ray_options.threads,
                    include_dashboard=False,
                    log_to_driver=False,
                )
        context = ray_module.data.DataContext.get_current()
        # The actor's own exception (its one-line message), not Ray Data's UserCodeException.
        context.raise_original_map_exception = True
        context.enable_progress_bars = False  # the CLI draws its own

        try:
            # Put once: every actor on a node maps the same arrays (no copy per actor).
            shared = None if previous is None else ray_module.put(previous)
            dataset = ray_module.data.from_items([_row(p) for p in pending]).map_batches(
                worker,
                fn_constructor_args=(options, actor_settings, meta, shared),
                batch_size=1,
                batch_format="pyarrow",
                compute=ray_module.data.ActorPoolStrategy(size=ray_options.actors),
                num_cpus=ray_options.threads,
                max_restarts=RETRIES,
                max_task_retries=RETRIES,
            )
            for status in dataset.iter_rows():
                yield int(status["index"]), int(status["computed"]), int(status["copied"])
        except Exception as exc:
            ours = _cause(exc)
            if ours is None:
                raise
            raise ours from None
        finally:
            if started_here:
                ray_module.shutdown()

    return dispatch
