"""Kubernetes manifests: rendered offline, schema-validated, invariants checked.

Every overlay under deploy/k8s is rendered with ``kubectl kustomize`` (kubectl is part
of the machine image CI runs on; a missing kubectl fails loudly instead of skipping),
each document is validated against the Kubernetes OpenAPI schemas shipped in
``kubernetes-validate`` in strict mode (unknown fields fail), and the deployment
invariants are checked by small functions that each return a list of problems. The
mutation tests at the bottom feed broken copies of the real render to those functions:
every invariant check is shown to fail on the defect it exists for.

Nothing here talks to a cluster; what that leaves unverified is in docs/deployment.md.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import httpx
import kubernetes_validate
import pytest
import typer
import yaml
from pydantic import ValidationError
from pydantic_settings import SettingsError

from embedkit.core.settings import Settings
from embedkit.deploy import pools, supply
from embedkit.model import toolchain

OVERLAYS = ("cpu", "gpu", "canary")
# Oldest Kubernetes we support (preStop `sleep` is GA-on-by-default from 1.30) and the
# newest whose schemas kubernetes-validate 1.37.0 ships.
K8S_VERSIONS = ("1.31", "1.37")
HTTP_PORT = 3000
TRACK = "embedkit.dev/track"
SHARE = "embedkit.dev/canary-share-percent"
GPU = "nvidia.com/gpu"

Doc = dict[str, Any]
Check = Callable[[list[Doc]], list[str]]


# --- rendering ----------------------------------------------------------------------


def render(directory: Path) -> list[Doc]:
    """``kubectl kustomize`` one kustomization into its documents (no cluster needed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl not on PATH: it is part of the CI machine image (kustomize v5 built in)"
        )
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def k8s(pytestconfig: pytest.Config) -> Path:
    """The manifests: deploy/k8s of the project (pytest's root directory)."""
    return pytestconfig.rootpath / "deploy" / "k8s"


@pytest.fixture(scope="module")
def rendered(k8s: Path) -> dict[str, list[Doc]]:
    out = {name: render(k8s / "overlays" / name) for name in OVERLAYS}
    out["base"] = render(k8s / "base")
    return out


def deployment_sets(rendered: dict[str, list[Doc]]) -> dict[str, list[Doc]]:
    """What actually runs together: the canary is applied beside the cpu overlay."""
    return {
        "cpu": rendered["cpu"],
        "gpu": rendered["gpu"],
        "cpu+canary": rendered["cpu"] + rendered["canary"],
    }


# --- small helpers ------------------------------------------------------------------


def ident(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc, Doc]]:
    """(workload, pod spec, container) for every container of every Deployment and Job."""
    for dep in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
        pod = dep["spec"]["template"]["spec"]
        for c in pod.get("containers", []):
            yield dep, pod, c


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (cores for CPU, bytes for memory)."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * suffixes[suffix]
    return float(text)


