"""Jobs a Kubernetes Job runs from the image: reembed, embed-corpus."""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from embedkit.cli.common import (
    app,
    err,
    one_line_errors,
    progress_bar,
)


class VectorFormat(StrEnum):
    npy = "npy"
    jsonl = "jsonl"


class BadLine(StrEnum):
    skip = "skip"
    stop = "stop"


def _warn(line: str) -> None:
    """A job's warning (a skipped line, say): one line on stderr, the report on stdout."""
    err.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)


@app.command("reembed")
@one_line_errors
def reembed_cmd(
    input: Annotated[Path, typer.Argument(help="JSONL corpus, one document a line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (resumable).")],
    url: Annotated[str, typer.Option(help="The embedkit service.")] = "http://127.0.0.1:3000",
    id_field: Annotated[str, typer.Option(help="The documents' id field.")] = "id",
    text_field: Annotated[str, typer.Option(help="The documents' text field.")] = "text",
    chunk_size: Annotated[
        int, typer.Option(help="Lines per request and per checkpoint.", min=1)
    ] = 64,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.", min=1)] = 2,
    format: Annotated[
        VectorFormat, typer.Option(help="npy: float32 shards; jsonl: {id, embedding} lines.")
    ] = VectorFormat.npy,
    on_bad_line: Annotated[
        BadLine, typer.Option(help="skip: to rejects.jsonl, named on stderr; stop: exit 1.")
    ] = BadLine.skip,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="EMBEDKIT_REEMBED_API_KEY", help="Bearer token to send."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 120.0,
    max_wait: Annotated[
        float, typer.Option(help="Seconds of 429/503 retries per chunk before giving up.")
    ] = 600.0,
    model: Annotated[
        str | None,
        typer.Option(help="Which served model (GET /v1/models ids); default: the first."),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Embed only shard I of N (chunks k with k mod N = I), 0 <= I < N, beside "
            "the other shards in one --out. Default: JOB_COMPLETION_INDEX/--shards."
        ),
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(
            help="N, the number of shards (an Indexed Job's completions); the index comes "
            "from JOB_COMPLETION_INDEX.",
            min=1,
        ),
    ] = None,
) -> None:
    """Embed a JSONL corpus through a running service's bulk route, resumably.

    Vectors are written in checkpointed chunks with the served identity of the model
    that made them; rerun the same command after a crash to resume (docs/reembed.md).
    Prints a JSON summary on stdout.
    """
    from embedkit.client import reembed

    options = reembed.Options(
        url=url,
        input=input,
        out=out,
        id_field=id_field,
        text_field=text_field,
        chunk_size=chunk_size,
        concurrency=concurrency,
        format=format.value,
        on_bad_line=on_bad_line.value,
        api_key=api_key,
        timeout_s=timeout,
        max_wait_s=max_wait,
        model=model,
        shard=reembed.resolve_shard(shard, shards, os.environ),
    )

    with progress_bar("reembed") as update:
        summary = reembed.run(options, progress=update, warn=_warn)
    result = {
        "served": summary.identity.header_value(),
        "documents": summary.documents,
        "embedded": summary.embedded,
        "rejected": summary.rejected,
        "chunks_resumed": summary.chunks_resumed,
        "retries": summary.retries,
        "seconds": round(summary.seconds, 2),
        "docs_per_s": round(summary.embedded / summary.seconds, 1) if summary.seconds else None,
        "out": str(out),
    }
    if options.shard is not None:
        result["shard"] = str(options.shard)
        result["shards_complete"] = summary.shards_complete
    print(json.dumps(result), flush=True)


class OnBadLine(StrEnum):
    fail = "fail"
    skip = "skip"


class OnDuplicate(StrEnum):
    fail = "fail"
    report = "report"


class BatchEngine(StrEnum):
    local = "local"
    ray = "ray"


class Encoding(StrEnum):  # the service's encoding_format (base64: refused, with why)
    float = "float"
    base64 = "base64"
    int8 = "int8"
    uint8 = "uint8"
    binary = "binary"
    ubinary = "ubinary"


class ChunkAggregate(StrEnum):
    mean = "mean"
    none = "none"


