"""The canary check: a candidate server against the stable one, before any user traffic.

``embedkit canary --stable URL --candidate URL`` sends the same fixed texts to both —
STS Benchmark test pairs from the vendored evaluation data (:mod:`embedkit.model.evaldata`)
plus long documents joined from its sentences — interleaved request by request in a
seeded random order, so a noisy machine slows both alike. Each side's served identity
(``/info`` and the ``X-Embedkit-Model`` header of every response, which must agree) decides
what the vectors must satisfy:

* the same version (name:version, variant, precision): identical within the fp32 HTTP
  tolerance (max |Δ| :data:`SAME_VERSION_MAX_ABS`);
* another ``index-compatible`` variant of the same model: the quality gate's limits
  (``config/quality-gate.yaml``: p1 cosine, top-10 neighbour overlap, STS Spearman drop);
* a ``reindex`` (or rejected) variant, or another model: no comparison can make it share
  the stable index — refused; it goes behind a separate Service with a re-index plan.

It also fails on any error response and when the candidate's p95 latency per request
exceeds ``max_p95_ratio`` × the stable's (default ``1 + p95_rise_max`` of
``config/perf-gate.yaml``). Promote on :attr:`CanaryResult.passed`, else roll back.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from embedkit.client import api
from embedkit.client.api import check_url
from embedkit.core.errors import InvalidInput
from embedkit.core.stats import percentile
from embedkit.model import evaldata
from embedkit.serve.engine.identity import ServedIdentity

if TYPE_CHECKING:
    from rich.table import Table

SAME_VERSION_MAX_ABS = 1e-4  # fp32 through HTTP JSON: what the HTTP tests hold the route to
LONG_MIN_WORDS = 180  # long documents reach the default model's 256-token limit
ROUTE = api.EMBED_PATH


@dataclass(frozen=True)
class TextSet:
    """The fixed texts: STS pairs (sentence1s then sentence2s, gold scores) and long documents."""

    first: list[str]
    second: list[str]
    gold: list[float]
    long: list[str]

    @classmethod
    def default(cls, pairs: int = 200, long: int = 8) -> TextSet:
        if pairs < 10 or long < 0:
            raise InvalidInput(
                f"need at least 10 STS pairs and no negative count ({pairs}, {long})"
            )
        chosen = evaldata.sts("test")[:pairs]
        return cls(
            [p.sentence1 for p in chosen],
            [p.sentence2 for p in chosen],
            [p.score for p in chosen],
            evaldata.long_texts(LONG_MIN_WORDS, long) if long else [],
        )

    @property
    def texts(self) -> list[str]:
        return [*self.first, *self.second, *self.long]


@dataclass
class Side:
    url: str
    identity: ServedIdentity | None = None
    vectors: dict[int, list[list[float]]] = field(default_factory=dict)  # batch index → rows
    seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class CanaryResult:
    stable: Side
    candidate: Side
    rule: str  # which comparison the candidate's class called for
    checks: list[tuple[str, str, bool]]  # (what, figure and limit, ok)
    refused: str | None = None  # why the candidate may not share the stable index at all

    @property
    def passed(self) -> bool:
        return self.refused is None and all(ok for _, _, ok in self.checks)

    @property
    def reasons(self) -> list[str]:
        out = [self.refused] if self.refused else []
        return out + [f"{what}: {figure}" for what, figure, ok in self.checks if not ok]


def rule_for(stable: ServedIdentity, candidate: ServedIdentity) -> tuple[str, str | None]:
    """(the comparison the candidate's class calls for, or why it may not share the index)."""
    separate = "promote it only behind a separate Service, with a plan to re-index"
    if candidate.name != stable.name:
        return "refused", f"another model ({candidate.tag} vs {stable.tag}): {separate}"
    same = (candidate.tag, candidate.variant, candidate.precision) == (
        stable.tag,
        stable.variant,
        stable.precision,
    )
    if same:
        return "same version: identical vectors", None
    for side, who in ((candidate, "candidate"), (stable, "stable")):
        if side.compatibility != "index-compatible":
            return "refused", (
                f"the {who} serves {side.variant} of class {side.compatibility}: its vectors "
                f"do not share an index with the other's; {separate}"
            )
    return "index-compatible variant: the quality gate's limits", None


def _post(client: api.Client, side: Side, index: int, batch: list[str]) -> None:
    started = time.perf_counter()
    try:
        response = client.embed(batch, path=ROUTE, check=False)
    except api.HTTPError as exc:
        side.errors.append(f"batch {index}: {type(exc).__name__}: {exc}")
        return
    side.seconds.append(time.perf_counter() - started)
    if response.status_code != 200:
        side.errors.append(f"batch {index}: HTTP {response.status_code} {response.text[:120]}")
        return
    header = api.served_header(response)
    if side.identity is not None and header != side.identity.header_value():
        side.errors.append(f"batch {index}: answered as {header!r}, /info said otherwise")
    side.vectors[index] = response.json()["embeddings"]


def run_canary(
    stable_url: str,
    candidate_url: str,
    *,
    texts: TextSet | None = None,
    batch_size: int = 16,
    max_p95_ratio: float | None = None,
    seed: int = 0,
    timeout_s: float = 120.0,
) -> CanaryResult:
    """Both servers, the same texts, interleaved; the verdict (see the module docstring)."""
    from embedkit.quality.gate import load_thresholds
    from embedkit.release import perfgate

    stable = Side(check_url(stable_url, "--stable"))
    candidate = Side(check_url(candidate_url, "--candidate"))
    if max_p95_ratio is None:
        max_p95_ratio = 1 + perfgate.load_thresholds().p95_rise_max
    texts = texts or TextSet.default()
    corpus = texts.texts
    batches = [corpus[i : i + batch_size] for i in range(0, len(corpus), batch_size)]
    rng = random.Random(seed)
    with (
        api.Client(stable.url, timeout_s=timeout_s) as to_stable,
        api.Client(candidate.url, timeout_s=timeout_s) as to_candidate,
    ):
        sides = ((stable, to_stable), (candidate, to_candidate))
        for side, client in sides:
            side.identity = client.info_identity()
        assert stable.identity is not None and candidate.identity is not None
        rule, refused = rule_for(stable.identity, candidate.identity)
        for _, client in sides:  # warm-up, untimed: first calls allocate arenas
            client.embed(batches[0], path=ROUTE, check=False)
        for index, batch in enumerate(batches):
            for side, client in rng.sample(sides, 2):
                _post(client, side, index, batch)
    checks: list[tuple[str, str, bool]] = []
    for side, who in ((stable, "stable"), (candidate, "candidate")):
        checks.append(
            (f"errors ({who})", f"{len(side.errors)} of {len(batches)} requests", not side.errors)
        )
    if stable.seconds and candidate.seconds:
        p95 = {w: percentile(s.seconds, 95) * 1000 for w, s in (("s", stable), ("c", candidate))}
        ratio = p95["c"] / p95["s"]
        checks.append(
            (
                "p95 latency per request",
                f"candidate {p95['c']:.1f} ms / stable {p95['s']:.1f} ms = {ratio:.2f} "
                f"(limit {max_p95_ratio:.2f})",
                ratio <= max_p95_ratio,
            )
        )
    complete = len(stable.vectors) == len(candidate.vectors) == len(batches)
    if refused is None and complete:
        a = np.array([v for i in range(len(batches)) for v in stable.vectors[i]], dtype=np.float32)
        b = np.array(
            [v for i in range(len(batches)) for v in candidate.vectors[i]], dtype=np.float32
        )
        if a.shape != b.shape:
            refused = f"vector shapes differ ({a.shape[1]} vs {b.shape[1]} dimensions)"
        elif rule.startswith("same version"):
            diff = float(np.abs(a - b).max())
            checks.append(
                (
                    "max |Δ| per coordinate",
                    f"{diff:.2e} (limit {SAME_VERSION_MAX_ABS:.0e})",
                    diff <= SAME_VERSION_MAX_ABS,
                )
            )
        else:
            checks += _gate_checks(a, b, texts, load_thresholds())
    return CanaryResult(stable, candidate, rule, checks, refused)


def _gate_checks(
    stable: np.ndarray, candidate: np.ndarray, texts: TextSet, th: Any
) -> list[tuple[str, str, bool]]:
    """The quality gate's limits on the canary's texts, the stable's vectors as reference."""
    from scipy.stats import spearmanr

    from embedkit.quality.evaluate import cosine_stats, neighbour_overlap

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    a, b = unit(stable), unit(candidate)
    n = len(texts.first)
    p1 = cosine_stats(b, a).p1
    overlap = neighbour_overlap(b[:n], b[n : 2 * n], a[:n], a[n : 2 * n])
    gold = np.array(texts.gold)

    def rho(x: np.ndarray) -> float:
        return float(spearmanr(np.sum(x[:n] * x[n : 2 * n], axis=1), gold).statistic) * 100

    drop = rho(a) - rho(b)
    limit = th.spearman_drop_max.get("stsb")
    checks = [
        ("p1 cosine to stable", f"{p1:.5f} (limit >= {th.cosine_p1_min})", p1 >= th.cosine_p1_min),
        (
            "top-10 neighbour overlap",
            f"{overlap:.3f} (limit >= {th.overlap_min})",
            overlap >= th.overlap_min,
        ),
    ]
    if limit is not None:
        checks.append(
            ("STS Spearman drop (points)", f"{drop:.2f} (limit <= {limit})", drop <= limit)
        )
    return checks


def report_lines(result: CanaryResult) -> list[tuple[str, str, str]]:
    """(what, stable, candidate) rows for the one-screen report."""
    rows = []
    for field_name in ("tag", "variant", "compatibility", "precision", "provider", "isa"):
        s, c = result.stable.identity, result.candidate.identity
        rows.append(
            (
                field_name,
                str(getattr(s, field_name, "?")),
                str(getattr(c, field_name, "?")),
            )
        )
    return rows


def canary_tables(result: CanaryResult) -> list[Table]:
    """The canary's identities side by side, then its checks (`canary`, `rollback-drill`)."""
    from rich.table import Table

    table = Table(title=f"embedkit canary — {result.rule}", title_justify="left")
    for column in ("", f"stable {result.stable.url}", f"candidate {result.candidate.url}"):
        table.add_column(column, overflow="fold")
    for row in report_lines(result):
        table.add_row(*row)
    checks = Table(show_header=False, box=None)
    if result.refused:
        checks.add_row("[red]REFUSED[/red]", result.refused)
    for what, figure, ok in result.checks:
        checks.add_row("[green]ok[/green]" if ok else "[red]FAIL[/red]", f"{what}: {figure}")
    for side in (result.stable, result.candidate):
        for error in side.errors[:3]:
            checks.add_row("[red]error[/red]", f"{side.url}: {error}")
    return [table, checks]