def container_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps, then explicit env (which wins)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        if ref is not None:
            env.update(maps.get(ref, {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def settings_from(env: dict[str, str]) -> Settings:
    """The real Settings object the pod would build from this environment."""
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings()


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def port_number(container: Doc, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    return None


def under(path: str, mounts: list[str]) -> bool:
    return any(PurePosixPath(path).is_relative_to(m) for m in mounts)


# --- invariant checks: each returns the problems it found ------------------------------


def check_images(docs: list[Doc]) -> list[str]:
    """Every image names a registry path and a sha256 digest: a tag, even a pinned one, can be
    moved to other bytes (`embedkit image pin` writes the signed record's digest)."""
    problems = []
    for dep, _, c in containers(docs):
        image = c.get("image", "")
        name, at, digest = image.partition("@")
        if not at:
            problems.append(f"{ident(dep)}: image {image!r} is a mutable tag, not a digest")
        elif not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            problems.append(f"{ident(dep)}: image {image!r} has a malformed digest")
        if "/" not in name:
            problems.append(f"{ident(dep)}: image {image!r} has no registry path")
    return problems


def check_probes(docs: list[Doc]) -> list[str]:
    """Liveness /livez, readiness /readyz and a startup probe, all HTTP on port 3000."""
    problems = []
    want = {"livenessProbe": "/livez", "readinessProbe": "/readyz", "startupProbe": None}
    for dep, _, c in containers(docs):
        for probe, path in want.items():
            get = c.get(probe, {}).get("httpGet")
            if get is None:
                problems.append(f"{ident(dep)}: {probe} missing (or not an HTTP probe)")
                continue
            if path is not None and get.get("path") != path:
                problems.append(f"{ident(dep)}: {probe} path {get.get('path')!r}, want {path}")
            if port_number(c, get.get("port", "")) != HTTP_PORT:
                problems.append(
                    f"{ident(dep)}: {probe} port {get.get('port')!r} is not {HTTP_PORT}"
                )
    return problems


def check_security(docs: list[Doc]) -> list[str]:
    """Non-root, read-only root, no escalation, no capabilities, no API token."""
    problems = []
    for dep, pod, c in containers(docs):
        who = ident(dep)
        pod_sc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{who}: runAsNonRoot is not true")
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if uid is None or uid == 0:
            problems.append(f"{who}: runAsUser must be set and non-zero (got {uid!r})")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{who}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{who}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{who}: privileged container")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{who}: capabilities do not drop ALL")
        if sc.get("capabilities", {}).get("add"):
            problems.append(f"{who}: capabilities added")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{who}: automountServiceAccountToken is not false")
        if pod.get("enableServiceLinks") is not False:
            problems.append(
                f"{who}: enableServiceLinks is not false (EMBEDKIT_PORT-style collisions)"
            )
    return problems


# Made by the operator from their release key's public half (docs/deployment.md), never
# shipped in the manifests: a committed key would be a placeholder or someone else's key.
USER_CREATED_KEYS = {"embedkit-trusted-keys"}


def check_resources(docs: list[Doc]) -> list[str]:
    """CPU and memory requests and limits set, requests not above limits."""
    problems = []
    for dep, _, c in containers(docs):
        res = c.get("resources", {})
        for kind in ("cpu", "memory"):
            req, lim = res.get("requests", {}).get(kind), res.get("limits", {}).get(kind)
            if req is None or lim is None:
                problems.append(f"{ident(dep)}: {kind} request and limit must both be set")
            elif quantity(req) > quantity(lim):
                problems.append(f"{ident(dep)}: {kind} request {req} above limit {lim}")
    return problems


def check_config(docs: list[Doc]) -> list[str]:
    """EMBEDKIT_* keys are real settings, parse, and the referenced ConfigMaps exist."""
    problems = []
    names = {d["metadata"]["name"] for d in of_kind(docs, "ConfigMap")}
    for dep, pod, c in containers(docs):
        refs = [s["configMapRef"]["name"] for s in c.get("envFrom", []) if "configMapRef" in s]
        refs += [v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v]
        problems += [
            f"{ident(dep)}: ConfigMap {r} is not in the render"
            for r in refs
            if r not in names | USER_CREATED_KEYS
        ]
        env = container_env(docs, c)
        for key in env:
            field = key.removeprefix("EMBEDKIT_").lower()
            if key.startswith("EMBEDKIT_") and field not in Settings.model_fields:
                problems.append(f"{ident(dep)}: {key} is not a setting (silently ignored)")
        try:
            settings_from(env)
        except (ValidationError, SettingsError) as exc:
            first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            problems.append(f"{ident(dep)}: settings do not parse: {first}")
    return problems


def check_threads(docs: list[Doc]) -> list[str]:
    """ORT threads x workers and the tokenizer pool match the CPU limit (no oversubscription)."""
    problems = []
    for dep, _, c in containers(docs):
        cpu = c.get("resources", {}).get("limits", {}).get("cpu")
        env = container_env(docs, c)
        if cpu is None or "EMBEDKIT_INTRA_OP_THREADS" not in env:
            problems.append(f"{ident(dep)}: CPU limit or EMBEDKIT_INTRA_OP_THREADS not set")
            continue
        s = settings_from(env)
        if s.intra_op_threads * s.workers != quantity(cpu):
            problems.append(
                f"{ident(dep)}: intra-op threads {s.intra_op_threads} x workers {s.workers} "
                f"!= CPU limit {cpu}"
            )
        if env.get("RAYON_NUM_THREADS") != str(s.intra_op_threads):
            problems.append(f"{ident(dep)}: RAYON_NUM_THREADS != intra-op threads")
    return problems


def check_writable_paths(docs: list[Doc]) -> list[str]:
    """Every path the server writes lies on an emptyDir mount, or a claim the render holds
    (the TensorRT cache, gpu), since the root is read-only."""
    problems = []
    claims = {d["metadata"]["name"] for d in of_kind(docs, "PersistentVolumeClaim")}
    for dep, pod, c in containers(docs):
        scratch = {
            v["name"]
            for v in pod.get("volumes", [])
            if "emptyDir" in v or v.get("persistentVolumeClaim", {}).get("claimName") in claims
        }
        mounts = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in scratch]
        env = container_env(docs, c)
        s = settings_from(env)
        paths = {"/tmp": "/tmp", "BENTOML_HOME": env.get("BENTOML_HOME", "/home/bentoml")}
        paths["trt_engine_cache_dir"] = str(s.trt_engine_cache_dir)
        for setting in ("profiling_dir", "optimized_model_path"):
            if getattr(s, setting) is not None:
                paths[setting] = str(getattr(s, setting))
        for what, path in paths.items():
            if not under(path, mounts):
                problems.append(f"{ident(dep)}: {what} ({path}) is not on a writable emptyDir")
    return problems


def check_signature(docs: list[Doc]) -> list[str]:
    """Signature verification on; every trusted key is mounted from the ConfigMap/Secret the
    operator creates, and nothing rendered carries a private key or a trusted key."""
    files: dict[str, dict[str, str]] = {}
    for d in of_kind(docs, "ConfigMap"):
        files[d["metadata"]["name"]] = d.get("data", {})
    for d in of_kind(docs, "Secret"):
        files[d["metadata"]["name"]] = {
            k: base64.b64decode(v).decode(errors="replace") for k, v in d.get("data", {}).items()
        } | d.get("stringData", {})
    problems = [
        f"ConfigMap or Secret {name}: carries a private key"
        for name, data in files.items()
        if "PRIVATE KEY" in json.dumps(data)
    ]
    for dep, pod, c in containers(docs):
        s = settings_from(container_env(docs, c))
        if not s.require_signature:
            problems.append(f"{ident(dep)}: EMBEDKIT_REQUIRE_SIGNATURE is not true")
        if not s.trusted_keys:
            problems.append(f"{ident(dep)}: no EMBEDKIT_TRUSTED_KEYS")
        sources = {}
        for v in pod.get("volumes", []):
            ref = v.get("configMap", v.get("secret", {}))
            sources[v["name"]] = (ref.get("name", ref.get("secretName")), ref.get("optional"))
        mounted = {m["mountPath"]: sources.get(m["name"]) for m in c.get("volumeMounts", [])}
        for key in s.trusted_keys:
            if not key.startswith("/"):
                continue  # inline base64 key: nothing to mount
            name, optional = mounted.get(str(PurePosixPath(key).parent)) or (None, None)
            if name not in USER_CREATED_KEYS:
                problems.append(
                    f"{ident(dep)}: trusted key {key} is not mounted from the operator's "
                    f"{sorted(USER_CREATED_KEYS)}"
                )
            elif name in files:
                problems.append(f"{ident(dep)}: the manifests ship trusted key {name}")
            elif optional:
                problems.append(f"{ident(dep)}: trusted keys {name} marked optional")
    return problems


def check_autoscaling(docs: list[Doc]) -> list[str]:
    """One autoscaling/v2 CPU HPA per Deployment, targeting it; the HPA owns replicas."""
    problems = []
    deployments = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    targeted: dict[str, int] = {}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if hpa["apiVersion"] != "autoscaling/v2":
            problems.append(f"{ident(hpa)}: not autoscaling/v2")
        if ref.get("kind") != "Deployment" or ref.get("name") not in deployments:
            problems.append(
                f"{ident(hpa)}: targets {ref.get('kind')}/{ref.get('name')}, not a Deployment here"
            )
        targeted[ref.get("name")] = targeted.get(ref.get("name"), 0) + 1
        cpu = [
            m
            for m in hpa["spec"].get("metrics", [])
            if m.get("type") == "Resource"
            and m["resource"]["name"] == "cpu"
            and m["resource"]["target"]["type"] == "Utilization"
        ]
        if not cpu:
            problems.append(f"{ident(hpa)}: no CPU utilisation metric")
    for dep in of_kind(docs, "Deployment"):
        name = dep["metadata"]["name"]
        if targeted.get(name, 0) != 1:
            problems.append(f"{ident(dep)}: targeted by {targeted.get(name, 0)} HPAs, want 1")
        if "replicas" in dep["spec"]:
            problems.append(f"{ident(dep)}: sets replicas although an HPA owns them")
    return problems


def check_traffic(docs: list[Doc]) -> list[str]:
    """A Service on 3000 and a PDB select every Deployment's pods."""
    problems = []
    services, pdbs = of_kind(docs, "Service"), of_kind(docs, "PodDisruptionBudget")
    for dep, _, c in containers(docs):
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        served = [
            s
            for s in services
            if selects(s["spec"].get("selector", {}), labels)
            and any(
                p["port"] == HTTP_PORT
                and port_number(c, p.get("targetPort", p["port"])) == HTTP_PORT
                for p in s["spec"]["ports"]
            )
        ]
        if not served:
            problems.append(f"{ident(dep)}: no Service on port {HTTP_PORT} selects its pods")
        if not any(selects(p["spec"]["selector"].get("matchLabels", {}), labels) for p in pdbs):
            problems.append(f"{ident(dep)}: no PodDisruptionBudget selects its pods")
    return problems


def check_metrics_scrape(docs: list[Doc]) -> list[str]:
    """Prometheus scrape annotations on the pod template, pointing at /metrics on 3000."""
    want = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(HTTP_PORT),
        "prometheus.io/path": "/metrics",
    }
    problems = []
    for dep in of_kind(docs, "Deployment"):
        notes = dep["spec"]["template"]["metadata"].get("annotations", {})
        problems += [
            f"{ident(dep)}: annotation {k}={notes.get(k)!r}, want {v!r}"
            for k, v in want.items()
            if notes.get(k) != v
        ]
    return problems


COMMON_CHECKS: tuple[Check, ...] = (
    check_images,
    check_probes,
    check_security,
    check_resources,
    check_config,
    check_threads,
    check_writable_paths,
    check_signature,
    check_autoscaling,
    check_traffic,
    check_metrics_scrape,
)


def check_cpu(docs: list[Doc]) -> list[str]:
    """CPU overlay: CPU provider only, no GPU requested."""
    problems = []
    for dep, _, c in containers(docs):
        s = settings_from(container_env(docs, c))
        if s.providers != ["CPUExecutionProvider"] or s.gpu:
            problems.append(
                f"{ident(dep)}: CPU deployment with providers {s.providers}, gpu={s.gpu}"
            )
        if GPU in c.get("resources", {}).get("limits", {}):
            problems.append(f"{ident(dep)}: CPU deployment requests a GPU")
    return problems


def check_gpu(docs: list[Doc]) -> list[str]:
    """GPU overlay: a GPU limit, GPU nodes only, GPU providers first and no silent fallback."""
    problems = []
    for dep, pod, c in containers(docs):
        who = ident(dep)
        if int(c.get("resources", {}).get("limits", {}).get(GPU, 0)) < 1:
            problems.append(f"{who}: no {GPU} limit")
        if not any(t.get("key") == GPU for t in pod.get("tolerations", [])):
            problems.append(f"{who}: no toleration for {GPU} taints")
        if not pod.get("nodeSelector") and not pod.get("affinity", {}).get("nodeAffinity"):
            problems.append(f"{who}: no nodeSelector/nodeAffinity for GPU nodes")
        s = settings_from(container_env(docs, c))
        want = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        if s.providers != want:
            problems.append(f"{who}: providers {s.providers}, want {want}")
        if not (s.gpu and s.strict_providers):
            problems.append(f"{who}: EMBEDKIT_GPU and EMBEDKIT_STRICT_PROVIDERS must be true")
        # Engines take minutes to build: their cache must outlive the pod and be shared.
        claims = {d["metadata"]["name"]: d["spec"] for d in of_kind(docs, "PersistentVolumeClaim")}
        by_name = {v["name"]: v for v in pod.get("volumes", [])}
        mount = next(
            (
                m
                for m in c.get("volumeMounts", [])
                if under(str(s.trt_engine_cache_dir), [m["mountPath"]])
            ),
            None,
        )
        claim = (by_name.get(mount["name"], {}) if mount else {}).get("persistentVolumeClaim", {})
        spec = claims.get(claim.get("claimName", ""))
        if spec is None:
            problems.append(
                f"{who}: TensorRT cache ({s.trt_engine_cache_dir}) is not on a "
                "PersistentVolumeClaim in the render (rebuilt on every pod start)"
            )
        elif "ReadWriteMany" not in spec.get("accessModes", []):
            problems.append(
                f"{who}: TensorRT cache claim is not ReadWriteMany (pods on many nodes)"
            )
    return problems


def check_canary(docs: list[Doc]) -> list[str]:
    """Stable + canary Deployments, different versions, the canary's pod share as configured."""
    deps = {d["metadata"]["labels"].get(TRACK): d for d in of_kind(docs, "Deployment")}
    if sorted(deps, key=str) != ["canary", "stable"]:
        return [f"want one stable and one canary Deployment, got tracks {sorted(deps, key=str)}"]
    stable, canary = deps["stable"], deps["canary"]
    problems = []
    image = {t: d["spec"]["template"]["spec"]["containers"][0]["image"] for t, d in deps.items()}
    if image["stable"] == image["canary"]:
        problems.append(f"canary runs the stable image {image['stable']}")
    share = canary["metadata"].get("annotations", {}).get(SHARE)
    if share is None:
        return [*problems, f"{ident(canary)}: no {SHARE} annotation"]
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h["spec"]
        for h in of_kind(docs, "HorizontalPodAutoscaler")
    }
    st, ca = hpas[stable["metadata"]["name"]], hpas[canary["metadata"]["name"]]
    for bound in ("minReplicas", "maxReplicas"):
        got = 100 * ca[bound] / (ca[bound] + st[bound])
        if abs(got - float(share)) > 0.5:
            problems.append(f"canary {bound} gives {got:.1f} % of pods, configured {share} %")
    return problems


