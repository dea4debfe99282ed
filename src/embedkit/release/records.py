"""Release records: what a released model version carries about its own performance.

`embedkit release` stores, beside each artifact it registers (``records/``,
checksummed by the manifest, copied into the BentoML model store):

- ``runtime.json``: the runtime parameters chosen (threads, batching policy,
  provider, variant) — what `embedkit gate --baseline TAG` re-creates;
- ``bench.json`` (+ ``bench.md``): a short in-process benchmark, naive ORT vs the
  engine on this artifact, interleaved (~10 s); a reranker's is pairs/s and latency at
  batch 1 and 32 (:func:`rerank_bench`), with no profile;
- ``profile.json`` (+ ``profile.md``): the ORT profiler's top operators at batch 32.

The quality report is attached by the release itself (validation for fp32,
per-segment quality for variants). A flat summary (``bench.texts_per_s_b32``,
``runtime.intra_op_threads``, ...) goes into the manifest's ``performance`` and
from there into the model store metadata.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedkit.core.settings import Settings, get_settings
from embedkit.core.stats import percentiles
from embedkit.model.artifact import Artifact

BENCH_BATCHES = (1, 32)


def code_revision(where: Path | None = None) -> dict[str, Any]:
    """The git commit of the code (this package's checkout, or ``where``) and whether its
    tree was clean (untracked files count); both None outside a git checkout, e.g. a Bento."""
    import subprocess

    cwd = where or Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "clean": None}
    status = git("status", "--porcelain")
    return {"commit": commit.strip(), "clean": None if status is None else status.strip() == ""}


BENCH_TEXTS = 256
PROFILE_BATCH = 32
BENCH_ROUNDS = 3


def rerank_bench(reranker: Any, batches: Sequence[int], pairs: int) -> dict[str, Any]:
    """A reranker's short benchmark: ``pairs`` STS test pairs scored (raw) in calls of each
    batch size, :data:`BENCH_ROUNDS` times after one warm-up pass; pairs/s and p50/p95 ms of
    a call. The runtime record says with what settings."""
    from embedkit.model import evaldata

    items = [(p.sentence1, p.sentence2) for p in evaldata.sts("test")[:pairs]]
    reranker.warmup()
    out: dict[str, Any] = {"kind": "embedkit-rerank-bench", "pairs": len(items), "batches": {}}
    for size in batches:
        calls = [items[i : i + size] for i in range(0, len(items) - size + 1, size)]
        for call in calls:  # warm-up pass: every shape once
            reranker.score(call, raw=True)
        latencies: list[float] = []
        for _ in range(BENCH_ROUNDS):
            for call in calls:
                t0 = time.perf_counter()
                reranker.score(call, raw=True)
                latencies.append(time.perf_counter() - t0)
        q = percentiles(s * 1000 for s in latencies)
        out["batches"][str(size)] = {
            "calls": len(latencies),
            "pairs_per_s": len(latencies) * size / sum(latencies),
            "p50_ms": q["p50"],
            "p95_ms": q["p95"],
        }
    return out


def write_records(
    artifact: Artifact,
    variant: str,
    out_dir: Path,
    *,
    bench: bool = True,
    settings: Settings | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write the records into ``out_dir``; return ``({record name: file}, flat summary)``.

    ``bench=False`` writes only the runtime record (instant).
    """
    from embedkit.release import perfgate
    from embedkit.runtime.engine import Engine

    settings = settings or get_settings()
    out_dir.mkdir(parents=True, exist_ok=True)
    rerank = artifact.manifest.task == "rerank"
    if rerank:
        from embedkit.runtime.rerank import Reranker

        engine: Any = Reranker(artifact, settings)
    else:
        engine = Engine(artifact, settings)
    runtime = perfgate.runtime_record(settings, variant=variant, provider=engine.provider)
    files = {"runtime": out_dir / "runtime.json"}
    files["runtime"].write_text(json.dumps(runtime, indent=2) + "\n")
    summary: dict[str, Any] = {
        "runtime.variant": variant,
        "runtime.provider": engine.provider,
        "runtime.intra_op_threads": settings.intra_op_threads,
        "runtime.token_aware_batching": settings.token_aware_batching,
        "runtime.max_batch_tokens": settings.max_batch_tokens,
        "runtime.sub_batch_cost_tokens": settings.sub_batch_cost_tokens,
        "runtime.bulk_max_batch_size": settings.bulk_max_batch_size,
    }
    if rerank:
        # No vectors, so no naive-ORT comparison or profile: pairs/s of the reranker alone.
        if bench:
            result = rerank_bench(engine, BENCH_BATCHES, BENCH_TEXTS)
            result["variant"] = variant
            files["bench"] = out_dir / "bench.json"
            files["bench"].write_text(json.dumps(result, indent=2) + "\n")
            for b, r in result["batches"].items():
                summary[f"bench.pairs_per_s_b{b}"] = round(r["pairs_per_s"], 1)
                summary[f"bench.p95_ms_b{b}"] = round(r["p95_ms"], 2)
        return files, summary
    del engine
    if not bench:
        return files, summary

    from embedkit.release.measure import (
        ENGINE,
        NAIVE,
        format_batch,
        run_inprocess_bench,
        sts_stream,
    )
    from embedkit.release.profile import markdown as profile_markdown
    from embedkit.release.profile import profile_artifact

    result = run_inprocess_bench(
        artifact,
        BENCH_BATCHES,
        BENCH_TEXTS,
        include_torch=False,
        include_plain_engine=False,
        settings=settings,
        echo=None,
    )
    result["variant"] = variant
    files["bench"] = out_dir / "bench.json"
    files["bench"].write_text(json.dumps(result, indent=2) + "\n")
    files["bench_md"] = out_dir / "bench.md"
    files["bench_md"].write_text(
        "Short release benchmark (in-process, interleaved, shared CPU: compare ratios).\n\n```\n"
        + "\n".join(
            format_batch(int(b), r["systems"], r["ratios"]) for b, r in result["batches"].items()
        )
        + "\n```\n"
    )
    for b, r in result["batches"].items():
        engine_row = r["systems"][ENGINE]
        summary[f"bench.texts_per_s_b{b}"] = round(engine_row["texts_per_s"], 1)
        summary[f"bench.p95_ms_b{b}"] = round(engine_row["p95_ms"], 2)
        summary[f"bench.vs_naive_b{b}"] = round(r["ratios"][f"{ENGINE}/{NAIVE}"], 3)

    prof_dir = out_dir / "profile"
    prof = profile_artifact(
        artifact, sts_stream(BENCH_TEXTS), PROFILE_BATCH, prof_dir, settings=settings, max_batches=4
    )
    # The raw trace stays out of the artifact (MBs); its summary stays in.
    prof["trace"] = Path(prof["trace"]).name
    report = {
        "kind": "embedkit-profile",
        "batch_sizes": [PROFILE_BATCH],
        "variants": {variant: {str(PROFILE_BATCH): prof}},
    }
    files["profile"] = out_dir / "profile.json"
    files["profile"].write_text(json.dumps(report, indent=2) + "\n")
    files["profile_md"] = out_dir / "profile.md"
    files["profile_md"].write_text(profile_markdown(report))
    top = prof["top_ops"][0] if prof["top_ops"] else None
    if top:
        summary[f"profile.top_op_b{PROFILE_BATCH}"] = f"{top['op']} {top['share']:.0%}"
    return files, summary