@app.command("embed-corpus")
@one_line_errors
def embed_corpus_cmd(
    # str, not Path: a Path would fold "s3://bucket/key" into "s3:/bucket/key".
    input: Annotated[
        str, typer.Argument(help="JSONL (one document a line) or Parquet; a path or a URI.")
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="Output directory, a path or a URI (resumable).")
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", "--artifact", "-m", help="Artifact dir or model tag."),
    ] = None,
    id_field: Annotated[str, typer.Option(help="The documents' id field.")] = "id",
    text_field: Annotated[str, typer.Option(help="The documents' text field.")] = "text",
    partition_rows: Annotated[
        int, typer.Option(help="Input rows per partition (fixed for an output).", min=1)
    ] = 10_000,
    on_bad_line: Annotated[
        OnBadLine, typer.Option(help="fail: exit 1 naming it; skip: to rejects.jsonl.")
    ] = OnBadLine.fail,
    on_duplicate: Annotated[
        OnDuplicate, typer.Option(help="fail: exit 1 naming them; report: duplicates.jsonl.")
    ] = OnDuplicate.fail,
    previous: Annotated[
        str | None,
        typer.Option(
            help="An earlier output (path or URI): rows with the same id and text are copied."
        ),
    ] = None,
    restart: Annotated[
        bool, typer.Option(help="Delete this output's partitions and start again.")
    ] = False,
    engine: Annotated[
        BatchEngine,
        typer.Option(help="ray: a pool of Ray Data actors; local: this process, no Ray."),
    ] = BatchEngine.ray,
    normalize: Annotated[
        bool | None, typer.Option("--normalize/--no-normalize", help="Default: the model's.")
    ] = None,
    dimensions: Annotated[int | None, typer.Option(help="Matryoshka truncation.")] = None,
    prompt_name: Annotated[
        str | None, typer.Option(help="One of the model's prompts (default: its default).")
    ] = None,
    truncate: Annotated[bool, typer.Option(help="Truncate texts over the token limit.")] = True,
    encoding: Annotated[
        Encoding,
        typer.Option(
            help="float32 vectors, or the service's codes: int8/uint8 (the model's calibrated "
            "ranges), binary/ubinary (sign bits, 8 a byte)."
        ),
    ] = Encoding.float,
    chunk_tokens: Annotated[
        int | None,
        typer.Option(
            help="Chunk long texts into windows of N tokens (special tokens included) instead "
            "of truncating; any --chunk-* turns chunking on (default N: the model's limit)."
        ),
    ] = None,
    chunk_overlap: Annotated[
        int | None, typer.Option(help="Tokens shared by consecutive chunks (default 0).")
    ] = None,
    chunk_aggregate: Annotated[
        ChunkAggregate | None,
        typer.Option(
            help="mean: one row per document, its chunks' token-weighted mean (default); "
            "none: one row per chunk (columns id, chunk)."
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="--engine ray: join this cluster (default: start a local one)."),
    ] = None,
    actors: Annotated[int, typer.Option(help="--engine ray: actors, one model each.", min=1)] = 1,
    threads_per_actor: Annotated[
        int | None,
        typer.Option(
            help="--engine ray: CPUs (ORT threads) per actor (default: a local Ray shares "
            "EMBEDKIT_INTRA_OP_THREADS among the actors; a cluster: that setting).",
            min=1,
        ),
    ] = None,
) -> None:
    """Embed a corpus into Parquet partitions with Ray Data actors or in-process, resumably
    (docs/embed-corpus.md).

    Prints the report (also written to OUT/report.json) as JSON on stdout.
    """
    from embedkit.batch import corpus
    from embedkit.runtime.chunking import Chunking

    chunking = None
    if (chunk_tokens, chunk_overlap, chunk_aggregate) != (None, None, None):
        chunking = Chunking(
            max_tokens=chunk_tokens,
            overlap=chunk_overlap or 0,
            aggregate=(chunk_aggregate or ChunkAggregate.mean).value,
        )
    options = corpus.Options(
        input=input,
        out=out,
        model=model,
        id_field=id_field,
        text_field=text_field,
        partition_rows=partition_rows,
        on_bad_line=on_bad_line.value,
        on_duplicate=on_duplicate.value,
        previous=previous,
        restart=restart,
        normalize=normalize,
        dimensions=dimensions,
        prompt_name=prompt_name,
        truncate=truncate,
        encoding=encoding.value,
        chunking=chunking,
    )

    dispatch = None
    if engine is BatchEngine.ray:
        from embedkit.batch import ray_engine
        from embedkit.core.settings import get_settings

        settings = get_settings()
        threads = threads_per_actor or settings.intra_op_threads
        if threads_per_actor is None and ray_address is None:
            # A local Ray on this machine: its cores shared by the actors, not each given all.
            threads = max(1, settings.intra_op_threads // actors)
        dispatch = ray_engine.dispatcher(
            ray_engine.RayOptions(ray_address, actors, threads), options, settings
        )
    with progress_bar("embed-corpus") as update:
        report = corpus.run(options, progress=update, warn=_warn, dispatch=dispatch)
    print(json.dumps(report.as_dict()), flush=True)