OVERLAY_CHECKS: dict[str, tuple[Check, ...]] = {
    "cpu": (*COMMON_CHECKS, check_cpu),
    "gpu": (*COMMON_CHECKS, check_gpu),
    "cpu+canary": (*COMMON_CHECKS, check_cpu, check_canary),
}


def problems_in(docs: list[Doc], checks: tuple[Check, ...]) -> list[str]:
    return [p for check in checks for p in check(docs)]


# --- the Jobs: re-embedding (deploy/k8s/jobs/reembed), release (deploy/k8s/jobs/release) ---

JOBS = ("reembed", "release")


@pytest.fixture(scope="module")
def jobs(k8s: Path) -> dict[str, list[Doc]]:
    return {name: render(k8s / "jobs" / name) for name in JOBS}


def cli_params(name: str, container: Doc) -> dict[str, Any]:
    """The Job's arguments as the real `embedkit NAME` command parses them."""
    from typer.main import get_command

    from embedkit.cli import app

    command: Any = get_command(app)
    return command.commands[name].make_context(name, list(container["args"])).params


def check_reembed_job(docs: list[Doc], services: list[Doc]) -> list[str]:
    """The Job runs `embedkit reembed` with arguments the command accepts, against the
    embedkit Service, retrying pods and writing to a PersistentVolumeClaim: one pod at a
    time, or an Indexed Job whose every pod gets a shard of its own (``--shards`` = the
    completions, the index from JOB_COMPLETION_INDEX), never two pods of one index at once,
    on a claim that pods on several nodes can all write."""
    from embedkit.client import reembed
    from embedkit.core.errors import EmbedkitError

    problems = []
    claims = {
        d["metadata"]["name"]: d["spec"].get("accessModes", [])
        for d in of_kind(docs, "PersistentVolumeClaim")
    }
    for job, pod, c in containers(docs):
        who = ident(job)
        if c.get("command", [])[-2:] != ["embedkit.cli", "reembed"]:
            problems.append(f"{who}: command {c.get('command')} is not the reembed CLI")
            continue
        try:
            params = cli_params("reembed", c)
        except typer.exceptions.TyperException as exc:  # the CLI would refuse to start
            problems.append(f"{who}: embedkit reembed refuses its args: {exc}")
            continue
        url = httpx.URL(params["url"])
        if not any(
            s["metadata"]["name"] == url.host
            and any(p["port"] == url.port for p in s["spec"]["ports"])
            for s in services
        ):
            problems.append(f"{who}: --url {url} is no Service of the deployment")
        spec = job["spec"]
        if pod.get("restartPolicy") != "OnFailure" or spec.get("backoffLimit", 6) < 1:
            problems.append(f"{who}: a failed pod must be retried (it resumes)")
        parallel = spec.get("parallelism", 1) > 1
        if params["shard"] is not None:
            problems.append(
                f"{who}: --shard {params['shard']} is fixed: every pod would embed the same "
                "share (give --shards N; the index comes from JOB_COMPLETION_INDEX)"
            )
        if spec.get("completionMode") == "Indexed":
            completions = spec.get("completions", 1)
            if params["shards"] != completions:
                problems.append(
                    f"{who}: --shards {params['shards']} is not the Job's completions "
                    f"{completions}: chunks would be skipped or the shards refused"
                )
            for index in range(completions):  # what the CLI makes of each pod's index
                env = {reembed.INDEX_ENV: str(index)}
                try:
                    reembed.resolve_shard(params["shard"], params["shards"], env)
                except EmbedkitError as exc:
                    problems.append(f"{who}: the pod of index {index} would refuse: {exc.message}")
                    break
            if spec.get("podReplacementPolicy") != "Failed":
                problems.append(
                    f"{who}: podReplacementPolicy must be Failed (a replacement pod must not "
                    "write beside a terminating one of its index)"
                )
        elif parallel or params["shards"] is not None:
            problems.append(
                f"{who}: parallelism must be 1 (one writer per checkpoint) unless an "
                "Indexed Job shards the work (--shards N)"
            )
        volumes = {
            v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]
        }
        mounts = {m["mountPath"]: volumes.get(m["name"]) for m in c.get("volumeMounts", [])}
        out = str(params["out"])
        held = [claim for path, claim in mounts.items() if under(out, [path])]
        if not held or held[0] not in claims:
            problems.append(f"{who}: --out {out} is not on a PersistentVolumeClaim of the render")
        elif parallel and "ReadWriteMany" not in claims[held[0]]:
            problems.append(
                f"{who}: {spec['parallelism']} pods share --out {out}, but its claim "
                f"{held[0]} is {claims[held[0]]}, not ReadWriteMany (pods on other nodes "
                "could not mount it)"
            )
    return problems


