"""`embedkit embed-corpus` on Kubernetes: the KubeRay RayJob and the batch image it runs.

deploy/k8s/jobs/embed-corpus renders (``kubectl kustomize``) to one ``ray.io/v1`` RayJob.
No Python or npm package ships KubeRay's CRD and public repositories' files stay out of
this project, so the RayJob is checked against our own JSON schema
(tests/deploy/schemas/rayjob.ray.io-v1.schema.json, written from KubeRay's documented v1
API; unknown fields fail) and every pod template inside it (head, worker group, submitter)
against the real Kubernetes schema: wrapped as a core/v1 PodTemplate and validated by
kubernetes-validate in strict mode, for every version the other manifests are checked for.
The pods then meet the invariants of the other Jobs (image by digest, security context,
resources) and the RayJob's own (the entrypoint parses with the real CLI, actors fit the
worker pods, object-store credentials only from a Secret). Mutation tests show each check
failing on the defect it exists for.

The batch image (``scripts/build-image --batch``) is checked without building it: its lock
holds the ``batch`` extra and every pin of the serving lock, the serving lock neither, and
its Dockerfile (rendered offline from the same template) differs from the serving one only
where it should. Building and running it is in docs/embed-corpus-kubernetes.md.
"""

from __future__ import annotations

import copy
import json
import shlex
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import typer
from tests.deploy.test_manifests import (
    K8S_VERSIONS,
    check_config,
    check_images,
    check_resources,
    check_security,
    check_signature,
    cli_params,
    ident,
    of_kind,
    quantity,
    render,
    under,
)

from embedkit.deploy import bento

Doc = dict[str, Any]
SCHEMA_PATH = Path(__file__).parent / "schemas" / "rayjob.ray.io-v1.schema.json"
CLI = ["python", "-m", "embedkit.cli", "embed-corpus"]
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def rayjob_docs(pytestconfig: pytest.Config) -> list[Doc]:
    return render(pytestconfig.rootpath / "deploy" / "k8s" / "jobs" / "embed-corpus")


@pytest.fixture(scope="module")
def schema() -> Doc:
    loaded: Doc = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


# --- schema: ours for the RayJob, Kubernetes' for every pod template inside ----------------


def pod_templates(job: Doc) -> Iterator[tuple[str, Doc]]:
    """(role, pod template) of every pod the RayJob makes: head, each worker group, submitter."""
    cluster = job.get("spec", {}).get("rayClusterSpec", {})
    if "template" in cluster.get("headGroupSpec", {}):
        yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        if "template" in group:
            yield f"worker {group.get('groupName')}", group["template"]
    if "submitterPodTemplate" in job.get("spec", {}):
        yield "submitter", job["spec"]["submitterPodTemplate"]


