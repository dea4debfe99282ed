"""The built image, run for real with podman: a container and the Kubernetes manifests.

These machines have no Docker and no cluster, but Debian's podman runs containers
(with runc and no default ulimits: ``build/image/containers.conf``, which
``scripts/build-image`` writes) and ``podman kube play`` runs a Deployment with its
ConfigMaps, volumes, security context and probes from Kubernetes YAML. It is not a
cluster: HPA, PDB and Service objects are not run (docs/deployment.md says what
the drill covers).

Containers join podman's private bridge network and are reached on their own IP
(nothing is published on the host's interfaces).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from embedkit.client import api
from embedkit.core.errors import BuildError, NotReady

CONTAINERS_CONF = Path("build") / "image" / "containers.conf"
# podman on these machines needs runc and no default ulimits (docs/bento.md); the same
# file scripts/build-image writes, so a clone that reuses an image needs no build first.
CONTAINERS_CONF_TEXT = '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n'
OVERLAY = Path("deploy") / "k8s" / "overlays" / "cpu"
TRUSTED_KEYS = "embedkit-trusted-keys"  # the ConfigMap the operator creates
# What `podman kube play` runs; the rest of a render (Service, HPA, PDB) needs a cluster.
PLAYABLE = {"Deployment", "ConfigMap", "Secret"}


def podman(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """One podman command with the project's containers.conf; a failure is one line."""
    exe = shutil.which("podman")
    if exe is None:
        raise BuildError("podman not installed (scripts/build-image installs it)")
    if not CONTAINERS_CONF.is_file():
        CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
        CONTAINERS_CONF.write_text(CONTAINERS_CONF_TEXT)
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF.resolve())}
    done = subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if check and done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"podman {args[0]} failed: {last}")
    return done


@dataclass(frozen=True)
class Running:
    """A started container: its name, where it answers, and when it became ready."""

    name: str
    url: str
    ready_s: float | None

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr


def container_ip(name: str) -> str:
    info = json.loads(podman("inspect", name).stdout)[0]
    networks = info["NetworkSettings"].get("Networks") or {}
    ips = [n["IPAddress"] for n in networks.values() if n.get("IPAddress")]
    ip = ips[0] if ips else info["NetworkSettings"].get("IPAddress")
    if not ip:
        raise BuildError(f"container {name} has no IP on a podman network")
    return str(ip)


# What the service logs when it refuses its model (a bad signature, a tampered file): the
# arbiter keeps the container running, but it will never be ready.
REFUSAL_LOG = "embedkit refuses to start"


def wait_ready(name: str, url: str, timeout_s: float) -> float | None:
    """Seconds until ``/readyz`` answers 200, or None if the container exits, logs that it
    refuses to start, or time runs out."""

    def stop(polls: int) -> str | None:
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        if not state.get("Running"):
            return "exited"
        if polls and polls % 4 == 0 and wait_for_log(name, REFUSAL_LOG, 0) is not None:
            return "refused to start"
        return None

    try:
        return api.wait_ready(url, timeout_s=timeout_s, interval_s=0.5, stop=stop)
    except NotReady:
        return None


def wait_for_log(name: str, needle: str, timeout_s: float) -> str | None:
    """The first log line of ``name`` containing ``needle``, waiting up to ``timeout_s``."""
    start = time.monotonic()
    while True:
        done = podman("logs", name, check=False)
        for line in (done.stdout + done.stderr).splitlines():
            if needle in line:
                return line
        if time.monotonic() - start >= timeout_s:
            return None
        time.sleep(1)


@contextmanager
def run_image(
    image: str,
    name: str,
    *,
    trusted_key: Path | None,
    mounts: dict[Path, str] | None = None,
    timeout_s: float = 120,
) -> Iterator[Running]:
    """Run ``image`` as the overlays do: read-only root, its non-root user, writable tmpfs
    for /tmp and BentoML's home, signatures required against ``trusted_key``."""
    args = ["run", "-d", "--name", name, "--read-only", "--cap-drop", "ALL"]
    args += ["--tmpfs", "/tmp:mode=1777", "--tmpfs", "/var/lib/bentoml:mode=1777"]
    args += ["-e", "BENTOML_HOME=/var/lib/bentoml"]
    if trusted_key is not None:
        args += ["-v", f"{trusted_key.resolve()}:/etc/embedkit/trusted-keys/release.pub:ro"]
        args += ["-e", "EMBEDKIT_REQUIRE_SIGNATURE=true"]
        args += ["-e", 'EMBEDKIT_TRUSTED_KEYS=["/etc/embedkit/trusted-keys/release.pub"]']
    for host, inside in (mounts or {}).items():
        args += ["-v", f"{Path(host).resolve()}:{inside}:ro"]
    podman("rm", "-f", name, check=False)
    podman(*args, image)
    try:
        url = f"http://{container_ip(name)}:3000"
        yield Running(name, url, wait_ready(name, url, timeout_s))
    finally:
        podman("rm", "-f", "-t", "5", name, check=False)