def _mounts(pod: Doc, container: Doc, source: str) -> list[str]:
    """Mount paths of ``container``'s volumes of kind ``source`` (persistentVolumeClaim, ...)."""
    kinds = {v["name"]: v for v in pod.get("volumes", []) if source in v}
    return [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in kinds]


def check_release_job(docs: list[Doc], serving: list[Doc]) -> list[str]:
    """The Job runs `embedkit release --variants` (arguments the command accepts) only on the
    nodes of one ISA level, on the serving pod's CPU share (the variants are timed on it),
    signing with a key from a Secret, its store and exported default on a claim."""
    problems = []
    (serving_cpu,) = {quantity(c["resources"]["limits"]["cpu"]) for _, _, c in containers(serving)}
    for job, pod, c in containers(docs):
        who = ident(job)
        if c.get("command") != ["embedkit", "release"]:
            problems.append(f"{who}: command {c.get('command')} is not `embedkit release`")
            continue
        try:
            params = cli_params("release", c)
        except typer.exceptions.TyperException as exc:
            problems.append(f"{who}: embedkit release refuses its args: {exc}")
            continue
        if not params["variants"]:
            problems.append(f"{who}: no --variants: the release would not gate for this ISA")
        claims = _mounts(pod, c, "persistentVolumeClaim")
        home = dict((e["name"], e.get("value")) for e in c.get("env", [])).get("BENTOML_HOME")
        for what, path in (("--export-to", params["export_to"]), ("BENTOML_HOME", home)):
            if path is None or not under(str(path), claims):
                problems.append(f"{who}: {what} {path} is not on a PersistentVolumeClaim")
        if params["sign"] is None or not under(str(params["sign"]), _mounts(pod, c, "secret")):
            problems.append(f"{who}: --sign {params['sign']} is not a key from a Secret")
        terms = (
            pod.get("affinity", {})
            .get("nodeAffinity", {})
            .get("requiredDuringSchedulingIgnoredDuringExecution", {})
            .get("nodeSelectorTerms", [])
        )
        levels = [
            v
            for t in terms
            for e in t.get("matchExpressions", [])
            if e["key"] == pools.ISA_LABEL and e["operator"] == "In"
            for v in e["values"]
        ]
        if len(levels) != 1 or levels[0] not in toolchain.ISA_LEVELS:
            problems.append(f"{who}: not pinned to one ISA level's nodes (got {levels})")
        for kind in ("requests", "limits"):
            cpu = c.get("resources", {}).get(kind, {}).get("cpu")
            if cpu is None or quantity(cpu) != serving_cpu:
                problems.append(f"{who}: cpu {kind} {cpu} is not the serving pod's {serving_cpu}")
    return problems


