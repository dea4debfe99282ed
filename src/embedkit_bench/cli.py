"""Measurement commands (tooling, not shipped in the Bento or image): benchmarks,
profiles, soak, peers, chunked retrieval."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from embedkit.cli.common import (
    ArtifactOpt,
    EnvOpt,
    app,
    env_pairs,
    err,
    invocation,
    named_targets,
    one_line_errors,
    out,
    parse_ints,
    progress,
    progress_bar,
)
from embedkit.core.errors import EmbedkitError


@app.command("chunk-retrieval")
@one_line_errors
def chunk_retrieval_cmd(
    artifact: Annotated[
        str | None,
        typer.Argument(help="Artifact dir or tag (default: artifacts/bench-fp32)."),
    ] = None,
    window: Annotated[
        list[str] | None,
        typer.Option(help="MAX_TOKENS:OVERLAP of a chunked index (repeatable).", metavar="N:M"),
    ] = None,
    max_docs: Annotated[
        int | None, typer.Option(help="Bound the corpus (judged documents always kept).", min=1)
    ] = None,
    max_queries: Annotated[int | None, typer.Option(help="Bound the queries.", min=1)] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """SciFact retrieval with long documents chunked (mean) vs truncated; prints markdown."""
    import datetime
    import subprocess

    from embedkit.quality.retrieval import load_beir
    from embedkit.release.measure import default_artifact
    from embedkit.runtime.engine import Engine
    from embedkit_bench import chunked_retrieval
    from embedkit_bench.roofline import machine

    windows = [chunked_retrieval.parse_window(w) for w in window or []]
    commit = subprocess.run(  # the code that runs, even if HEAD moves meanwhile
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with progress("chunk-retrieval") as step:
        data = load_beir(max_docs=max_docs, max_queries=max_queries)
        engine = Engine.load(default_artifact(artifact))
        report = chunked_retrieval.run(
            engine, data, windows or chunked_retrieval.DEFAULT_WINDOWS, step=step
        )
    if json_out:
        json_out.write_text(report.model_dump_json(indent=2))
    host = machine()
    out.print(
        f"`{invocation()}` — started {started}, commit {commit or '?'}, {host['cpu']} "
        f"({host['cores']} cores, {host['isa']['level']}); model {engine.manifest.name} "
        f"({engine.artifact.tag or engine.artifact.path.name})\n\n"
        f"{report.dataset}: {report.documents:,} documents ({report.long_documents:,} over "
        f"{report.max_length} tokens), {report.queries} queries\n\n"
        + chunked_retrieval.markdown_table(report),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@one_line_errors
def bench(
    artifact: Annotated[
        str | None,
        typer.Argument(help="Model tag or artifact directory (default: the served model)."),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where bench.{json,md} and PNGs go.")
    ] = Path("bench-report"),
    variant: Annotated[
        list[str] | None,
        typer.Option(help="Also run the engine on this variant: NAME=TAG_OR_DIR (repeatable)."),
    ] = None,
    registered: Annotated[
        bool, typer.Option(help="Add every registered variant of the model from the BentoML store.")
    ] = True,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32,128",
    max_texts: Annotated[
        int, typer.Option(help="STS sentences in the short corpus.", min=8)
    ] = 1024,
    long_texts: Annotated[
        int, typer.Option(help="Texts in the long corpus (0: skip).", min=0)
    ] = 128,
    torch: Annotated[bool, typer.Option(help="Include PyTorch (needs the export extra).")] = True,
    http: Annotated[
        bool, typer.Option(help="Also start a server and sweep HTTP concurrency.")
    ] = False,
    url: Annotated[str | None, typer.Option(help="Sweep this running server instead.")] = None,
    http_seconds: Annotated[float, typer.Option(help="Seconds per HTTP phase.", min=1)] = 10.0,
    concurrency: Annotated[str, typer.Option(help="HTTP concurrencies.")] = "1,4,16,64",
) -> None:
    """PyTorch, naive ORT and the engine (+ variants) side by side; JSON, markdown and plots."""
    from embedkit.core.settings import get_settings
    from embedkit.model.artifact import resolve
    from embedkit.release.measure import registered_variants
    from embedkit_bench.report import bench_and_report

    art = resolve(artifact or get_settings().model)
    variants = named_targets(variant, "--variant")
    if registered:
        for name, tag in registered_variants(art.manifest.name, exclude_tag=art.tag).items():
            variants.setdefault(name, tag)
    command = "embedkit bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else ""
    with progress_bar("bench") as update:
        paths = bench_and_report(
            art.tag or art.path,
            out_dir,
            variants=dict(variants),
            http=http,
            url=url,
            http_seconds=http_seconds,
            concurrencies=tuple(parse_ints(concurrency, "--concurrency")),
            batch_sizes=parse_ints(batch_sizes, "--batch-sizes"),
            max_texts=max_texts,
            long_texts=long_texts,
            include_torch=torch,
            command=command.strip(),
            on_progress=update,
        )
    for kind, path in paths.items():
        out.print(f"{kind}: {path}", highlight=False)


@app.command("profile")
@one_line_errors
def profile_cmd(
    targets: Annotated[
        list[str] | None,
        typer.Argument(help="NAME=TAG_OR_DIR or TAG_OR_DIR (default: the served model)."),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Traces, profile.json and profile.md.")
    ] = Path("profile-report"),
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,32",
    batches: Annotated[int, typer.Option(help="Batches profiled per batch size.", min=1)] = 8,
    top: Annotated[int, typer.Option(help="Operators kept per profile.", min=1)] = 10,
) -> None:
    """ORT profiling: top operators by share of kernel time, per variant and batch size."""
    from embedkit.core.settings import get_settings
    from embedkit.release.profile import markdown, profile

    named = named_targets(targets, "TARGET") or {"default": get_settings().model}
    sizes = parse_ints(batch_sizes, "--batch-sizes")
    with progress_bar("profile") as update:
        total = len(named) * len(sizes)
        steps = iter(range(1, total + 1))
        report = profile(
            named,
            out_dir,
            batch_sizes=sizes,
            max_batches=batches,
            top=top,
            on_step=lambda what: update(next(steps), total, what),
        )
    out.print(markdown(report), markup=False, highlight=False, soft_wrap=True)
    out.print(f"report: {out_dir}/profile.md (raw traces beside it)", highlight=False)


@app.command("bench-engine")
@one_line_errors
def bench_engine_cmd(
    artifact: Annotated[
        str | None,
        typer.Argument(
            envvar="EMBEDKIT_BENCH_ARTIFACT",
            show_envvar=True,
            help="Artifact dir or tag (default: artifacts/bench-fp32, exported on first use).",
        ),
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,32",
    max_texts: Annotated[int, typer.Option(help="Texts per batch size.", min=1)] = 1024,
    seed: Annotated[int, typer.Option(help="Shuffle seed of the STS stream.")] = 0,
    torch: Annotated[bool, typer.Option(help="Include the PyTorch baseline.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """PyTorch vs naive ORT vs the engine in-process, on shuffled STS sentences.

    Systems run interleaved, batch by batch; session and batching settings
    come from EMBEDKIT_* variables like everywhere else.
    """
    from embedkit.release.measure import default_artifact, run_inprocess_bench

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = run_inprocess_bench(
            default_artifact(artifact),
            parse_ints(batch_sizes, "--batch-sizes"),
            max_texts,
            seed=seed,
            include_torch=torch,
        )
    except EmbedkitError as exc:  # exit 2, as scripts/bench-engine always has
        err.print(f"error: {exc.message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


@app.command("bench-http")
@one_line_errors
def bench_http_cmd(
    url: Annotated[
        str | None, typer.Option(help="Benchmark a running server instead of starting one.")
    ] = None,
    artifact: ArtifactOpt = None,
    seconds: Annotated[float, typer.Option(help="Seconds per phase.")] = 20.0,
    concurrency: Annotated[int, typer.Option(help="Clients of the single-text phases.")] = 16,
    bulk_concurrency: Annotated[int, typer.Option(help="Clients of the 32-text phase.")] = 4,
    api_key: Annotated[str | None, typer.Option(help="Bearer token to send.")] = None,
    env: EnvOpt = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results here.")
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the started server's BENTOML_HOME and log.")
    ] = False,
) -> None:
    """HTTP routes (closed loop) beside the in-process engine on the same texts.

    Single texts to /embed/query and /v1/embeddings at --concurrency, 32-text
    requests to /embed at --bulk-concurrency, then the engine in-process; prints
    HTTP bulk texts/s over in-process. Speed is noisy on shared machines:
    compare ratios, and rerun.
    """
    from embedkit.release.measure import default_artifact
    from embedkit_bench.http import http_vs_engine

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    extra = env_pairs(env, "--env")
    results = http_vs_engine(
        default_artifact(artifact),
        url=url,
        env_extra=extra,
        seconds=seconds,
        concurrency=concurrency,
        bulk_concurrency=bulk_concurrency,
        api_key=api_key,
        keep=keep,
        echo=lambda line: print(line, flush=True),
    )
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")


@app.command("bench-rerank")
@one_line_errors
def bench_rerank_cmd(
    artifact: Annotated[str, typer.Option(help="The reranker's artifact dir or tag.")],
    url: Annotated[
        str | None, typer.Option(help="Benchmark a running server instead of starting one.")
    ] = None,
    documents: Annotated[int, typer.Option(help="Documents a request.")] = 100,
    seconds: Annotated[float, typer.Option(help="Seconds per phase.")] = 15.0,
    concurrency: Annotated[int, typer.Option(help="Clients of the second HTTP phase.")] = 4,
    model: Annotated[
        str | None, typer.Option(help="The request's model (a server with several).")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="Bearer token to send.")] = None,
    env: EnvOpt = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results here.")
    ] = None,
) -> None:
    """/rerank of --documents documents (closed loop, concurrency 1 and --concurrency)
    beside the in-process Reranker on the same pairs: p50/p95 latency, pairs/s and the
    ratio. Speed is noisy on shared machines: compare ratios, and rerun."""
    from embedkit_bench.rerank_http import http_vs_reranker

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = http_vs_reranker(
        artifact,
        url=url,
        documents=documents,
        seconds=seconds,
        concurrency=concurrency,
        model=model,
        env_extra=env_pairs(env, "--env"),
        api_key=api_key,
        echo=lambda text: print(text, flush=True),
    )
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")


@app.command("bench-stages")
@one_line_errors
def bench_stages_cmd(
    artifact: ArtifactOpt = None,
    arm: Annotated[
        list[str] | None,
        typer.Option(
            metavar="LABEL[:KEY=VALUE,...]",
            help="A server configuration to profile (repeatable; default: the two topologies).",
        ),
    ] = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated client counts.")] = "1,16",
    seconds: Annotated[float, typer.Option(help="Seconds per phase.", min=2)] = 10.0,
    rate: Annotated[int, typer.Option(help="py-spy samples per second.", min=10)] = 200,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """Where a served single-text request's CPU goes: core-ms per request, per process and
    stage (py-spy over the server's process tree), beside the in-process engine."""
    from rich.table import Table

    from embedkit.release.measure import default_artifact
    from embedkit_bench.stages import stages_by_arm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    arms: dict[str, dict[str, str]] = {}
    for spec in arm or ["split:EMBEDKIT_TOPOLOGY=split", "single:EMBEDKIT_TOPOLOGY=single"]:
        label, _, pairs = spec.partition(":")
        arms[label] = env_pairs([p for p in pairs.split(",") if p], "--arm")
    clients = parse_ints(concurrency, "--concurrency")
    result = stages_by_arm(
        default_artifact(artifact),
        arms,
        concurrencies=clients,
        seconds=seconds,
        rate=rate,
        echo=lambda line: print(line, flush=True),
    )
    table = Table(title="core-ms per request (single text, /v1/embeddings)")
    for name in ("process", "stage", *result["labels"]):
        table.add_column(name)
    for row in result["table"]:
        table.add_row(*row)
    out.print(table)
    result["command"] = invocation()
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


@app.command("bench-encodings")
@one_line_errors
def bench_encodings_cmd(
    artifact: ArtifactOpt = None,
    max_docs: Annotated[int | None, typer.Option(help="Bound the corpus (quick run).")] = None,
    max_queries: Annotated[int | None, typer.Option(help="Bound the queries (quick run).")] = None,
    rescore_multiplier: Annotated[
        int, typer.Option(help="Rescoring keeps this many × 100 first-stage candidates.", min=1)
    ] = 4,
    calibration_texts: Annotated[
        int | None,
        typer.Option(help="Calibration sentences when the manifest has no ranges (all: None)."),
    ] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Write the tables here (docs/encodings.md).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """Bytes per vector and SciFact-train retrieval (nDCG@10, recall@100) for each output
    encoding (float32, int8, uint8, binary, ubinary), with and without rescoring."""
    from embedkit.model.artifact import resolve
    from embedkit.release.measure import default_artifact
    from embedkit_bench import encodings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with progress("bench-encodings") as say:
        result = encodings.run(
            resolve(default_artifact(artifact)),
            max_docs=max_docs,
            max_queries=max_queries,
            rescore_multiplier=rescore_multiplier,
            calibration_texts=calibration_texts,
            say=say,
        )
    text = encodings.markdown(result, invocation())
    out.print(text, markup=False, highlight=False, soft_wrap=True)
    if markdown_out:
        markdown_out.write_text(text)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


@app.command("bench-peers")
@one_line_errors
def bench_peers_cmd(
    rounds: Annotated[int, typer.Option(help="Rounds over every workload.", min=1)] = 2,
    seconds: Annotated[int, typer.Option(help="Measured seconds per phase.", min=1)] = 10,
    workloads: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset of single-c1, single-c16, single-c64, batch32-c4, "
            "long64-c1 (default: all)."
        ),
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="A running embedkit server instead of starting one.")
    ] = None,
    artifact: ArtifactOpt = None,
    baseline_artifact: Annotated[
        str | None,
        typer.Option(
            help="A second artifact dir or tag of the same model (e.g. the fp32 parent of "
            "--artifact): served by a second embedkit server, same settings, measured in the "
            "same rounds (the order rotates), with its own parity check and in-process "
            "reference; adds a table of embedkit ÷ baseline, baseline ÷ Infinity and "
            "embedkit ÷ Infinity."
        ),
    ] = None,
    env: EnvOpt = None,
    min_cosine: Annotated[
        float, typer.Option(help="Fail when the servers' vectors agree less than this.")
    ] = 0.999,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where peers.json and peers.md go.")
    ] = Path("docs/benchmarks"),
    note: Annotated[
        str, typer.Option(help="A line placed at the top of peers.md (e.g. 'shakedown run').")
    ] = "",
) -> None:
    """embedkit and Infinity side by side in one run, alternating, with wrk.

    Builds Infinity in its own venv (build/peers/infinity, once; ~2 min), exports the
    same model for it, starts both servers, checks their vectors agree, runs every
    workload against each in turn and, each round, the engine in-process on the same texts.
    Prints the table and writes OUT/peers.json and OUT/peers.md. With --baseline-artifact,
    a second embedkit server takes its turn too, and a second table compares the two.
    """
    from rich.table import Table

    from embedkit_bench import peers

    chosen = peers.parse_workloads(workloads)  # bad names fail before anything is built
    extra = env_pairs(env, "--env")
    say = lambda line: err.print(f"  · {line}", markup=False, highlight=False)  # noqa: E731
    with progress_bar("bench-peers") as update:
        report = peers.run_peers(
            artifact,
            workloads=chosen,
            rounds=rounds,
            seconds=seconds,
            url=url,
            env_extra=extra,
            min_cosine=min_cosine,
            baseline=baseline_artifact,
            say=say,
            on_phase=update,
        )

    def show(title: str, columns: Sequence[str], rows: list[list[str]]) -> None:
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        # Nine columns: a pipe or a narrow terminal would squeeze them into unreadable stubs.
        (out if out.width >= 170 else Console(width=170)).print(table)

    summary = report["summary"]
    title = f"embedkit vs Infinity ({report['machine']['cpu']}, {report['date']})"
    show(title, peers.TABLE_COLUMNS, peers.table_rows(summary))
    out.print("last three columns: embedkit / Infinity", highlight=False)
    if baseline_artifact:
        show("embedkit beside the baseline", peers.BASELINE_COLUMNS, peers.baseline_rows(summary))
    for key, who in (("parity", ""), ("parity_baseline", " (baseline)")):
        if p := report.get(key):
            out.print(
                f"parity{who}: min cosine {p['min_cosine']:.6f} over {p['texts']} texts",
                highlight=False,
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "peers.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "peers.md").write_text(peers.markdown(report, command=invocation(), note=note))
    out.print(f"report: {out_dir}/peers.md, {out_dir}/peers.json", highlight=False)


@app.command("soak")
@one_line_errors
def soak_cmd(
    seconds: Annotated[float, typer.Option(help="Length of the soak.")] = 60.0,
    warmup_seconds: Annotated[float, typer.Option(help="Warm-up before it.")] = 20.0,
    concurrency: Annotated[int, typer.Option(help="Closed-loop clients.")] = 4,
    max_requests: Annotated[int | None, typer.Option(help="Stop after this many.")] = None,
    short: Annotated[int, typer.Option(help="Distinct short texts in the pool.")] = 1500,
    long: Annotated[int, typer.Option(help="Distinct long (truncated) texts.")] = 60,
    url: Annotated[
        str | None, typer.Option(help="An already running server (loopback); else start one.")
    ] = None,
    pid: Annotated[int | None, typer.Option(help="PID of that server (for its RSS).")] = None,
    artifact: ArtifactOpt = None,
    env: EnvOpt = None,
    model: Annotated[str, typer.Option(help="Served model name.")] = "all-minilm-l6-v2",
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Write OUT.json and OUT.md.")
    ] = None,
) -> None:
    """A sustained mixed workload, every vector checked, server memory watched.

    Loopback only and bounded (--seconds, --max-requests). Exits 1 on a wrong
    vector, a status other than 200/429/503 or server memory that does not level
    off: RSS growth of 5 % or more after the soak's first quarter (docs/soak.md).
    """
    import signal

    from embedkit_bench import loadtest
    from embedkit_bench.soak import SoakPlan, passed, run_soak

    def interrupted(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through run_soak: its server never outlives us

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = SoakPlan(seconds, warmup_seconds, concurrency, max_requests, short, long, model)
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        report = run_soak(
            artifact,
            plan,
            url=url,
            pid=pid,
            env_extra=env_pairs(env, "--env"),
            command=invocation(),
            say=lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    md = loadtest.markdown(report)
    print(md)
    if out_path:
        loadtest.dump(report, out_path.with_suffix(".json"))
        out_path.with_suffix(".md").write_text(md)
    if not passed(report):
        raise typer.Exit(1)


@app.command("bench-corpus")
@one_line_errors
def bench_corpus_cmd(
    corpus: Annotated[Path, typer.Argument(help="JSONL corpus (e.g. SciFact's corpus.jsonl).")],
    documents: Annotated[int, typer.Option(help="Its first N documents.", min=1)] = 2000,
    artifact: ArtifactOpt = None,
    id_field: Annotated[str, typer.Option(help="The documents' id field.")] = "_id",
    text_field: Annotated[str, typer.Option(help="The documents' text field.")] = "text",
    cores: Annotated[
        int | None, typer.Option(help="Cores each engine may use (default: all).", min=1)
    ] = None,
    partition_rows: Annotated[int, typer.Option(help="embed-corpus partitions.", min=1)] = 250,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Also write the table here.")
    ] = None,
) -> None:
    """Corpus throughput: embed-corpus local, Ray with 1 and N actors, reembed over HTTP.

    The same documents through each, one after another in one run; prints docs/s and
    docs/s per core and the cores each would need for 100 M documents.
    """
    from embedkit.release.measure import default_artifact
    from embedkit_bench import corpus_throughput as bench

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = bench.compare(
        corpus,
        documents=documents,
        artifact=default_artifact(artifact).resolve(),
        id_field=id_field,
        text_field=text_field,
        cores=cores or os.cpu_count() or 1,
        partition_rows=partition_rows,
        echo=lambda line: err.print(line, markup=False, highlight=False),
    )
    table = bench.markdown(rows, command=invocation())
    print(table, flush=True)
    if markdown_out:
        markdown_out.write_text(table)
