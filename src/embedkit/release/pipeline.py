"""The release pipeline: export → validate (contract + parity) → variants + gate → register.

A release never registers an artifact whose contract failed, nor a variant the
quality gate rejected (unless forced, which its manifest records). Reports
travel with each artifact (``records/``) and their summaries land in its
manifest, so the model store entry carries its own proof. The default version
(:func:`pick_default`) is registered last, so ``NAME:latest`` is it.

Each version's manifest is written once, at the end: the export and the variant builds
leave theirs unwritten, every later stage (parity, calibration ranges, the gate's verdict
and reference vectors, quality reports, release records) adds to it in memory
(:func:`embedkit.model.artifact.amend`, each new file hashed once), and :func:`publish`
writes it (:func:`embedkit.model.artifact.seal`) just before signing and registering.

The variant candidates (:func:`run_candidates`) are where the two halves meet:
:mod:`embedkit.variants` builds them, :mod:`embedkit.quality` scores and gates
them, and neither imports the other.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from embedkit.core.configfile import load_yaml
from embedkit.core.errors import ArtifactError, InvalidInput, PerformanceRegression
from embedkit.core.settings import Settings, get_settings
from embedkit.core.stats import percentile
from embedkit.model import evaldata, signing
from embedkit.model.artifact import Artifact, amend, register, seal
from embedkit.model.export import Step, export
from embedkit.model.recipe import Recipe
from embedkit.quality import contract, pair_contract, pair_gate, segments
from embedkit.quality.evaluate import Encoder, QualityReport, evaluate
from embedkit.quality.gate import GateThresholds, GateVerdict, gate, load_thresholds, with_verdict
from embedkit.quality.report import summary_markdown, write_report
from embedkit.release import calibration, perfgate, records
from embedkit.runtime.engine import Engine
from embedkit.runtime.rerank import Reranker
from embedkit.variants import quantize, staging

log = logging.getLogger(__name__)
PARENT = "fp32"  # the name of the fp32 parent among a release's versions and speeds


@dataclass(frozen=True)
class Registered:
    name: str
    tag: str
    throughput: float | None
    approved: bool | None


@dataclass(frozen=True)
class Release:
    tag: str  # the default version
    artifact: Artifact
    report: dict[str, Any]
    versions: list[Registered] = field(default_factory=list)
    summary_markdown: str | None = None


def with_records(
    artifact: Artifact, records: dict[str, Path], manifest_updates: dict[str, Any]
) -> Artifact:
    """Copy report files into ``records/`` and list them (each hashed once) with
    ``manifest_updates`` in the manifest, in memory: :func:`publish` writes it."""
    target = artifact.path / "records"
    target.mkdir(exist_ok=True)
    names = dict(artifact.manifest.records)
    for key, src in records.items():
        dest = target / Path(src).name
        if Path(src).resolve() != dest.resolve():
            dest.write_bytes(Path(src).read_bytes())
        names[key] = dest.relative_to(artifact.path).as_posix()
    new_files = [names[key] for key in records]
    return amend(artifact, {**manifest_updates, "records": names}, files=new_files)


def with_parity(artifact: Artifact, report: dict[str, Any]) -> Artifact:
    """The validation report (the embedding or the pair contract's, by the manifest's task)
    stored beside the artifact and its summary in the manifest (in memory, like
    :func:`with_records`)."""
    (artifact.path / "records").mkdir(exist_ok=True)
    report_file = artifact.path / "records" / "validation.json"
    report_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    rerank = artifact.manifest.task == "rerank"
    summary = (pair_contract if rerank else contract).parity_summary(report)
    return with_records(artifact, {"validation": report_file}, {"parity": summary})


def attach_gpu_check(artifact: Artifact, report: Path) -> Artifact:
    """Record the GPU check (``scripts/gpu-check``'s gpu-check.json) with a release's working
    copy, before it is registered: the parity verdict `embedkit pools mixed` reads. Refused
    when the report measured another model.onnx (it would vouch for vectors it never saw)."""
    data = json.loads(Path(report).read_text())
    measured = (data.get("artifacts") or {}).get("fp32", {}).get("model_sha256")
    if measured != artifact.manifest.files.get("model.onnx"):
        raise InvalidInput(
            f"{report} measured model.onnx sha256 {str(measured)[:12]}…, not "
            f"{artifact.path}'s; run the GPU check on this artifact"
        )
    attached = with_records(artifact, {"gpu_check": Path(report)}, {})
    # A working copy still being built (Built's versions) stays unwritten: publish writes it.
    return seal(attached) if artifact.written else attached


# --- variant candidates: build → evaluate → gate → time ------------------------------------


@dataclass
class Candidate:
    name: str
    artifact: Artifact
    report: QualityReport | pair_gate.PairQualityReport  # the latter for a reranker
    verdict: GateVerdict
    throughput: float | None = None


class CandidateEvaluation(BaseModel):
    """How much of the evaluation each candidate gets (``evaluate``'s bounds; by default
    every segment at full size)."""

    model_config = ConfigDict(extra="forbid")
    groups: list[str] | None = None
    languages: list[str] | None = None
    max_pairs: int | None = Field(default=None, ge=10)
    lang_pairs: int | None = Field(default=None, ge=10)
    retrieval: bool = True
    retrieval_docs: int | None = Field(default=None, ge=1)
    retrieval_queries: int | None = Field(default=None, ge=1)

    @field_validator("groups", "languages")
    @classmethod
    def _known(cls, names: list[str] | None, info: ValidationInfo) -> list[str] | None:
        known = segments.GROUPS if info.field_name == "groups" else segments.LANGUAGES
        unknown = sorted(set(names or ()) - set(known))
        if unknown:
            raise ValueError(f"unknown {unknown} (known: {', '.join(known)})")
        return names


class CandidateTiming(BaseModel):
    """The side-by-side timing that ranks the candidates (:func:`throughput`); what is not
    given keeps :func:`run_candidates`' default."""

    model_config = ConfigDict(extra="forbid")
    texts: int | None = Field(default=None, ge=8)
    batch_size: int | None = Field(default=None, ge=1)
    rounds: int | None = Field(default=None, ge=1)


class VariantsConfig(BaseModel):
    """``embedkit release --variants --variants-config FILE``: which variants to build
    (default: the target CPU's :func:`quantize.candidate_presets`), how much evaluation
    and timing each gets. Quicker is coarser, never less gated: every candidate still
    passes through the same per-segment gate."""

    model_config = ConfigDict(extra="forbid")
    presets: dict[str, dict[str, Any]] | None = None
    evaluation: CandidateEvaluation = CandidateEvaluation()
    timing: CandidateTiming = CandidateTiming()

    @field_validator("presets")
    @classmethod
    def _known_kinds_and_options(
        cls, presets: dict[str, dict[str, Any]] | None
    ) -> dict[str, dict[str, Any]] | None:
        for name, preset in (presets or {}).items():
            options = dict(preset)
            if name == PARENT:
                raise ValueError(f"{PARENT!r} is the parent's name, not a variant's")
            try:
                quantize.check_variant(str(options.pop("kind", "")), options)
            except InvalidInput as exc:
                raise ValueError(f"{name}: {exc.message}") from None
        return presets

    def candidate_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`run_candidates` (and so of ``evaluate``)."""
        timing = self.timing.model_dump(exclude_none=True)
        if "texts" in timing:
            timing["speed_texts"] = timing.pop("texts")
        return {**self.evaluation.model_dump(exclude_none=True), **timing}


def load_variants_config(path: Path) -> VariantsConfig:
    return load_yaml(path, VariantsConfig, "variants config")


def throughput(
    encoders: Mapping[str, Encoder], texts: Sequence[Any], *, batch_size: int = 32, rounds: int = 5
) -> dict[str, float]:
    """Median texts/s (a reranker's: pairs/s, :class:`PairScorer`) per encoder at
    ``batch_size``, rounds interleaved so a noisy shared CPU hits every encoder alike. Small
    on purpose: it only ranks the candidates (``embedkit.release.measure`` is the full
    benchmark)."""
    batches = [
        list(texts[i : i + batch_size]) for i in range(0, len(texts) - batch_size + 1, batch_size)
    ]
    if not batches:
        raise InvalidInput(f"need at least {batch_size} texts to time batch {batch_size}")
    for enc in encoders.values():  # warm-up: first runs allocate arenas
        enc.encode(batches[0])
    samples: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(rounds):
        for name, enc in encoders.items():
            t0 = time.perf_counter()
            for batch in batches:
                enc.encode(batch)
            samples[name].append(len(batches) * batch_size / (time.perf_counter() - t0))
    return {name: round(percentile(v, 50), 1) for name, v in samples.items()}


def run_candidates(
    parent: Artifact,
    out_root: Path,
    *,
    presets: dict[str, dict[str, Any]] | None = None,
    reference_dir: Path | None = None,
    thresholds: GateThresholds | None = None,
    speed_texts: int = 640,
    batch_size: int = 32,
    rounds: int = 5,
    say: Callable[[str], None] = log.info,
    write: bool = True,
    **eval_options: Any,
) -> tuple[list[Candidate], dict[str, float]]:
    """Build every preset from the fp32 ``parent``, evaluate and gate each, then time them
    all side by side with the parent at ``batch_size``. Returns candidates and texts/s
    (key ``"fp32"`` is the parent). Existing variant directories are reused.
    ``eval_options`` go to :func:`embedkit.quality.evaluate.evaluate` (its ``cache_dir``
    defaults to ``settings.eval_cache_dir``). ``write=False`` leaves each new variant's
    manifest unwritten (a release adds the verdict and records and writes it once)."""
    th = thresholds or load_thresholds()
    eval_options.setdefault(
        "cache_dir", (eval_options.get("settings") or get_settings()).eval_cache_dir
    )
    presets = presets if presets is not None else quantize.candidate_presets()
    out_root = Path(out_root)
    candidates = []
    for name, preset in presets.items():
        options = dict(preset)
        kind = options.pop("kind")
        target = out_root / name
        if (target / "manifest.json").is_file():
            artifact = Artifact.load(target)
        else:
            say(f"building {name}")
            artifact = quantize.build_variant(parent, kind, target, write=write, **options)
        say(f"evaluating {name}")
        report = evaluate(artifact, fp32=parent, reference_dir=reference_dir, **eval_options)
        verdict = gate(report, th)
        write_report(report, out_root / f"{name}.quality", verdict)
        say(f"{name}: {verdict.summary()}")
        candidates.append(Candidate(name, artifact, report, verdict))
    pairs = evaldata.sts("test")
    texts = [t for p in pairs for t in (p.sentence1, p.sentence2)][:speed_texts]
    settings = eval_options.get("settings")
    encoders = {PARENT: Engine(parent, settings)}
    # Timing picks among candidates the gate is still judging (not yet stamped).
    encoders.update({c.name: Engine(c.artifact, settings, judging=True) for c in candidates})
    for engine in encoders.values():
        engine.warmup()  # as a server does before it is ready (OpenVINO prepares shapes)
    say(f"timing {len(encoders)} encoders side by side at batch {batch_size}")
    speeds = throughput(encoders, texts, batch_size=batch_size, rounds=rounds)
    for c in candidates:
        c.throughput = speeds[c.name]
    return candidates, speeds


class PairScorer:
    """A :class:`~embedkit.runtime.rerank.Reranker` timed as an encoder: ``encode`` scores a
    batch of (query, document) pairs (raw), so :func:`throughput` gives pairs/s."""

    def __init__(self, reranker: Reranker) -> None:
        self.reranker = reranker

    def encode(self, texts: list[Any]) -> Any:
        return self.reranker.score(texts, raw=True)


def run_pair_candidates(
    parent: Artifact,
    out_root: Path,
    *,
    presets: dict[str, dict[str, Any]] | None = None,
    thresholds: GateThresholds | None = None,
    limit_per_segment: int | None = None,
    speed_pairs: int = 256,
    batch_size: int = 32,
    rounds: int = 5,
    settings: Settings | None = None,
    say: Callable[[str], None] = log.info,
    write: bool = True,
) -> tuple[list[Candidate], dict[str, float]]:
    """:func:`run_candidates` for a reranker: build each preset (default
    :func:`quantize.rerank_presets`), judge it per segment against the fp32 ``parent``
    (:mod:`embedkit.quality.pair_gate`: score fidelity and ranking agreement), then time
    every candidate beside the parent in pairs/s on STS test pairs."""
    th = thresholds or load_thresholds()
    th.rerank_limits()  # a config without rerank limits stops here, before any build
    presets = presets if presets is not None else quantize.rerank_presets()
    out_root = Path(out_root)
    candidates = []
    for name, preset in presets.items():
        options = dict(preset)
        kind = options.pop("kind")
        say(f"building {name}")
        artifact = quantize.build_variant(parent, kind, out_root / name, write=write, **options)
        say(f"evaluating {name} per segment against fp32")
        report = pair_gate.evaluate_pairs(
            artifact,
            fp32=parent,
            settings=settings,
            thresholds=th,
            limit_per_segment=limit_per_segment,
        )
        verdict = pair_gate.gate_pairs(report, th)
        pair_gate.write_pair_report(report, out_root / f"{name}.quality", verdict)
        say(f"{name}: {verdict.summary()}")
        candidates.append(Candidate(name, artifact, report, verdict))
    pairs = [(p.sentence1, p.sentence2) for p in evaldata.sts("test")][:speed_pairs]
    run = settings or get_settings()
    scorers = {PARENT: Reranker(parent, run)}
    scorers.update({c.name: Reranker(c.artifact, run, judging=True) for c in candidates})
    for scorer in scorers.values():
        scorer.warmup()
    say(f"timing {len(scorers)} rerankers side by side at batch {batch_size}")
    speeds = throughput(
        {n: PairScorer(r) for n, r in scorers.items()}, pairs, batch_size=batch_size, rounds=rounds
    )
    for c in candidates:
        c.throughput = speeds[c.name]
    return candidates, speeds


def stamped_candidates(
    candidates: Sequence[Candidate], force: Sequence[str], th: GateThresholds, say: Step
) -> list[tuple[str, Artifact, float | None, bool]]:
    """The candidates to register, each with its verdict (:func:`with_verdict`) and quality
    report in its records: index-compatible and reindex ones (a reindex one serves only when
    named: EMBEDKIT_VARIANT); rejected ones only when ``force`` names them."""
    out = []
    for c in candidates:
        if c.verdict.compatibility == "rejected" and c.name not in force:
            say(f"not registering {c.name}: {c.verdict.summary()[:200]}")
            continue
        stamped = with_verdict(
            c.artifact, c.verdict, force=c.name in force, name=c.name, thresholds=th
        )
        records_dir = stamped.path / "records"
        if isinstance(c.report, pair_gate.PairQualityReport):
            files = pair_gate.write_pair_report(c.report, records_dir, c.verdict)
        else:
            files = write_report(c.report, records_dir, c.verdict)
        stamped = with_records(stamped, {f"quality.{k}": v for k, v in files.items()}, {})
        out.append((c.name, stamped, c.throughput, c.verdict.approved))
    return out


def pick_default(candidates: Sequence[Candidate], parent_speed: float | None) -> Candidate | None:
    """The version to serve by default: the fastest index-compatible candidate if it is
    faster than the fp32 parent, else None (the parent stays the default). A ``reindex``
    variant never becomes the default: it would silently break every fp32-built index.

    The parent competes because its parity contract approves it, and a variant is not
    faster by construction: the offline-fused graph measured slower than ORT's own
    session-time fusion on CPU (docs/quantization.md), so "fused when no INT8 passes"
    would serve a slower artifact for nothing. Ties go to the parent; forced (unapproved)
    candidates never become the default.
    """
    approved = [
        c
        for c in candidates
        if c.verdict.compatibility == "index-compatible" and c.throughput is not None
    ]
    best = max(approved, key=lambda c: c.throughput or 0.0, default=None)
    if best is None or (best.throughput or 0.0) <= (parent_speed or 0.0):
        return None
    return best


def candidates_summary(
    candidates: Sequence[Candidate], speeds: Mapping[str, float], th: GateThresholds
) -> str:
    """The candidates' summary table, in their order: :func:`embedkit.quality.report.
    summary_markdown`, or for a reranker's :func:`embedkit.quality.pair_gate.summary_markdown`."""
    pairs = {
        c.name: c.report for c in candidates if isinstance(c.report, pair_gate.PairQualityReport)
    }
    if pairs:
        return pair_gate.summary_markdown(
            pairs,
            {c.name: c.verdict for c in candidates},
            dict(speeds),
            rank_pairs_min=th.rerank_limits().rank_pairs_min,
        )
    return summary_markdown(
        {c.name: c.report for c in candidates if isinstance(c.report, QualityReport)},
        {c.name: c.verdict for c in candidates},
        speeds,
        th,
    )


# --- the performance gate against the previous :latest ----------------------------------------


def previous_latest(name: str) -> str | None:
    """The tag ``NAME:latest`` resolves to in the model store; None before the first release."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return str(bentoml.models.get(f"{name}:latest").tag)
    except NotFound:
        return None


@dataclass(frozen=True)
class PerfDecision:
    """The performance gate's word on a release's default version, and any override."""

    baseline: str | None  # the previous NAME:latest; None for a first release
    result: perfgate.GateResult | None
    override: str | None = None  # the operator's reason, when the gate failed and was overridden

    @property
    def blocks(self) -> bool:
        return self.result is not None and not self.result.passed and self.override is None

    def summary(self) -> str:
        if self.result is None:
            return "no baseline (first release of this name)"
        if self.result.passed:
            return f"passed against {self.baseline}"
        verdict = f"FAILED against {self.baseline}: {'; '.join(self.result.failures)}"
        return verdict + (f" — overridden: {self.override}" if self.override else "")

    def record(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "passed": None if self.result is None else self.result.passed,
            "failures": [] if self.result is None else self.result.failures,
            "override_reason": self.override,
            "summary": self.summary(),
        }


def run_perf_gate(
    name: str,
    candidate: Artifact,
    *,
    thresholds: perfgate.PerfThresholds | None = None,
    override: str | None = None,
    say: Callable[[str], None] = log.info,
) -> PerfDecision:
    """``candidate`` (run with this environment's settings) against the previous
    ``NAME:latest`` (run with the runtime parameters its release recorded), both measured
    in this run (:func:`embedkit.release.perfgate.run_gate`). ``override`` is kept only
    when the gate fails: a passing release needs none."""
    if candidate.manifest.task == "rerank":
        # perfgate times embedding calls; a reranker's records carry its pairs/s instead
        # (records.rerank_bench), not yet compared against the previous :latest.
        say("performance gate: not compared for rerankers (task: rerank); bench.json has pairs/s")
        return PerfDecision(None, None)
    baseline = previous_latest(name)
    if baseline is None:
        say(f"performance gate: no previous {name}:latest, nothing to compare")
        return PerfDecision(None, None)
    say(f"performance gate: candidate vs {baseline}, interleaved in this run")
    config = perfgate.Config(f"candidate {candidate.path.name}", candidate, get_settings())
    result = perfgate.run_gate(perfgate.load_baseline(baseline), config, thresholds)
    return PerfDecision(baseline, result, None if result.passed else override)


def release_record(decision: PerfDecision, default: str, code: dict[str, Any], out: Path) -> Path:
    """``release.json``: the code that built the release and the performance gate's word."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "release.json"
    data = {
        "kind": "embedkit-release",
        "code": code,
        "default_version": default,
        "perf_gate": decision.record(),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def release(
    recipe: Recipe,
    *,
    workdir: Path | None = None,
    limit_per_segment: int | None = None,
    variants: bool = False,
    presets: dict[str, dict[str, Any]] | None = None,
    force: Sequence[str] = (),
    sign_key: Path | None = None,
    step: Step | None = None,
    bench: bool = True,
    candidate_options: Mapping[str, Any] | None = None,
    perf_thresholds: perfgate.PerfThresholds | None = None,
    override_perf_gate: str | None = None,
    calibration_texts: int | None = None,
) -> Release:
    """Export, validate, optionally build and gate variants (:func:`build`), then the
    performance gate, records, signing and registration (:func:`publish`).

    Every registered version carries release records (:mod:`embedkit.release.records`): its
    runtime parameters and, with ``bench``, a short benchmark and profiler summary.
    ``candidate_options`` go to :func:`run_candidates` (evaluation size, timing rounds,
    cache), e.g. to make a quick run smaller; ``calibration_texts`` bounds the text the
    int8/uint8 ranges are calibrated on (:mod:`embedkit.release.calibration`; all by default).

    Before anything is registered, the default version goes through the performance gate
    against the previous ``NAME:latest`` (:func:`run_perf_gate`, ``perf_thresholds`` or
    ``config/perf-gate.yaml``). A regression registers nothing, so ``:latest`` stays where
    it was, unless ``override_perf_gate`` gives the operator's reason; the gate's result,
    that reason and the code's git commit go into every version's ``records/release.json``.

    Raises ContractViolation when the fp32 contract fails, PerformanceRegression when the
    performance gate fails without an override (nothing registered either way).
    """
    if override_perf_gate is not None and not override_perf_gate.strip():
        raise InvalidInput("--override-perf-gate needs the reason (it goes into the records)")
    built = build(
        recipe,
        workdir=workdir,
        limit_per_segment=limit_per_segment,
        variants=variants,
        presets=presets,
        force=force,
        step=step,
        candidate_options=candidate_options,
        calibration_texts=calibration_texts,
    )
    return publish(
        built,
        sign_key=sign_key,
        step=step,
        bench=bench,
        perf_thresholds=perf_thresholds,
        override_perf_gate=override_perf_gate,
    )


def build(
    recipe: Recipe,
    *,
    workdir: Path | None = None,
    limit_per_segment: int | None = None,
    variants: bool = False,
    presets: dict[str, dict[str, Any]] | None = None,
    force: Sequence[str] = (),
    step: Step | None = None,
    candidate_options: Mapping[str, Any] | None = None,
    calibration_texts: int | None = None,
) -> Built:
    """Export, validate, optionally build, gate and time variants; pick the default.
    Nothing is registered. Raises ContractViolation when the fp32 contract fails."""
    say = step or (lambda _m: None)
    if recipe.task == "rerank" and variants:  # before minutes of export, not after
        load_thresholds().rerank_limits()
        _pair_timing(candidate_options)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    base = Path(workdir) if workdir else get_settings().artifacts_dir
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"{recipe.name}-{stamp}-", dir=base))
    if recipe.task == "rerank":
        return _build_reranker(
            recipe,
            root,
            limit_per_segment=limit_per_segment,
            say=say,
            variants=variants,
            presets=presets,
            force=force,
            candidate_options=candidate_options,
        )
    # Every version's manifest is written once, by publish: until then each stage adds to it.
    artifact = export(recipe, root / "fp32", step=say, write=False)
    reference_dir, _ = recipe.source.resolve()
    report = contract.validate(
        artifact, reference_dir=reference_dir, limit_per_segment=limit_per_segment, step=say
    )
    contract.require_passed(report)
    artifact = with_parity(artifact, report)
    # Before the variants are built from it, so they inherit the parent's buckets.
    say("calibrating the int8/uint8 output-encoding ranges")
    artifact = calibration.with_ranges(
        artifact, calibration.calibrate(artifact, limit=calibration_texts)
    )

    # (name, artifact, throughput, approved); the fp32 parent is approved by its contract.
    versions: list[tuple[str, Artifact, float | None, bool]] = []
    parent_speed: float | None = None
    default_name = PARENT
    summary = None
    if variants:
        th = load_thresholds()
        candidates, speeds = run_candidates(
            artifact,
            root / "variants",
            presets=presets,
            reference_dir=reference_dir,
            thresholds=th,
            say=say,
            write=False,
            **(candidate_options or {}),
        )
        summary = candidates_summary(candidates, speeds, th)
        (root / "variants" / "summary.md").write_text(summary + "\n")
        parent_speed = speeds.get(PARENT)
        versions += stamped_candidates(candidates, force, th, say)
        best = pick_default(candidates, parent_speed)
        default_name = best.name if best else PARENT
    versions.insert(0, (PARENT, artifact, parent_speed, True))
    return Built(recipe.name, root, report, versions, default_name, summary)


def _build_reranker(
    recipe: Recipe,
    root: Path,
    *,
    limit_per_segment: int | None,
    say: Step,
    variants: bool = False,
    presets: dict[str, dict[str, Any]] | None = None,
    force: Sequence[str] = (),
    candidate_options: Mapping[str, Any] | None = None,
) -> Built:
    """A reranker's release up to registration: export, the pair contract (raises
    ContractViolation), its report attached; no calibration (it has no vectors). With
    ``variants``, :func:`run_pair_candidates` and the same registration rules as an
    embedding model's: approved variants are registered, a rejected one only when forced,
    and the fastest approved one becomes the default if it beats the parent."""
    artifact = export(recipe, root / "fp32", step=say, write=False)
    reference_dir, _ = recipe.source.resolve()
    report = pair_contract.validate(
        artifact, reference_dir=reference_dir, limit_per_segment=limit_per_segment, step=say
    )
    pair_contract.require_passed(report)
    artifact = with_parity(artifact, report)
    versions: list[tuple[str, Artifact, float | None, bool]] = []
    parent_speed: float | None = None
    default_name, summary = PARENT, None
    if variants:
        th = load_thresholds()
        timing = _pair_timing(candidate_options)
        candidates, speeds = run_pair_candidates(
            artifact,
            root / "variants",
            presets=presets,
            thresholds=th,
            limit_per_segment=limit_per_segment,
            say=say,
            write=False,
            **timing,
        )
        summary = candidates_summary(candidates, speeds, th)
        (root / "variants" / "summary.md").write_text(summary + "\n")
        parent_speed = speeds.get(PARENT)
        versions += stamped_candidates(candidates, force, th, say)
        best = pick_default(candidates, parent_speed)
        default_name = best.name if best else PARENT
    versions.insert(0, (PARENT, artifact, parent_speed, True))
    return Built(recipe.name, root, report, versions, default_name, summary)


def _pair_timing(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """:func:`run_pair_candidates`' keyword arguments from a variants config's candidate
    options: the timing ones. The evaluation bounds are the embedding corpus's, so one given
    for a reranker is refused by name rather than ignored (``--limit`` bounds its segments);
    ``retrieval`` (on by default) has no meaning for it and is dropped."""
    given = dict(options or {})
    given.pop("retrieval", None)
    if "speed_texts" in given:
        given["speed_pairs"] = given.pop("speed_texts")
    if unknown := sorted(set(given) - {"batch_size", "rounds", "speed_pairs"}):
        raise InvalidInput(
            f"a reranker's variants take no evaluation option {', '.join(unknown)} "
            "(its segments are bounded by --limit); keep only timing in --variants-config"
        )
    return given


@dataclass
class Built:
    """A release up to registration: versions exported, validated, gated, in ``root``. Their
    manifests are not written yet (``Artifact.written`` is False): :func:`publish` adds the
    records and writes each once."""

    name: str
    root: Path
    report: dict[str, Any]  # the fp32 validation report
    versions: list[tuple[str, Artifact, float | None, bool]]  # name, artifact, speed, approved
    default_name: str
    summary: str | None = None


def publish(
    built: Built,
    *,
    sign_key: Path | None = None,
    step: Step | None = None,
    bench: bool = True,
    perf_thresholds: perfgate.PerfThresholds | None = None,
    override_perf_gate: str | None = None,
) -> Release:
    """The performance gate, then records → sign → register, the default version last (so
    ``NAME:latest`` is it). A failed gate without ``override_perf_gate`` registers nothing
    and raises PerformanceRegression; ``built`` stays as it was (publish it again later)."""
    if override_perf_gate is not None and not override_perf_gate.strip():
        raise InvalidInput("--override-perf-gate needs the reason (it goes into the records)")
    say = step or (lambda _m: None)
    root, default_name, versions = built.root, built.default_name, built.versions
    # The default would become NAME:latest: measured against the current one first.
    default_art = next(art for name, art, _, _ in versions if name == default_name)
    decision = run_perf_gate(
        built.name,
        default_art,
        thresholds=perf_thresholds,
        override=override_perf_gate,
        say=say,
    )
    gate_files: dict[str, Path] = {}
    if decision.result is not None:
        gate_files["perf_gate"] = root / "records" / "perf-gate.json"
        gate_files["perf_gate"].parent.mkdir(parents=True, exist_ok=True)
        gate_files["perf_gate"].write_text(json.dumps(decision.result.as_dict(), indent=2) + "\n")
        say(decision.result.markdown())
    if decision.blocks:
        raise PerformanceRegression(
            f"{built.name}:latest stays {decision.baseline}: {decision.summary()}. Nothing "
            f"registered (artifacts and perf-gate.json under {root}); to release it anyway, "
            "pass --override-perf-gate REASON"
        )
    if decision.override:
        say(f"performance gate overridden: {decision.override}")

    # Records, then each manifest's one write, then the signature over it. The fp32 parent
    # goes first: its variants name its manifest as written.
    code = records.code_revision()
    written: dict[str, Artifact] = {}
    parent_ref: str | None = None
    for name, art, _, _ in sorted(versions, key=lambda v: v[0] != PARENT):
        say(f"release records for {name}" + (" (short benchmark, profile)" if bench else ""))
        files, perf = records.write_records(art, name, root / "records" / name, bench=bench)
        files["release"] = release_record(decision, default_name, code, root / "records" / name)
        if name == default_name:
            files.update(gate_files)
        perf.update(
            {
                "release.commit": code["commit"],
                "release.tree_clean": code["clean"],
                "release.perf_gate": decision.summary()[:200],
            }
        )
        updates: dict[str, Any] = {"performance": perf}
        if art.manifest.quantization.mode != "none" and art.manifest.parent is None:
            if parent_ref is None:
                raise ArtifactError(f"{name} names no parent and the release has no {PARENT}")
            updates["parent"] = parent_ref
        art = seal(with_records(art, files, updates))
        if name == PARENT:
            parent_ref = staging.parent_ref(art)
        if sign_key is not None:
            say(f"signing {name} with key {signing.sign(art.path, sign_key)}")
        written[name] = art

    # The default is registered last, so NAME:latest is it.
    registered: list[Registered] = []
    for name, _, speed, ok in sorted(versions, key=lambda v: v[0] == default_name):
        role = "default" if name == default_name else "candidate"
        say(f"registering {name} ({role})")
        tag = register(written[name], labels={"variant": name, "role": role})
        registered.append(Registered(name, tag, speed, ok))
    return Release(
        tag=registered[-1].tag,
        artifact=written[default_name],  # the default, registered last, with its records
        report=built.report,
        versions=registered,
        summary_markdown=built.summary,
    )