JOB_CHECKS: tuple[Check, ...] = (check_images, check_security, check_resources)


# --- tests: the real manifests --------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", [*OVERLAYS, "base"])
def test_every_document_passes_strict_schema_validation(
    rendered: dict[str, list[Doc]], overlay: str, version: str
) -> None:
    docs = rendered[overlay]
    assert docs, f"{overlay} rendered nothing"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{overlay}: {ident(doc)} invalid for {version} at {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:  # a CRD would land here
            pytest.fail(f"{overlay}: {exc.message} (use only built-in kinds)")


@pytest.mark.parametrize("target", list(OVERLAY_CHECKS))
def test_deployment_invariants_hold(rendered: dict[str, list[Doc]], target: str) -> None:
    docs = deployment_sets(rendered)[target]
    assert of_kind(docs, "Deployment"), f"{target}: no Deployment"
    assert problems_in(docs, OVERLAY_CHECKS[target]) == []


def test_base_alone_is_not_deployable(rendered: dict[str, list[Doc]]) -> None:
    """The base leaves the image unpinned so that only an overlay can ship."""
    assert any("mutable tag" in p for p in check_images(rendered["base"]))


def test_canary_render_holds_only_canary_objects(rendered: dict[str, list[Doc]]) -> None:
    """Rollback is `kubectl delete -k overlays/canary`: it must not reach a stable object."""
    stable = {ident(d) for d in rendered["cpu"]}
    for doc in rendered["canary"]:
        assert ident(doc) not in stable, f"rollback would delete the stable {ident(doc)}"
        assert "-canary" in doc["metadata"]["name"], ident(doc)
        assert doc["metadata"]["labels"].get(TRACK) == "canary", ident(doc)
    kinds = {d["kind"] for d in rendered["canary"]}
    assert {"Deployment", "HorizontalPodAutoscaler"} <= kinds
    assert "PodDisruptionBudget" not in kinds
    # Its own Service (no user traffic before `embedkit canary` passed) selects only canary pods.
    (service,) = of_kind(rendered["canary"], "Service")
    assert service["spec"]["selector"].get(TRACK) == "canary"


def test_stable_hpa_targets_stable_deployment(rendered: dict[str, list[Doc]]) -> None:
    """Guards the kustomize name-reference pitfall (kubernetes-sigs/kustomize#5251)."""
    docs = deployment_sets(rendered)["cpu+canary"]
    targets = {
        h["metadata"]["name"]: h["spec"]["scaleTargetRef"]["name"]
        for h in of_kind(docs, "HorizontalPodAutoscaler")
    }
    assert targets == {"embedkit": "embedkit", "embedkit-canary": "embedkit-canary"}


def test_promote_edit_makes_the_candidate_stable(
    rendered: dict[str, list[Doc]], k8s: Path, tmp_path: Path
) -> None:
    """Promote = the cpu overlay's digest set to the candidate's (`embedkit image pin` of the
    candidate's record); the result must still pass every check and run the candidate."""
    tree = tmp_path / "k8s"
    shutil.copytree(k8s, tree)
    candidate_digest = "sha256:" + "c" * 64
    supply.pin(tree / "overlays" / "canary", candidate_digest)
    candidate = _container(render(tree / "overlays" / "canary"), "canary")["image"]
    assert candidate.endswith("@" + candidate_digest)
    supply.pin(tree / "overlays" / "cpu", candidate_digest)
    promoted = render(tree / "overlays" / "cpu")
    assert _container(promoted)["image"] == candidate
    assert problems_in(promoted, OVERLAY_CHECKS["cpu"]) == []


# --- tests: every check catches the defect it exists for --------------------------------


def _container(docs: list[Doc], track: str = "stable") -> Doc:
    dep = next(d for d in of_kind(docs, "Deployment") if d["metadata"]["labels"][TRACK] == track)
    return dep["spec"]["template"]["spec"]["containers"][0]


def _pod(docs: list[Doc], track: str = "stable") -> Doc:
    dep = next(d for d in of_kind(docs, "Deployment") if d["metadata"]["labels"][TRACK] == track)
    return dep["spec"]["template"]["spec"]


def _config(docs: list[Doc], key: str, value: str | None, track: str = "stable") -> None:
    ref = _container(docs, track)["envFrom"][0]["configMapRef"]["name"]
    data = next(d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == ref)["data"]
    if value is None:
        data.pop(key, None)
    else:
        data[key] = value


def _hpa(docs: list[Doc], name: str) -> Doc:
    return next(
        h for h in of_kind(docs, "HorizontalPodAutoscaler") if h["metadata"]["name"] == name
    )


def _set_image(docs: list[Doc], image: str) -> None:
    _container(docs)["image"] = image


# (target, mutation, check, expected fragment of the reported problem)
MUTATIONS: list[tuple[str, Callable[[list[Doc]], object], Check, str]] = [
    (
        "cpu",
        lambda d: _set_image(d, "registry.example.com/embedkit/embedkit-cpu:latest"),
        check_images,
        "mutable tag",
    ),
    (
        "cpu",
        lambda d: _set_image(d, "registry.example.com/embedkit/embedkit-cpu:0.1.0"),
        check_images,
        "mutable tag",
    ),
    (
        "cpu",
        lambda d: _set_image(d, "registry.example.com/embedkit/embedkit-cpu@sha256:abc"),
        check_images,
        "malformed digest",
    ),
    ("cpu", lambda d: _container(d).pop("livenessProbe"), check_probes, "livenessProbe missing"),
    ("cpu", lambda d: _container(d).pop("startupProbe"), check_probes, "startupProbe missing"),
    (
        "cpu",
        lambda d: _container(d)["readinessProbe"]["httpGet"].update(path="/livez"),
        check_probes,
        "readinessProbe path",
    ),
    (
        "cpu",
        lambda d: _container(d)["livenessProbe"]["httpGet"].update(port=8080),
        check_probes,
        "is not 3000",
    ),
    (
        "cpu",
        lambda d: _container(d)["securityContext"].update(runAsUser=0),
        check_security,
        "runAsUser",
    ),
    (
        "cpu",
        lambda d: (
            _container(d)["securityContext"].pop("runAsNonRoot"),
            _pod(d)["securityContext"].pop("runAsNonRoot"),
        ),
        check_security,
        "runAsNonRoot",
    ),
    (
        "cpu",
        lambda d: _container(d)["securityContext"].update(readOnlyRootFilesystem=False),
        check_security,
        "readOnlyRootFilesystem",
    ),
    (
        "cpu",
        lambda d: _container(d)["securityContext"].update(allowPrivilegeEscalation=True),
        check_security,
        "allowPrivilegeEscalation",
    ),
    (
        "cpu",
        lambda d: _container(d)["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
        check_security,
        "drop ALL",
    ),
    (
        "cpu",
        lambda d: _pod(d).pop("automountServiceAccountToken"),
        check_security,
        "automountServiceAccountToken",
    ),
    (
        "cpu",
        lambda d: _pod(d).update(enableServiceLinks=True),
        check_security,
        "enableServiceLinks",
    ),
    (
        "cpu",
        lambda d: _container(d)["resources"]["limits"].pop("memory"),
        check_resources,
        "memory request and limit",
    ),
    (
        "cpu",
        lambda d: _container(d)["resources"]["requests"].update(cpu="3"),
        check_resources,
        "above limit",
    ),
    (
        "cpu",
        lambda d: _config(d, "EMBEDKIT_INTRA_OP_THREAD", "2"),
        check_config,
        "is not a setting",
    ),
    (
        "cpu",
        lambda d: _config(d, "EMBEDKIT_PROVIDERS", "CPUExecutionProvider"),
        check_config,
        "do not parse",
    ),
    (
        "cpu",
        lambda d: _container(d)["envFrom"][0]["configMapRef"].update(name="gone"),
        check_config,
        "not in the render",
    ),
    ("cpu", lambda d: _config(d, "EMBEDKIT_INTRA_OP_THREADS", "8"), check_threads, "!= CPU limit"),
    ("cpu", lambda d: _config(d, "EMBEDKIT_WORKERS", "2"), check_threads, "!= CPU limit"),
    ("cpu", lambda d: _config(d, "RAYON_NUM_THREADS", None), check_threads, "RAYON_NUM_THREADS"),
    (
        "cpu",
        lambda d: _container(d).update(
            volumeMounts=[m for m in _container(d)["volumeMounts"] if m["mountPath"] != "/tmp"]
        ),
        check_writable_paths,
        "(/tmp) is not on a writable emptyDir",
    ),
    (
        "cpu",
        lambda d: _container(d)["env"].append({"name": "BENTOML_HOME", "value": "/home/bentoml"}),
        check_writable_paths,
        "BENTOML_HOME",
    ),
    (
        "gpu",
        lambda d: _config(d, "EMBEDKIT_TRT_ENGINE_CACHE_DIR", "/opt/trt"),
        check_writable_paths,
        "trt_engine_cache_dir",
    ),
    (
        "cpu",
        lambda d: _config(d, "EMBEDKIT_REQUIRE_SIGNATURE", "false"),
        check_signature,
        "REQUIRE_SIGNATURE",
    ),
    (
        "cpu",
        lambda d: _config(d, "EMBEDKIT_TRUSTED_KEYS", '["/etc/elsewhere/k.pub"]'),
        check_signature,
        "is not mounted",
    ),
    (
        "cpu",
        lambda d: of_kind(d, "ConfigMap")[0]["data"].update(
            k="-----BEGIN PRIVATE KEY-----\n...\n-----END PRIVATE KEY-----\n"
        ),
        check_signature,
        "private key",
    ),
    (
        "cpu",
        lambda d: d.append(
            {"kind": "ConfigMap", "metadata": {"name": "embedkit-trusted-keys"}, "data": {}}
        ),
        check_signature,
        "ship trusted key",
    ),
    (
        "cpu",
        lambda d: next(v for v in _pod(d)["volumes"] if v["name"] == "trusted-keys")[
            "configMap"
        ].update(optional=True),
        check_signature,
        "marked optional",
    ),
    (
        "cpu",
        lambda d: _hpa(d, "embedkit")["spec"]["scaleTargetRef"].update(name="embedkit-api"),
        check_autoscaling,
        "not a Deployment here",
    ),
    (
        "cpu",
        lambda d: _hpa(d, "embedkit")["spec"].update(metrics=[]),
        check_autoscaling,
        "no CPU utilisation",
    ),
    (
        "cpu",
        lambda d: of_kind(d, "Deployment")[0]["spec"].update(replicas=2),
        check_autoscaling,
        "sets replicas",
    ),
    (
        "cpu",
        lambda d: of_kind(d, "PodDisruptionBudget")[0]["spec"]["selector"].update(
            matchLabels={"app": "other"}
        ),
        check_traffic,
        "no PodDisruptionBudget",
    ),
    (
        "cpu",
        lambda d: of_kind(d, "Service")[0]["spec"]["ports"][0].update(port=80),
        check_traffic,
        "no Service",
    ),
    (
        "cpu",
        lambda d: of_kind(d, "Deployment")[0]["spec"]["template"]["metadata"]["annotations"].pop(
            "prometheus.io/scrape"
        ),
        check_metrics_scrape,
        "prometheus.io/scrape",
    ),
    (
        "cpu",
        lambda d: _config(d, "EMBEDKIT_PROVIDERS", '["CUDAExecutionProvider"]'),
        check_cpu,
        "CPU deployment with providers",
    ),
    (
        "gpu",
        lambda d: _container(d)["resources"]["limits"].pop(GPU),
        check_gpu,
        "no nvidia.com/gpu",
    ),
    ("gpu", lambda d: _pod(d).pop("tolerations"), check_gpu, "toleration"),
    (
        "gpu",
        lambda d: next(v for v in _pod(d)["volumes"] if v["name"] == "trt-cache").update(
            {"persistentVolumeClaim": {"claimName": "gone"}}
        ),
        check_gpu,
        "not on a PersistentVolumeClaim",
    ),
    (
        "gpu",
        lambda d: of_kind(d, "PersistentVolumeClaim")[0]["spec"].update(
            accessModes=["ReadWriteOnce"]
        ),
        check_gpu,
        "not ReadWriteMany",
    ),
    ("gpu", lambda d: _pod(d).pop("nodeSelector"), check_gpu, "nodeSelector"),
    (
        "gpu",
        lambda d: _config(d, "EMBEDKIT_STRICT_PROVIDERS", "false"),
        check_gpu,
        "STRICT_PROVIDERS",
    ),
    (
        "cpu+canary",
        lambda d: _hpa(d, "embedkit-canary")["spec"].update(maxReplicas=12),
        check_canary,
        "maxReplicas gives 50.0 %",
    ),
    (
        "cpu+canary",
        lambda d: _container(d, "canary").update(image=_container(d)["image"]),
        check_canary,
        "runs the stable image",
    ),
    (
        "cpu+canary",
        lambda d: d.remove(
            next(x for x in of_kind(d, "Deployment") if x["metadata"]["labels"][TRACK] == "canary")
        ),
        check_canary,
        "one stable and one canary",
    ),
]


@pytest.mark.parametrize(
    ("target", "mutate", "check", "expected"),
    MUTATIONS,
    ids=[f"{t}-{c.__name__}-{e}" for t, _, c, e in MUTATIONS],
)
def test_check_catches_defect(
    rendered: dict[str, list[Doc]],
    target: str,
    mutate: Callable[[list[Doc]], object],
    check: Check,
    expected: str,
) -> None:
    docs = copy.deepcopy(deployment_sets(rendered)[target])
    assert check(docs) == [], "the unmutated render must pass"
    mutate(docs)
    found = check(docs)
    assert any(expected in p for p in found), found


def test_every_check_has_a_mutation() -> None:
    covered = {c for _, _, c, _ in MUTATIONS}
    all_checks = {c for checks in OVERLAY_CHECKS.values() for c in checks}
    assert all_checks <= covered, sorted(c.__name__ for c in all_checks - covered)


def test_strict_schema_rejects_unknown_fields(rendered: dict[str, list[Doc]]) -> None:
    """Strict mode is what catches a misspelt field; lax mode would let it through."""
    dep = copy.deepcopy(of_kind(rendered["cpu"], "Deployment")[0])
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=False)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)