def schema_problems(job: Doc, schema: Doc, versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """Every schema violation of a RayJob: ours for its own fields, then each pod template
    (with the RayJob's metadata, which validates it too) as a core/v1 PodTemplate."""
    validator = jsonschema.Draft202012Validator(schema)
    problems = [
        f"{ident(job)}: at {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(job)
    ]
    for role, template in pod_templates(job):
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": job.get("metadata", {}),
            "template": template,
        }
        for version in versions:
            try:
                kubernetes_validate.validate(wrapped, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                problems.append(f"{ident(job)} {role} pod ({version}) at {where}: {exc.message}")
    return problems


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rayjob_passes_schema_validation(rayjob_docs: list[Doc], schema: Doc, version: str) -> None:
    assert [d["kind"] for d in rayjob_docs] == ["RayJob"]
    (job,) = rayjob_docs
    assert sorted(role for role, _ in pod_templates(job)) == ["head", "submitter", "worker embed"]
    assert schema_problems(job, schema, (version,)) == []


def _spec(d: Doc) -> Doc:
    return d["spec"]


def _cluster(d: Doc) -> Doc:
    return d["spec"]["rayClusterSpec"]


def _worker(d: Doc) -> Doc:
    return d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _head(d: Doc) -> Doc:
    return d["spec"]["rayClusterSpec"]["headGroupSpec"]


def _pod(template: Doc) -> Doc:
    return template["spec"]


def _c(template: Doc) -> Doc:
    return template["spec"]["containers"][0]


SCHEMA_MUTATIONS: list[tuple[str, Callable[[Doc], object], str]] = [
    ("unknown spec field", lambda d: _spec(d).update(entryPoint="python x.py"), "entryPoint"),
    (
        "unknown cluster field",
        lambda d: _cluster(d).update(enableAutoscaling=True),
        "enableAutoscaling",
    ),
    ("unknown worker field", lambda d: _worker(d).update(replica=2), "replica"),
    ("unknown head field", lambda d: _head(d).update(serviceName="x"), "serviceName"),
    ("wrong type", lambda d: _worker(d).update(replicas="4"), "is not of type 'integer'"),
    ("wrong type deadline", lambda d: _spec(d).update(activeDeadlineSeconds=0), "minimum"),
    ("non-string param", lambda d: _head(d)["rayStartParams"].update({"num-cpus": 0}), "string"),
    ("bad enum", lambda d: _spec(d).update(submissionMode="JobMode"), "submissionMode"),
    ("no groupName", lambda d: _worker(d).pop("groupName"), "'groupName' is a required"),
    (
        "no worker rayStartParams",
        lambda d: _worker(d).pop("rayStartParams"),
        "'rayStartParams' is a required",
    ),
    (
        "no head rayStartParams",
        lambda d: _head(d).pop("rayStartParams"),
        "'rayStartParams' is a required",
    ),
    ("no cluster", lambda d: _spec(d).pop("rayClusterSpec"), "is not valid under any"),
    ("wrong apiVersion", lambda d: d.update(apiVersion="ray.io/v1alpha1"), "ray.io/v1"),
    (
        "unknown field in a worker pod",
        lambda d: _c(_worker(d)["template"]).update(imagePullPolcy="Always"),
        "worker embed pod",
    ),
    (
        "unknown field in the head pod",
        lambda d: _pod(_head(d)["template"]).update(restartPolicyy="Never"),
        "head pod",
    ),
    (
        "wrong type in the submitter pod",
        lambda d: _c(_spec(d)["submitterPodTemplate"])["resources"]["limits"].update(cpu=[1]),
        "submitter pod",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [(m, e) for _, m, e in SCHEMA_MUTATIONS],
    ids=[name for name, _, _ in SCHEMA_MUTATIONS],
)
def test_schema_check_catches_defect(
    rayjob_docs: list[Doc], schema: Doc, mutate: Callable[[Doc], object], expected: str
) -> None:
    job = copy.deepcopy(rayjob_docs[0])
    assert schema_problems(job, schema, K8S_VERSIONS[:1]) == []
    mutate(job)
    found = schema_problems(job, schema, K8S_VERSIONS[:1])
    assert any(expected in p for p in found), found


# --- the pods: the invariants of the other Jobs -------------------------------------------


def as_workloads(docs: list[Doc]) -> list[Doc]:
    """Each pod of each RayJob as a Job-shaped document, so that the checks written for
    Deployments and Jobs (tests/deploy/test_manifests.py) read it unchanged."""
    out = [d for d in docs if d.get("kind") != "RayJob"]
    for job in of_kind(docs, "RayJob"):
        for role, template in pod_templates(job):
            name = f"{job['metadata']['name']}[{role}]"
            out.append({"kind": "Job", "metadata": {"name": name}, "spec": {"template": template}})
    return out


def ray_pods(docs: list[Doc]) -> list[Doc]:
    """The Ray nodes (head and workers), without the submitter."""
    return [d for d in as_workloads(docs) if "[submitter]" not in d["metadata"]["name"]]


def pod_checks(docs: list[Doc]) -> list[str]:
    """Every pod: image by digest, non-root, read-only root, no privilege, requests and limits;
    the Ray nodes also: settings that parse and the service's signature trust."""
    every = as_workloads(docs)
    ray = ray_pods(docs)
    return [
        *check_images(every),
        *check_security(every),
        *check_resources(every),
        *check_config(ray),
        *check_signature(ray),
    ]


def test_rayjob_pods_meet_the_job_invariants(rayjob_docs: list[Doc]) -> None:
    assert len(as_workloads(rayjob_docs)) == 3
    assert pod_checks(rayjob_docs) == []


def _template(d: list[Doc], role: str) -> Doc:
    return dict(pod_templates(of_kind(d, "RayJob")[0]))[role]


POD_MUTATIONS: list[tuple[str, Callable[[list[Doc]], object], str]] = [
    (
        "worker image by tag",
        lambda d: _c(_template(d, "worker embed")).update(image="registry.example.com/x:1"),
        "mutable tag",
    ),
    (
        "submitter runs as root",
        lambda d: _c(_template(d, "submitter"))["securityContext"].update(runAsUser=0),
        "[submitter]: runAsUser",
    ),
    (
        "head root writable",
        lambda d: _c(_template(d, "head"))["securityContext"].update(readOnlyRootFilesystem=False),
        "[head]: readOnlyRootFilesystem",
    ),
    (
        "worker escalates",
        lambda d: _c(_template(d, "worker embed"))["securityContext"].update(
            allowPrivilegeEscalation=True
        ),
        "allowPrivilegeEscalation",
    ),
    (
        "worker keeps capabilities",
        lambda d: _c(_template(d, "worker embed"))["securityContext"].pop("capabilities"),
        "drop ALL",
    ),
    (
        "head token",
        lambda d: _pod(_template(d, "head")).update(automountServiceAccountToken=True),
        "automountServiceAccountToken",
    ),
    (
        "submitter without limits",
        lambda d: _c(_template(d, "submitter"))["resources"].pop("limits"),
        "[submitter]: cpu request and limit",
    ),
    (
        "worker requests above limits",
        lambda d: _c(_template(d, "worker embed"))["resources"]["requests"].update(memory="9Gi"),
        "above limit",
    ),
    (
        "misspelt setting",
        lambda d: _c(_template(d, "worker embed"))["env"].append(
            {"name": "EMBEDKIT_INTRA_OPS_THREADS", "value": "2"}
        ),
        "is not a setting",
    ),
    (
        "signature off",
        lambda d: next(
            e for e in _c(_template(d, "head"))["env"] if e["name"] == "EMBEDKIT_REQUIRE_SIGNATURE"
        ).update(value="false"),
        "EMBEDKIT_REQUIRE_SIGNATURE",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [(m, e) for _, m, e in POD_MUTATIONS],
    ids=[name for name, _, _ in POD_MUTATIONS],
)
def test_pod_check_catches_defect(
    rayjob_docs: list[Doc], mutate: Callable[[list[Doc]], object], expected: str
) -> None:
    docs = copy.deepcopy(rayjob_docs)
    assert pod_checks(docs) == []
    mutate(docs)
    found = pod_checks(docs)
    assert any(expected in p for p in found), found


# --- the RayJob's own invariants ----------------------------------------------------------


def batch_ray_version(pyproject: Path = bento.PYPROJECT) -> str:
    """The Ray version the `batch` extra pins (the batch image's Ray)."""
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["batch"]
    (ray,) = [dep for dep in extra if bento._req_name(dep) == "ray"]
    return ray.split("==", 1)[1]


def _secret_only(container: Doc, name: str) -> bool:
    env = {e["name"]: e for e in container.get("env", [])}
    ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
    return "value" not in env.get(name, {}) and bool(ref) and not ref.get("optional", False)


def _scratch_mounts(pod: Doc, container: Doc) -> list[str]:
    empty = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    return [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in empty]


def check_embed_corpus(docs: list[Doc], ray_version: str) -> list[str]:
    """The RayJob runs `embedkit embed-corpus --engine ray` on its own cluster (arguments the
    real CLI accepts, object-store URIs), sized so that every actor has its CPUs on a worker,
    cleaned up after, retried (it resumes), with object-store credentials from a Secret and
    Ray's scratch (/tmp, /dev/shm) on emptyDirs."""
    problems = []
    for job in of_kind(docs, "RayJob"):
        who, spec = ident(job), job["spec"]
        argv = shlex.split(spec.get("entrypoint", ""))
        if argv[: len(CLI)] != CLI:
            problems.append(f"{who}: entrypoint {argv[:4]} is not `{' '.join(CLI)}`")
            continue
        try:
            params = cli_params("embed-corpus", {"args": argv[len(CLI) :]})
        except typer.exceptions.TyperException as exc:  # the driver would exit at once
            problems.append(f"{who}: embedkit embed-corpus refuses its args: {exc}")
            continue
        if str(params["engine"]) != "ray" or params["ray_address"] != "auto":
            problems.append(f"{who}: not --engine ray --ray-address auto (the RayJob's cluster)")
        for what in ("input", "--out"):
            uri = argv[len(CLI)] if what == "input" else argv[argv.index(what) + 1]
            if not uri.startswith(("s3://", "gs://")):
                problems.append(f"{who}: {what} {uri} is not an object-store URI (every pod)")
        cluster = spec.get("rayClusterSpec", {})
        if cluster.get("rayVersion") != ray_version:
            problems.append(
                f"{who}: rayVersion {cluster.get('rayVersion')} != image's {ray_version}"
            )
        if cluster.get("headGroupSpec", {}).get("rayStartParams", {}).get("num-cpus") != "0":
            problems.append(f'{who}: the head offers CPUs to actors (num-cpus must be "0")')
        threads = params["threads_per_actor"]
        slots = 0
        for group in cluster.get("workerGroupSpecs", []):
            name = f"{who} worker {group.get('groupName')}"
            replicas = group.get("replicas", 0)
            if not group.get("minReplicas") == replicas == group.get("maxReplicas"):
                problems.append(f"{name}: replicas must equal minReplicas and maxReplicas")
            cpu = quantity(_c(group["template"])["resources"]["limits"]["cpu"])
            if group.get("rayStartParams", {}).get("num-cpus") != f"{cpu:g}":
                problems.append(f"{name}: num-cpus is not its CPU limit {cpu:g}")
            if threads is None or cpu % threads:
                problems.append(f"{name}: CPU limit {cpu:g} is no multiple of {threads} threads")
            else:
                slots += replicas * int(cpu // threads)
        if params["actors"] != slots:
            problems.append(f"{who}: --actors {params['actors']} != actor slots on workers {slots}")
        if (
            spec.get("shutdownAfterJobFinishes") is not True
            or "ttlSecondsAfterFinished" not in spec
        ):
            problems.append(f"{who}: the cluster outlives the job (shutdownAfterJobFinishes, TTL)")
        if spec.get("activeDeadlineSeconds") is None:
            problems.append(f"{who}: no activeDeadlineSeconds")
        if spec.get("backoffLimit", 0) < 1:
            problems.append(f"{who}: backoffLimit < 1: a failed run is not retried (it resumes)")
        images: set[str] = set()
        for role, template in pod_templates(job):
            pod, c = _pod(template), _c(template)
            images.add(str(c.get("image")))
            scratch = _scratch_mounts(pod, c)
            if role == "submitter":
                if "command" in c or "args" in c:
                    problems.append(f"{who} submitter: sets its command (KubeRay's ray job submit)")
                continue
            for name in CREDENTIALS:
                if not _secret_only(c, name):
                    problems.append(f"{who} {role}: {name} is not from a Secret (required)")
            for path in ("/tmp/ray", "/dev/shm"):
                if not under(path, scratch):
                    problems.append(f"{who} {role}: {path} is not on an emptyDir")
        if len(images) != 1:
            problems.append(f"{who}: its pods run different images {sorted(images)}")
    return problems


def test_rayjob_runs_embed_corpus_on_its_cluster(rayjob_docs: list[Doc]) -> None:
    assert check_embed_corpus(rayjob_docs, batch_ray_version()) == []


def _set_arg(d: list[Doc], flag: str, value: str) -> None:
    spec = of_kind(d, "RayJob")[0]["spec"]
    argv = shlex.split(spec["entrypoint"])
    argv[argv.index(flag) + 1] = value
    spec["entrypoint"] = shlex.join(argv)


def _entry(d: list[Doc], edit: Callable[[list[str]], list[str]]) -> None:
    spec = of_kind(d, "RayJob")[0]["spec"]
    spec["entrypoint"] = shlex.join(edit(shlex.split(spec["entrypoint"])))


def _rj(d: list[Doc]) -> Doc:
    return of_kind(d, "RayJob")[0]


RAYJOB_MUTATIONS: list[tuple[str, Callable[[list[Doc]], object], str]] = [
    ("unknown flag", lambda d: _entry(d, lambda a: [*a, "--no-such-flag"]), "refuses its args"),
    ("bad engine", lambda d: _set_arg(d, "--engine", "spark"), "refuses its args"),
    ("local engine", lambda d: _set_arg(d, "--engine", "local"), "not --engine ray"),
    ("other command", lambda d: _entry(d, lambda a: ["python", "x.py", *a[4:]]), "is not"),
    ("local out", lambda d: _set_arg(d, "--out", "/tmp/vectors"), "not an object-store URI"),
    ("too many actors", lambda d: _set_arg(d, "--actors", "9"), "!= actor slots"),
    ("threads", lambda d: _set_arg(d, "--threads-per-actor", "3"), "no multiple"),
    ("autoscaling", lambda d: _worker(_rj(d)).update(maxReplicas=8), "maxReplicas"),
    ("ray version", lambda d: _cluster(_rj(d)).update(rayVersion="2.60.0"), "rayVersion"),
    ("head cpus", lambda d: _head(_rj(d))["rayStartParams"].pop("num-cpus"), "head offers"),
    (
        "worker cpus",
        lambda d: _worker(_rj(d))["rayStartParams"].update({"num-cpus": "8"}),
        "num-cpus is not",
    ),
    ("kept cluster", lambda d: _spec(_rj(d)).pop("shutdownAfterJobFinishes"), "outlives"),
    ("no deadline", lambda d: _spec(_rj(d)).pop("activeDeadlineSeconds"), "activeDeadline"),
    ("no retry", lambda d: _spec(_rj(d)).update(backoffLimit=0), "not retried"),
    (
        "literal credential",
        lambda d: _c(_head(_rj(d))["template"])["env"].append(
            {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}
        ),
        "head: AWS_SECRET_ACCESS_KEY is not from a Secret",
    ),
    (
        "worker without credentials",
        lambda d: _c(_worker(_rj(d))["template"]).update(
            env=[
                e
                for e in _c(_worker(_rj(d))["template"])["env"]
                if e["name"] != "AWS_ACCESS_KEY_ID"
            ]
        ),
        "worker embed: AWS_ACCESS_KEY_ID",
    ),
    (
        "no shm",
        lambda d: _c(_worker(_rj(d))["template"]).update(
            volumeMounts=[
                m
                for m in _c(_worker(_rj(d))["template"])["volumeMounts"]
                if m["mountPath"] != "/dev/shm"
            ]
        ),
        "/dev/shm is not on an emptyDir",
    ),
    (
        "submitter command",
        lambda d: _c(_spec(_rj(d))["submitterPodTemplate"]).update(command=["sleep", "1"]),
        "sets its command",
    ),
    (
        "two images",
        lambda d: _c(_head(_rj(d))["template"]).update(image="registry.example.com/other@x"),
        "different images",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [(m, e) for _, m, e in RAYJOB_MUTATIONS],
    ids=[name for name, _, _ in RAYJOB_MUTATIONS],
)
def test_rayjob_check_catches_defect(
    rayjob_docs: list[Doc], mutate: Callable[[list[Doc]], object], expected: str
) -> None:
    docs = copy.deepcopy(rayjob_docs)
    version = batch_ray_version()
    assert check_embed_corpus(docs, version) == []
    mutate(docs)
    found = check_embed_corpus(docs, version)
    assert any(expected in p for p in found), found


# --- the batch image, without building it -------------------------------------------------


def _pins(lock: Path) -> set[str]:
    return {bento._pin(line) for line in bento._logical_lines(lock.read_text())}


@pytest.fixture()
def at_root(pytestconfig: pytest.Config, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project root as working directory (the image's files are named relative to it)."""
    monkeypatch.chdir(pytestconfig.rootpath)
    return pytestconfig.rootpath


def test_batch_lock_is_the_serving_lock_plus_the_batch_extra(at_root: Path) -> None:
    batch, serving = bento.VARIANTS["batch"], bento.VARIANTS["cpu"]
    assert batch.lock is not None and serving.lock is not None
    wanted = bento.serving_requirements(batch)
    assert bento.lock_problems(batch.lock.read_text(), wanted) == []
    batch_pins, serving_pins = _pins(batch.lock), _pins(serving.lock)
    extra = tomllib.loads(Path("pyproject.toml").read_text())["project"]["optional-dependencies"]
    for dep in extra["batch"]:
        assert bento._pin(dep) in batch_pins, f"{dep} not in {batch.lock}"
        assert bento._req_name(dep) not in {p.split("==")[0] for p in serving_pins}, (
            f"{dep} is in the serving image's lock"
        )
    # The serving image plus: every serving pin at the serving image's version.
    assert serving_pins <= batch_pins, sorted(serving_pins - batch_pins)
    # The dashboard extra (the RayJob submitter's job API) at the batch extra's Ray version.
    assert f"ray[default]=={batch_ray_version()}" == bento.RAY_DASHBOARD
    assert bento.RAY_DASHBOARD in wanted and "batch" not in bento.SERVING_VARIANTS


def _containerfile(variant: str, tmp: Path) -> list[str]:
    """The Dockerfile `bentoml containerize` renders for the variant's bentofile (BentoML's
    own renderer, fed the bentofile's docker options and envs as a built Bento carries them)."""
    from bentoml._internal.bento.build_config import CondaOptions, DockerOptions
    from bentoml._internal.container.generate import generate_containerfile

    spec = bento.bentofile(bento.VARIANTS[variant])
    envs = {e["name"]: e["value"] for e in spec["envs"]}
    docker = DockerOptions(**spec["docker"], env=envs).with_defaults()
    fs = tmp / variant
    fs.mkdir()
    text = generate_containerfile(docker, ".", conda=CondaOptions().with_defaults(), bento_fs=fs)
    return text.splitlines()


def test_batch_dockerfile_is_the_serving_one_plus_the_cli_in_place(
    at_root: Path, tmp_path: Path
) -> None:
    cpu, batch = _containerfile("cpu", tmp_path), _containerfile("batch", tmp_path)
    store = bento.IMAGE_BENTO
    # The serving image: no store folders, no profile script, BENTOML_HOME left as BentoML's.
    assert not any("profile.d" in ln or f"{store}/bentos" in ln for ln in cpu)
    assert [ln for ln in cpu if ln.startswith("ENV BENTOML_HOME=")] == [
        "ENV BENTOML_HOME=/home/bentoml/"
    ]
    # The batch one: what the serving one has, and what the CLI needs to run in place.
    assert set(cpu) - set(batch) == set()
    added = {ln.strip() for ln in set(batch) - set(cpu) if not ln.lstrip().startswith("#")}
    assert f"ENV BENTOML_HOME={store}" in added
    assert f"ARG PYTHONPATH={store}/src/src" in added
    assert f"RUN mkdir -p {store}/bentos {store}/envs {store}/tmp \\" in added
    assert "&& echo 'export PATH=/app/.venv/bin:$PATH' > /etc/profile.d/embedkit-venv.sh" in added
    assert [ln for ln in batch if ln.startswith("ENV BENTOML_HOME=")][-1] == (
        f"ENV BENTOML_HOME={store}"
    )
    spec = bento.bentofile(bento.VARIANTS["batch"])
    assert spec["name"] == "embedkit-batch"
    assert spec["python"]["requirements_txt"] == "locks/batch-cpu.txt"
