"""Profiling: which operators take the time, per variant and batch size (ONNX Runtime's
profiler, or OpenVINO's per-node performance counters for its variants).

Sessions are created by :mod:`embedkit.runtime.session` as everywhere else, from a
settings copy with ``profiling_dir`` set, so the profile is of the session the
service would run. One fresh session per (variant, batch size) keeps each raw
trace (Chrome trace JSON, open it in chrome://tracing or Perfetto) about one
shape regime; the summary ranks operator types by their share of kernel time.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from embedkit.core.errors import InvalidInput
from embedkit.core.settings import Settings, get_settings
from embedkit.model.artifact import Artifact, resolve


def summarize_trace(trace: Path, top: int = 10) -> dict[str, Any]:
    """Kernel time per operator type from an ORT trace (Chrome trace JSON) or an OpenVINO
    counter dump (``[[node type, µs], ...]``, :func:`profile_artifact` writes it), largest
    first."""
    try:
        events = json.loads(Path(trace).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read the profile {trace}: {exc}") from exc
    by_op: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for ev in events:
        if isinstance(ev, list):  # OpenVINO: one executed node of one run
            op, us = str(ev[0]), float(ev[1])
        elif ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
            op, us = ev.get("args", {}).get("op_name", "?"), float(ev.get("dur", 0))
        else:
            continue
        by_op[op] += us
        calls[op] += 1
    total = sum(by_op.values())
    ranked = sorted(by_op.items(), key=lambda kv: kv[1], reverse=True)
    return {
        "trace": str(trace),
        "kernel_ms": total / 1000,
        "top_ops": [
            {"op": op, "ms": us / 1000, "share": us / total if total else 0.0, "calls": calls[op]}
            for op, us in ranked[:top]
        ],
    }


def profile_artifact(
    artifact: Artifact,
    texts: Sequence[str],
    batch_size: int,
    out_dir: Path,
    *,
    settings: Settings | None = None,
    max_batches: int = 8,
    top: int = 10,
) -> dict[str, Any]:
    """Run up to ``max_batches`` batches of ``texts`` through a profiling engine; summarise."""
    from embedkit.runtime.engine import Engine

    out_dir.mkdir(parents=True, exist_ok=True)
    base = settings or get_settings()
    engine = Engine(artifact, base.model_copy(update={"profiling_dir": out_dir}))
    batches = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    if not batches:
        raise InvalidInput("no texts to profile")
    for batch in batches[:max_batches]:
        engine.encode(batch)
    if engine.session is not None:
        trace = Path(engine.session.end_profiling())
    else:  # OpenVINO: its per-node counters, dumped where ORT's trace would go
        from embedkit.runtime.openvino import OpenVINOModel

        assert isinstance(engine.runner, OpenVINOModel)
        trace = out_dir / "embedkit-openvino.json"
        trace.write_text(json.dumps(engine.runner.counters()))
    summary = summarize_trace(trace, top)
    summary.update(batch_size=batch_size, batches=min(max_batches, len(batches)))
    return summary


def profile(
    variants: Mapping[str, str | Path],
    out_dir: Path,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    texts: Sequence[str] | None = None,
    settings: Settings | None = None,
    max_batches: int = 8,
    top: int = 10,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Profile every variant (name → tag/dir) at every batch size; writes ``profile.json``."""
    from embedkit.release.measure import sts_stream

    texts = list(texts) if texts is not None else sts_stream(256)
    out_dir = Path(out_dir)
    results: dict[str, Any] = {}
    for name, target in variants.items():
        artifact = resolve(target)
        results[name] = {}
        for b in batch_sizes:
            if on_step:
                on_step(f"{name} batch {b}")
            results[name][str(b)] = profile_artifact(
                artifact,
                texts,
                b,
                out_dir / name / f"b{b}",
                settings=settings,
                max_batches=max_batches,
                top=top,
            )
    report = {"kind": "embedkit-profile", "batch_sizes": list(batch_sizes), "variants": results}
    (out_dir / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "profile.md").write_text(markdown(report))
    return report


def markdown(report: dict[str, Any], top: int = 5) -> str:
    lines = [
        "| variant | batch | kernel ms | top operators (share of kernel time) |",
        "|---|---:|---:|---|",
    ]
    for name, per_batch in report["variants"].items():
        for b, s in per_batch.items():
            ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in s["top_ops"][:top])
            lines.append(f"| {name} | {b} | {s['kernel_ms']:.1f} | {ops} |")
    return "\n".join(lines) + "\n"