def test_schema_rejects_wrong_types(rendered: dict[str, list[Doc]]) -> None:
    hpa = copy.deepcopy(of_kind(rendered["cpu"], "HorizontalPodAutoscaler")[0])
    hpa["spec"]["minReplicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, K8S_VERSIONS[0], strict=True)


# --- tests: the re-embedding Job (Indexed, one shard per pod) ------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("job", JOBS)
def test_job_passes_strict_schema_validation(
    jobs: dict[str, list[Doc]], job: str, version: str
) -> None:
    for doc in jobs[job]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{job}: {ident(doc)} invalid for {version} at {where}: {exc.message}")


def test_reembed_job_invariants_hold(
    jobs: dict[str, list[Doc]], rendered: dict[str, list[Doc]]
) -> None:
    docs = jobs["reembed"]
    assert of_kind(docs, "Job"), "no Job rendered"
    assert problems_in(docs, JOB_CHECKS) == []
    assert check_reembed_job(docs, of_kind(rendered["cpu"], "Service")) == []


def test_release_job_invariants_hold(
    jobs: dict[str, list[Doc]], rendered: dict[str, list[Doc]]
) -> None:
    docs = jobs["release"]
    assert of_kind(docs, "Job"), "no Job rendered"
    assert problems_in(docs, JOB_CHECKS) == []
    assert check_release_job(docs, rendered["cpu"]) == []


def _affinity_values(docs: list[Doc]) -> list[str]:
    pod = of_kind(docs, "Job")[0]["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"]


def _set_env(docs: list[Doc], name: str, value: str) -> None:
    for e in _job_container(docs)["env"]:
        if e["name"] == name:
            e["value"] = value


RELEASE_MUTATIONS: list[tuple[Callable[[list[Doc]], object], str]] = [
    (lambda d: _job_container(d)["args"].append("--no-such-flag"), "refuses its args"),
    (lambda d: _job_container(d)["args"].remove("--variants"), "no --variants"),
    (lambda d: _set_arg(d, "--export-to", "/tmp/exports"), "--export-to /tmp/exports"),
    (lambda d: _set_env(d, "BENTOML_HOME", "/work/bentoml"), "BENTOML_HOME /work/bentoml"),
    (lambda d: _set_arg(d, "--sign", "/store/release.pem"), "not a key from a Secret"),
    (lambda d: of_kind(d, "Job")[0]["spec"]["template"]["spec"].pop("affinity"), "not pinned"),
    (lambda d: _affinity_values(d).append("avx2"), "not pinned"),
    (lambda d: _affinity_values(d).__setitem__(0, "avx9"), "not pinned"),
    (lambda d: _job_container(d)["resources"]["limits"].update(cpu="4"), "cpu limits 4"),
    (lambda d: _job_container(d).update(command=["embedkit", "encode"]), "not `embedkit release`"),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), RELEASE_MUTATIONS, ids=[e for _, e in RELEASE_MUTATIONS]
)
def test_release_job_check_catches_defect(
    jobs: dict[str, list[Doc]],
    rendered: dict[str, list[Doc]],
    mutate: Callable[[list[Doc]], object],
    expected: str,
) -> None:
    docs = copy.deepcopy(jobs["release"])
    assert check_release_job(docs, rendered["cpu"]) == []
    mutate(docs)
    found = check_release_job(docs, rendered["cpu"])
    assert any(expected in p for p in found), found


