"""The performance gate: a candidate against a stored baseline, measured in the same run.

Absolute times on a shared CPU swing by 2× between runs, so a stored texts/s
figure is no baseline. Instead the baseline *configuration* is stored — its
artifact and the runtime parameters a release recorded (``records/runtime.json``)
— and re-measured here, interleaved batch by batch with the candidate (each
batch goes through both, in a random order), so a noisy neighbour slows both
alike. The gate fails when, per ``config/perf-gate.yaml``:

- throughput drops by more than ``throughput_drop_max`` at any throughput batch
  size (median over batches of baseline time / candidate time: robust to a
  burst that hits one call);
- p95 latency per call rises by more than ``p95_rise_max`` at any latency batch size;
- any quality gate fails: a quantised candidate without an approved verdict, or
  candidate vectors whose 1st-percentile cosine to the baseline's falls below
  the quality gate's ``cosine_p1_min`` on the gate corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from embedkit.core.configfile import load_yaml
from embedkit.core.errors import InvalidInput
from embedkit.core.settings import Settings, get_settings
from embedkit.core.stats import percentile
from embedkit.model.artifact import Artifact, resolve

# Settings that define how a model is run: recorded with a release, restored for the baseline.
RUNTIME_FIELDS = (
    "providers",
    "intra_op_threads",
    "inter_op_threads",
    "execution_mode",
    "graph_optimization_level",
    "allow_spinning",
    "spin_duration_us",
    "enable_cpu_mem_arena",
    "enable_mem_pattern",
    "arena_shrinkage",
    "io_binding",
    "token_aware_batching",
    "max_batch_tokens",
    "max_sub_batch_size",
    "sub_batch_cost_tokens",
    "workers",
    "bulk_max_batch_size",
    "bulk_max_latency_ms",
    "query_max_batch_size",
    "query_max_latency_ms",
)


class _Short(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: int = Field(ge=8)
    rounds: int = Field(ge=1)


class PerfThresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    throughput_drop_max: float = Field(ge=0, lt=1)
    p95_rise_max: float = Field(ge=0)
    throughput_batch_sizes: list[int]
    latency_batch_sizes: list[int]
    texts: int = Field(ge=8)
    rounds: int = Field(ge=1)
    short: _Short

    def shortened(self) -> PerfThresholds:
        return self.model_copy(update={"texts": self.short.texts, "rounds": self.short.rounds})


def load_thresholds(path: Path | None = None) -> PerfThresholds:
    """``path``, else ``perf-gate.yaml`` in ``settings.config_dir``."""
    path = path or get_settings().config_dir / "perf-gate.yaml"
    return load_yaml(path, PerfThresholds, "performance gate config")


# --- runtime records ---------------------------------------------------------------------


def runtime_record(settings: Settings, *, variant: str, provider: str) -> dict[str, Any]:
    """What a release stores as ``records/runtime.json``: the parameters the model runs with."""
    return {
        "kind": "embedkit-runtime",
        "variant": variant,
        "provider": provider,
        "settings": settings.model_dump(mode="json", include=set(RUNTIME_FIELDS)),
    }


def settings_from_record(record: dict[str, Any], base: Settings | None = None) -> Settings:
    """``base`` (default: the environment's settings) with the record's runtime fields."""
    values = record.get("settings") or {}
    unknown = set(values) - set(RUNTIME_FIELDS)
    if unknown:
        raise InvalidInput(f"runtime record has unknown settings: {', '.join(sorted(unknown))}")
    merged = {**(base or get_settings()).model_dump(), **values}
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise InvalidInput(f"runtime record is invalid: {exc.errors()[0]['msg']}") from exc


@dataclass(frozen=True)
class Config:
    """An artifact and the settings it runs with."""

    label: str
    artifact: Artifact
    settings: Settings


def load_baseline(tag_or_file: str | Path, base: Settings | None = None) -> Config:
    """A baseline from a model tag / artifact dir (with its ``records/runtime.json`` if any),
    or from a JSON file: a runtime record with ``artifact``, or a ``bench.json``."""
    path = Path(tag_or_file)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise InvalidInput(f"baseline file {path} is not JSON: {exc}") from exc
        if data.get("kind") == "embedkit-bench":
            target = data["artifact"].get("tag") or data["artifact"]["path"]
            record = {
                "settings": {
                    k: v for k, v in data.get("runtime", {}).items() if k in RUNTIME_FIELDS
                }
            }
        elif "artifact" in data:
            target, record = data["artifact"], data
        else:
            raise InvalidInput(
                f"baseline file {path} names no artifact (expected a runtime record or bench.json)"
            )
        return Config(f"baseline {target}", resolve(target), settings_from_record(record, base))
    artifact = resolve(tag_or_file)
    record = {}
    rel = artifact.manifest.records.get("runtime")
    if rel:
        record = json.loads(artifact.file(rel).read_text())
    return Config(f"baseline {tag_or_file}", artifact, settings_from_record(record, base))


# --- the gate ------------------------------------------------------------------------------


@dataclass
class GateResult:
    passed: bool
    failures: list[str]
    throughput: dict[str, dict[str, float]]  # batch → {ratio, baseline_texts_per_s, candidate_...}
    latency: dict[str, dict[str, float]]  # batch → {ratio, baseline_p95_ms, candidate_p95_ms}
    quality: dict[str, Any]
    baseline: str
    candidate: str
    thresholds: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def markdown(self) -> str:
        t = self.thresholds
        lines = [
            f"performance gate: {'PASSED' if self.passed else 'FAILED'}",
            f"  {self.baseline}  vs  candidate {self.candidate}",
        ]
        for b, r in self.throughput.items():
            lines.append(
                f"  throughput b{b}: candidate/baseline {r['ratio']:.2f} "
                f"(limit >= {1 - t.get('throughput_drop_max', 0):.2f}; "
                f"{r['baseline_texts_per_s']:.0f} vs {r['candidate_texts_per_s']:.0f} texts/s "
                "in this run)"
            )
        for b, r in self.latency.items():
            lines.append(
                f"  p95 latency b{b}: candidate/baseline {r['ratio']:.2f} "
                f"(limit <= {1 + t.get('p95_rise_max', 0):.2f}; {r['baseline_p95_ms']:.1f} vs "
                f"{r['candidate_p95_ms']:.1f} ms)"
            )
        q = self.quality
        lines.append(
            f"  quality: verdict {q['verdict']}, p1 cosine to baseline {q['p1_cosine']:.5f} "
            f"(limit >= {q['cosine_p1_min']})"
        )
        lines += [f"  FAIL: {f}" for f in self.failures]
        return "\n".join(lines)


def _quality(
    candidate: Config, baseline: Config, texts: list[str], failures: list[str]
) -> dict[str, Any]:
    from embedkit.quality.evaluate import cosine_stats
    from embedkit.quality.gate import load_thresholds as quality_thresholds
    from embedkit.runtime.engine import Engine

    q = candidate.artifact.manifest.quantization
    if q.mode == "none":
        verdict = "not needed (fp32)"
    elif q.approved:
        verdict = "approved" + (" (forced)" if q.forced else "")
    else:
        verdict = "rejected" if q.approved is False else "never gated"
        failures.append(
            f"quality: the candidate ({q.mode}) has no approved quality verdict ({verdict})"
        )
    cos_min = quality_thresholds().cosine_p1_min
    a = Engine(candidate.artifact, candidate.settings).encode(texts, normalize=True)
    b = Engine(baseline.artifact, baseline.settings).encode(texts, normalize=True)
    p1 = cosine_stats(a, b).p1  # the quality gate's p1, computed the same way
    if p1 < cos_min:
        failures.append(f"quality: p1 cosine to the baseline's vectors {p1:.5f} < {cos_min}")
    return {"verdict": verdict, "p1_cosine": p1, "cosine_p1_min": cos_min}


def run_gate(
    baseline: Config,
    candidate: Config,
    thresholds: PerfThresholds | None = None,
    *,
    seed: int = 0,
    on_call: Any = None,
) -> GateResult:
    """Measure baseline and candidate interleaved; compare ratios against the thresholds."""
    from embedkit.release.measure import engine_encoder, measure, sts_stream
    from embedkit.runtime.engine import Engine

    th = thresholds or load_thresholds()
    texts = sts_stream(th.texts, seed=seed)
    failures: list[str] = []
    quality = _quality(candidate, baseline, texts[:128], failures)
    base_engine = Engine(baseline.artifact, baseline.settings)
    cand_engine = Engine(candidate.artifact, candidate.settings)
    base_engine.warmup()
    cand_engine.warmup()
    systems = {
        "baseline": engine_encoder(base_engine)[0],
        "candidate": engine_encoder(cand_engine)[0],
    }
    throughput: dict[str, dict[str, float]] = {}
    latency: dict[str, dict[str, float]] = {}
    for b in sorted(set(th.throughput_batch_sizes) | set(th.latency_batch_sizes)):
        timings = measure(systems, texts, b, rounds=th.rounds, on_call=on_call)
        base_s, cand_s = timings["baseline"].seconds, timings["candidate"].seconds
        rows = {k: t.summary(len(texts) * th.rounds, 0) for k, t in timings.items()}
        if b in th.throughput_batch_sizes:
            ratio = percentile((x / y for x, y in zip(base_s, cand_s, strict=True)), 50)
            throughput[str(b)] = {
                "ratio": ratio,
                "baseline_texts_per_s": rows["baseline"]["texts_per_s"],
                "candidate_texts_per_s": rows["candidate"]["texts_per_s"],
            }
            if ratio < 1 - th.throughput_drop_max:
                failures.append(
                    f"throughput at batch {b}: {ratio:.2f}× the baseline "
                    f"(drop {1 - ratio:.0%} > {th.throughput_drop_max:.0%})"
                )
        if b in th.latency_batch_sizes:
            ratio = rows["candidate"]["p95_ms"] / rows["baseline"]["p95_ms"]
            latency[str(b)] = {
                "ratio": ratio,
                "baseline_p95_ms": rows["baseline"]["p95_ms"],
                "candidate_p95_ms": rows["candidate"]["p95_ms"],
            }
            if ratio > 1 + th.p95_rise_max:
                failures.append(
                    f"p95 latency at batch {b}: {ratio:.2f}× the baseline "
                    f"(rise {ratio - 1:.0%} > {th.p95_rise_max:.0%})"
                )
    return GateResult(
        passed=not failures,
        failures=failures,
        throughput=throughput,
        latency=latency,
        quality=quality,
        baseline=baseline.label,
        candidate=candidate.label,
        thresholds=th.model_dump(),
    )