def render(kustomization: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of one directory: its documents (no cluster needed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise BuildError("kubectl not on PATH (it renders the kustomize overlays)")
    done = subprocess.run(
        [kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BuildError(f"kubectl kustomize {kustomization} failed: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def kube_manifest(
    image: str | None, trusted_key: Path, overlay: Path = OVERLAY, *, host_port: int | None = None
) -> str:
    """The overlay's render (``kubectl kustomize``), limited to what kube play runs, with the
    locally built image (None: the image the overlay pins, e.g. by digest) and the
    operator's trusted-key ConfigMap added. podman 4.3 publishes
    a containerPort on the host's same port when no hostPort is set, so two pods side by
    side (the drill's stable and canary) each need their own ``host_port``."""
    keep = [d for d in render(overlay) if d["kind"] in PLAYABLE]
    for dep in (d for d in keep if d["kind"] == "Deployment"):
        dep["spec"]["replicas"] = 1  # the HPA's job in a cluster
        for c in dep["spec"]["template"]["spec"]["containers"]:
            c["image"] = image or c["image"]
            c["imagePullPolicy"] = "Never"
            for port in c.get("ports", []) if host_port is not None else []:
                port["hostPort"] = host_port
    keep.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": TRUSTED_KEYS},
            "data": {"release.pub": Path(trusted_key).read_text()},
        }
    )
    return yaml.safe_dump_all(keep, sort_keys=False)


@dataclass(frozen=True)
class Played:
    pod: str
    container: str
    ip: str
    ready_s: float | None  # until the startup probe's endpoint answered 200
    probes: dict[str, int]  # probe kind -> HTTP status of its httpGet, as the kubelet sends it
    manifest: Path | None = None  # what was played: `podman kube down` of it removes the pod

    @property
    def url(self) -> str:
        return f"http://{self.ip}:3000"


def run_probes(manifest: str, ip: str) -> dict[str, int]:
    """Each probe of the Deployment's container, sent to the pod as the kubelet would (its
    path, its port resolved by name). podman 4.3 turns only the liveness probe into a
    healthcheck, and that one cannot run here: it writes the named port as 0, runs curl
    inside the image (there is none) and needs systemd timers."""
    dep = next(d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    out = {}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = (c.get(kind) or {}).get("httpGet")
        if get is None:
            continue
        port = ports.get(get["port"], get["port"])
        out[kind] = api.status(f"http://{ip}:{port}{get['path']}", timeout_s=3)
    return out


def deployment_pod(manifest: str) -> dict[str, Any]:
    """podman's record of the pod it runs for the manifest's Deployment (``<name>-pod``), so
    two plays (a stable and a canary render) are told apart; BuildError if none runs."""
    dep = next(d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Deployment")
    name = dep["metadata"]["name"]
    pods = json.loads(podman("pod", "ps", "--format", "json").stdout)
    for pod in pods:
        if pod["Name"] in (name, f"{name}-pod") or pod["Name"].startswith(f"{name}-pod-"):
            return dict(pod)
    raise BuildError(f"no pod of Deployment {name} runs (podman pod ps)")


@contextmanager
def kube_play(manifest: str, workdir: Path, *, timeout_s: float = 180) -> Iterator[Played]:
    """``podman kube play`` the manifest; yields the serving container; ``kube down`` after."""
    path = Path(workdir) / "kube-play.yaml"
    path.write_text(manifest)
    podman("kube", "down", str(path), check=False)
    try:
        podman("kube", "play", str(path), timeout=600)
        pod = deployment_pod(manifest)
        container = next(c["Names"] for c in pod["Containers"] if c["Id"] != pod["InfraId"])
        ip = container_ip(pod["InfraId"])  # the pod's network namespace is its infra's
        ready_s = wait_ready(container, f"http://{ip}:3000", timeout_s)
        yield Played(pod["Name"], container, ip, ready_s, run_probes(manifest, ip), path)
    finally:
        podman("kube", "down", str(path), check=False)
