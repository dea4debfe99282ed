"""The rollback drill: a stable and a candidate release deployed, compared, rolled back.

``embedkit rollback-drill --stable TAG --candidate TAG`` (``scripts/rollback-drill``) runs
the playbook's canary-then-rollback path on this machine with the container setup of
:mod:`embedkit.deploy.container`:

1. the CPU image of each release (``scripts/build-image`` on a Bento pinned to it), or the
   one a previous drill built (``--reuse-image``);
2. ``podman kube play`` of the rendered manifests: the stable on ``overlays/cpu``, the
   candidate on ``overlays/canary``, each with the operator's trusted-key ConfigMap;
3. the canary check (:func:`embedkit.deploy.canary.run_canary`, what ``embedkit canary``
   runs) against the two pods; its verdict is reported, and the drill rolls back either way;
4. the rollback row of the playbook, ``kubectl delete -k overlays/canary``, as podman does it:
   ``podman kube down`` of the candidate's render;
5. every pod still running answers with the stable version in its ``X-Embedkit-Model``
   header, and the candidate's pod (and its address) no longer answers. ``kube play`` runs
   no Service, so this is checked pod by pod, not through a Service's routing.

The drill passes only if every step did what it should. It is a long run (image builds
take minutes), documented in docs/deployment.md, not a CI test.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embedkit.client import api
from embedkit.core.errors import BuildError, EmbedkitError, InvalidInput
from embedkit.deploy import bento, container
from embedkit.deploy.canary import CanaryResult, TextSet, run_canary
from embedkit.release.records import code_revision
from embedkit.serve.engine.identity import HEADER, ServedIdentity

STEPS = (
    "images",
    "play stable (overlays/cpu)",
    "play candidate (overlays/canary)",
    "canary check",
    "roll back (podman kube down overlays/canary)",
    "only the stable version answers",
)
OVERLAYS = Path("deploy") / "k8s" / "overlays"
IMAGES_RECORD = "images.json"  # model tag -> image a drill built, for --reuse-image
PROBE_TEXT = "rollback drill"
# What a step may meet besides our own errors; each ends the drill as that step's failure.
FAILURES = (OSError, subprocess.SubprocessError, api.HTTPError)


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class Drill:
    """What a drill did, step by step, and where it ran."""

    stable: str
    candidate: str
    started: str
    code: dict[str, Any]
    machine: str
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0
    canary: CanaryResult | None = None

    @property
    def passed(self) -> bool:
        return len(self.steps) == len(STEPS) and all(s.ok for s in self.steps)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "canary"}
        out["passed"] = self.passed
        if self.canary is not None:
            out["canary"] = {
                "rule": self.canary.rule,
                "passed": self.canary.passed,
                "reasons": self.canary.reasons,
            }
        return out


def check_tags(stable: str, candidate: str) -> None:
    """Two exact versions of one model; else a one-line InvalidInput."""
    for option, tag in (("--stable", stable), ("--candidate", candidate)):
        name, sep, version = tag.partition(":")
        if not (name and sep and version) or version == "latest" or ":" in version:
            raise InvalidInput(
                f"{option}: {tag!r} is not an exact model version (NAME:VERSION, not :latest)"
            )
    if stable == candidate:
        raise InvalidInput(f"--stable and --candidate are the same version ({stable})")
    if stable.partition(":")[0] != candidate.partition(":")[0]:
        raise InvalidInput(
            f"{stable} and {candidate} are different models: a rollback drill needs two "
            "versions of one model (another model is a re-index, not a rollout)"
        )


def only_stable_answers(
    stable: str, answers: dict[str, str | None], candidate_pod: str | None
) -> tuple[bool, str]:
    """The last step's verdict on what was recorded: ``answers`` maps each pod still running
    (and the candidate's former address) to its ``X-Embedkit-Model`` header, None if it
    gave no answer; ``candidate_pod`` is the candidate's pod if podman still lists it."""
    lines, ok = [], True
    if candidate_pod is not None:
        ok = False
        lines.append(f"the candidate's pod {candidate_pod} still runs")
    answering = {k: v for k, v in answers.items() if v is not None}
    if not answering:
        ok = False
        lines.append("no pod answered")
    for where, header in answers.items():
        if header is None:
            lines.append(f"{where}: no answer")
            continue
        try:
            tag = ServedIdentity.from_header(header).tag
        except ValueError:
            ok = False
            lines.append(f"{where}: not an {HEADER} header: {header!r}")
            continue
        if tag != stable:
            ok = False
        lines.append(f"{where}: {HEADER}: {tag}" + ("" if tag == stable else " (NOT stable)"))
    return ok, "; ".join(lines)


def machine() -> str:
    done = container.podman("version", "--format", "{{.Client.Version}}", check=False)
    return (
        f"{platform.node()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"podman {done.stdout.strip() or '?'}"
    )


def build_image(model_tag: str, workdir: Path, *, reuse: bool) -> tuple[str, str]:
    """(image reference, how it came) for the CPU image serving ``model_tag``."""
    record = workdir / IMAGES_RECORD
    images: dict[str, str] = json.loads(record.read_text()) if record.is_file() else {}
    known = images.get(model_tag)
    if reuse and known and container.podman("image", "exists", known, check=False).returncode == 0:
        return known, "reused"
    built = bento.build("cpu", model_tag, workdir / "bento" / model_tag.replace(":", "-"))
    if built.warnings:  # unsigned: the overlays' pods would refuse to start
        raise BuildError(f"{model_tag}: " + "; ".join(built.warnings))
    done = subprocess.run(
        ["scripts/build-image", "--bento-tag", built.tag],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"scripts/build-image --bento-tag {built.tag}: {last}")
    ref = done.stdout.strip().splitlines()[-1]
    images[model_tag] = ref
    record.write_text(json.dumps(images, indent=2) + "\n")
    return ref, f"built from {built.tag}"


def free_port() -> int:
    """A TCP port free on this host now (podman publishes each pod's port on the host)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def served_header(url: str) -> str | None:
    """The ``X-Embedkit-Model`` header of one embedding request to ``url``; None if none."""
    try:
        with api.Client(url, timeout_s=30) as client:
            response = client.embed([PROBE_TEXT], check=False)
    except api.HTTPError:
        return None
    return api.served_header(response)


def _running(manifest: str) -> dict[str, Any] | None:
    try:
        return container.deployment_pod(manifest)
    except BuildError:
        return None


def _pod_ok(played: container.Played, want: str) -> tuple[bool, str]:
    header = served_header(played.url) if played.ready_s is not None else None
    tag = ServedIdentity.from_header(header).tag if header else None
    ready = "never ready" if played.ready_s is None else f"ready in {played.ready_s:.0f} s"
    ok = played.ready_s is not None and set(played.probes.values()) == {200} and tag == want
    probes = ", ".join(f"{k.removesuffix('Probe')} {v}" for k, v in played.probes.items())
    return ok, f"pod {played.pod} at {played.ip}, {ready}; probes {probes}; {HEADER}: {tag}"


@contextmanager
def _step(drill: Drill, name: str) -> Iterator[list[tuple[bool, str]]]:
    """Time one step; the body appends its (ok, detail); an error of ours fails it and
    ends the drill (the teardown still runs)."""
    started = time.monotonic()
    got: list[tuple[bool, str]] = []
    try:
        yield got
    except EmbedkitError as exc:
        got.append((False, exc.message))
        raise
    except FAILURES as exc:
        got.append((False, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        ok, detail = got[-1] if got else (False, "did not finish")
        drill.steps.append(Step(name, ok, detail, time.monotonic() - started))


def run_drill(
    stable: str,
    candidate: str,
    trusted_key: Path,
    workdir: Path,
    *,
    reuse_image: bool = False,
    ready_timeout_s: float = 240,
    texts: TextSet | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Drill:
    """The drill (module docstring); every pod it played is gone when it returns."""
    check_tags(stable, candidate)
    if not trusted_key.is_file():
        raise InvalidInput(f"--trusted-key: {trusted_key} is not a file")
    workdir.mkdir(parents=True, exist_ok=True)
    drill = Drill(
        stable,
        candidate,
        datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        code_revision(Path.cwd()),
        machine(),
    )
    started = time.monotonic()
    try:
        _run(drill, trusted_key, workdir, reuse_image, ready_timeout_s, texts, progress)
    except (EmbedkitError, *FAILURES):
        pass  # recorded in its step; the drill did not pass
    drill.seconds = time.monotonic() - started
    return drill


def _run(
    drill: Drill,
    key: Path,
    workdir: Path,
    reuse: bool,
    ready_s: float,
    texts: TextSet | None,
    progress: Callable[[str], None],
) -> None:
    manifests = {}
    with _step(drill, STEPS[0]) as got:
        refs = {}
        for role, tag in (("stable", drill.stable), ("candidate", drill.candidate)):
            progress(f"image for the {role} {tag}")
            refs[role], how = build_image(tag, workdir, reuse=reuse)
            refs[role + " how"] = how
        for role, overlay in (("stable", "cpu"), ("candidate", "canary")):
            manifests[role] = container.kube_manifest(
                refs[role], key, OVERLAYS / overlay, host_port=free_port()
            )
            if (pod := _running(manifests[role])) is not None:
                raise BuildError(
                    f"pod {pod['Name']} already runs (another drill or test?); "
                    "`podman kube down` it first"
                )
        got.append(
            (
                True,
                f"stable {refs['stable']} ({refs['stable how']}); "
                f"candidate {refs['candidate']} ({refs['candidate how']})",
            )
        )
    with ExitStack() as stack:
        played = {}
        for step, role, tag in ((1, "stable", drill.stable), (2, "candidate", drill.candidate)):
            with _step(drill, STEPS[step]) as got:
                progress(f"kube play of the {role}")
                where = workdir / role
                where.mkdir(exist_ok=True)
                played[role] = stack.enter_context(
                    container.kube_play(manifests[role], where, timeout_s=ready_s)
                )
                got.append(_pod_ok(played[role], tag))
            if not drill.steps[-1].ok:
                return
        with _step(drill, STEPS[3]) as got:
            progress("canary check")
            result = run_canary(played["stable"].url, played["candidate"].url, texts=texts)
            drill.canary = result
            assert result.stable.identity and result.candidate.identity
            seen = (result.stable.identity.tag, result.candidate.identity.tag)
            verdict = "PROMOTE" if result.passed else "ROLL BACK: " + "; ".join(result.reasons)
            got.append(
                (
                    seen == (drill.stable, drill.candidate),
                    f"{result.rule}; /info: {seen[0]} vs {seen[1]}; verdict {verdict} "
                    "(the drill rolls back either way)",
                )
            )
        with _step(drill, STEPS[4]) as got:
            progress("roll back")
            down = played["candidate"].manifest
            assert down is not None
            done = container.podman("kube", "down", str(down), check=False)
            left = _running(manifests["candidate"])
            got.append(
                (
                    done.returncode == 0 and left is None,
                    f"podman kube down {down.name}: exit {done.returncode}; "
                    + (f"pod {left['Name']} still listed" if left else "candidate pod gone"),
                )
            )
        with _step(drill, STEPS[5]) as got:
            progress("pod by pod")
            answers: dict[str, str | None] = {}
            for role in ("stable", "candidate"):
                pod = _running(manifests[role])
                if pod is not None:
                    url = f"http://{container.container_ip(pod['InfraId'])}:3000"
                    answers[f"pod {pod['Name']}"] = served_header(url)
            gone = played["candidate"]
            answers[f"candidate's former address {gone.ip}"] = served_header(gone.url)
            left = _running(manifests["candidate"])
            ok, detail = only_stable_answers(drill.stable, answers, left["Name"] if left else None)
            got.append((ok, detail + " (kube play runs no Service: checked pod by pod)"))
