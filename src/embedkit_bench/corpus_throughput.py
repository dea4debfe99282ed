"""Corpus embedding throughput, every engine in one run: `embedkit bench-corpus`.

The same first N documents of a JSONL corpus through each way embedkit embeds a corpus:
``embed-corpus --engine local`` (one process, no Ray), ``--engine ray`` with 1 actor × all
threads and with one actor per core, and ``reembed`` over HTTP (a real `bentoml serve` of
the same artifact on loopback). Each is a subprocess of the real CLI into a fresh output,
so its wall time includes what a user waits for (Ray's start, the model's load); docs/s is
the command's own report (embedding only). Machines drift from day to day: compare the
rows of one run, never across runs. From docs/s per core the report sizes a cluster for a
corpus (:func:`sizing`), the figure docs/embed-corpus.md's table is made from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from embedkit.core.errors import EmbedkitError, InvalidInput
from embedkit_bench.server import start_service

EMBEDKIT = [sys.executable, "-m", "embedkit.cli"]


@dataclass
class Row:
    engine: str
    setup: str
    cores: int
    documents: int
    wall_s: float
    docs_per_s: float

    @property
    def per_core(self) -> float:
        return self.docs_per_s / self.cores


def first_documents(corpus: Path, n: int, into: Path) -> int:
    """The first ``n`` lines of ``corpus`` into ``into``; how many there were."""
    if not corpus.is_file():
        raise InvalidInput(f"{corpus}: no such corpus file")
    count = 0
    with corpus.open("rb") as src, into.open("wb") as dst:
        for line in src:
            if count == n:
                break
            dst.write(line)
            count += 1
    if count == 0:
        raise InvalidInput(f"{corpus}: empty")
    return count


def _run(args: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise EmbedkitError(f"{' '.join(args[2:4])} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def compare(
    corpus: Path,
    *,
    documents: int,
    artifact: Path,
    id_field: str,
    text_field: str,
    cores: int,
    partition_rows: int,
    echo: Callable[[str], None],
) -> list[Row]:
    """Every engine over the same documents, in turn; one :class:`Row` each."""
    work = Path(tempfile.mkdtemp(prefix="embedkit-bench-corpus-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDKIT_INTRA_OP_THREADS": str(cores)}
    rows: list[Row] = []
    try:
        source = work / "corpus.jsonl"
        n = first_documents(corpus, documents, source)
        fields = ["--id-field", id_field, "--text-field", text_field]
        batch = [*EMBEDKIT, "embed-corpus", str(source), "--model", str(artifact), *fields]
        batch += ["--partition-rows", str(partition_rows)]
        runs = [
            ("embed-corpus", "local, 1 process", ["--engine", "local"]),
            ("embed-corpus", f"ray, 1 actor × {cores} threads", ["--actors", "1"]),
            ("embed-corpus", f"ray, {cores} actors × 1 thread", ["--actors", str(cores)]),
        ]
        for i, (engine, setup, extra) in enumerate(runs):
            if "ray" in setup:
                threads = cores // int(extra[1])
                extra = [*extra, "--engine", "ray", "--threads-per-actor", str(threads)]
            echo(f"{engine} ({setup}) over {n} documents ...")
            report, wall = _run([*batch, "--out", str(work / f"out-{i}"), *extra], env)
            rows.append(Row(engine, setup, cores, n, wall, float(report["docs_per_s"] or 0)))
        echo(f"reembed over HTTP over {n} documents (starting a server) ...")
        server = start_service(artifact, {"EMBEDKIT_INTRA_OP_THREADS": str(cores)})
        try:
            server.wait_ready()
            args = [*EMBEDKIT, "reembed", str(source), "--out", str(work / "out-http")]
            args += ["--url", server.url, *fields, "--on-bad-line", "stop"]
            report, wall = _run(args, env)
        finally:
            server.stop()
        rows.append(Row("reembed", "HTTP, bulk route", cores, n, wall, float(report["docs_per_s"])))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def sizing(docs_per_core_s: float, corpus: int, hours: float) -> int:
    """Cores that embed ``corpus`` documents in ``hours`` at ``docs_per_core_s``."""
    return int(-(-corpus // int(docs_per_core_s * hours * 3600)))


def markdown(rows: list[Row], *, corpus_docs: int = 100_000_000, command: str = "") -> str:
    """The run's table, with the cores each way would need for ``corpus_docs`` in a day
    and in a week at its own rate per core (a cluster scales by adding the same units)."""
    lines = [
        "| engine | setup | cores | documents | wall s (incl. start) | docs/s "
        f"| docs/s per core | cores for {corpus_docs / 1e6:g} M in 24 h | in 168 h |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.engine} | {r.setup} | {r.cores} | {r.documents} | {r.wall_s:.1f} "
            f"| {r.docs_per_s:.1f} | {r.per_core:.1f} | {sizing(r.per_core, corpus_docs, 24):,} "
            f"| {sizing(r.per_core, corpus_docs, 168):,} |"
        )
    if command:
        lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def as_json(rows: list[Row]) -> list[dict[str, object]]:
    return [{**asdict(r), "per_core": round(r.per_core, 2)} for r in rows]