def test_pools_release_writes_the_jobs_affinity(k8s: Path, tmp_path: Path) -> None:
    """`embedkit pools release LEVEL` pins the Job to LEVEL's nodes; an unknown level is a
    one-line error naming the levels. The committed patch is what it writes for amx."""
    from typer.testing import CliRunner

    from embedkit.cli import app

    tree = tmp_path / "k8s"
    shutil.copytree(k8s, tree)
    done = CliRunner().invoke(app, ["pools", "release", "avx512-vnni", "--k8s", str(tree)])
    assert done.exit_code == 0, done.output
    assert _affinity_values(render(tree / "jobs" / "release")) == ["avx512-vnni"]
    bad = CliRunner().invoke(app, ["pools", "release", "avx9", "--k8s", str(tree)])
    assert bad.exit_code != 0 and "none of amx, avx512-bf16" in bad.output, bad.output
    committed = (k8s / "jobs" / "release" / "isa-affinity.yaml").read_text()
    assert (
        committed
        == pools.write_patch(
            pools.release_job_patch("amx"), tmp_path / "amx.yaml", "`embedkit pools release amx`"
        ).read_text()
    )


def test_reembed_job_runs_the_image_the_cpu_overlay_deploys(
    jobs: dict[str, list[Doc]], rendered: dict[str, list[Doc]]
) -> None:
    (job,) = of_kind(jobs["reembed"], "Job")
    assert (
        job["spec"]["template"]["spec"]["containers"][0]["image"]
        == _container(rendered["cpu"])["image"]
    )


def _job_container(docs: list[Doc]) -> Doc:
    return of_kind(docs, "Job")[0]["spec"]["template"]["spec"]["containers"][0]


def _set_arg(docs: list[Doc], flag: str, value: str) -> None:
    args = _job_container(docs)["args"]
    args[args.index(flag) + 1] = value


def _drop_arg(docs: list[Doc], flag: str) -> None:
    args = _job_container(docs)["args"]
    del args[args.index(flag) : args.index(flag) + 2]


JOB_MUTATIONS: list[tuple[Callable[[list[Doc]], object], str]] = [
    (lambda d: _job_container(d)["args"].append("--no-such-flag"), "refuses its args"),
    (lambda d: _set_arg(d, "--on-bad-line", "ignore"), "refuses its args"),
    (lambda d: _set_arg(d, "--url", "http://embedkit-api:3000"), "no Service"),
    (lambda d: _set_arg(d, "--url", "http://embedkit:80"), "no Service"),
    (lambda d: _set_arg(d, "--out", "/tmp/vectors"), "not on a PersistentVolumeClaim"),
    (lambda d: _job_container(d).update(command=["embedkit", "encode"]), "not the reembed CLI"),
    (lambda d: of_kind(d, "Job")[0]["spec"].update(backoffLimit=0), "must be retried"),
    (lambda d: of_kind(d, "Job")[0]["spec"].pop("completionMode"), "parallelism must be 1"),
    (lambda d: _set_arg(d, "--shards", "3"), "is not the Job's completions 4"),
    (lambda d: _set_arg(d, "--shards", "3"), "index 3 would refuse: JOB_COMPLETION_INDEX '3/3'"),
    (lambda d: _drop_arg(d, "--shards"), "index 0 would refuse: JOB_COMPLETION_INDEX=0 is set"),
    (lambda d: _job_container(d)["args"].extend(["--shard", "0/4"]), "is fixed"),
    (
        lambda d: of_kind(d, "Job")[0]["spec"].update(podReplacementPolicy="TerminatingOrFailed"),
        "podReplacementPolicy must be Failed",
    ),
    (
        lambda d: of_kind(d, "PersistentVolumeClaim")[0]["spec"].update(
            accessModes=["ReadWriteOnce"]
        ),
        "not ReadWriteMany",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), JOB_MUTATIONS, ids=[e for _, e in JOB_MUTATIONS])
def test_reembed_job_check_catches_defect(
    jobs: dict[str, list[Doc]],
    rendered: dict[str, list[Doc]],
    mutate: Callable[[list[Doc]], object],
    expected: str,
) -> None:
    docs = copy.deepcopy(jobs["reembed"])
    services = of_kind(rendered["cpu"], "Service")
    assert check_reembed_job(docs, services) == []
    mutate(docs)
    found = check_reembed_job(docs, services)
    assert any(expected in p for p in found), found
