"""Real servers for tests: the pytest side of :mod:`embedkit_bench.server`.

Used by tests/http, tests/load, tests/faults, tests/fuzz and tests/deploy. The launcher
module starts `bentoml serve` on a free loopback port in its own process group with a
log file; here a :class:`Launcher` tracks the servers of one test module and stops them
at its end, and a server that never gets ready fails the test with its log. Starting
one takes seconds: share them per module.

The pytest fixtures at the bottom are a plugin of the root conftest (``pytest_plugins``),
so a session-scoped one exists once for the whole run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import psutil
import pytest

from embedkit.core.errors import NotReady
from embedkit_bench.server import Server, serve_model, spawn


class Launcher:
    """Starts servers for one test module (or the session) and stops them all at its end.

    ``own_metrics``: each server gets a BentoML home of its own whose ``models`` is the
    session's store. `bentoml serve` empties its home's prometheus folder when it starts,
    so a server that outlives others' starts (the session's) needs its own folder to keep
    its metrics."""

    def __init__(self, directory: Path, *, own_metrics: bool = False) -> None:
        self.directory = directory
        self.servers: list[Server] = []
        self.own_metrics = own_metrics

    def _log(self) -> Path:
        return self.directory / f"serve-{len(self.servers)}.log"

    def start(
        self, tag: str, env: Mapping[str, str] | None = None, *, ready: bool = True
    ) -> Server:
        """The project's service serving model ``tag`` (this environment plus ``env``)."""
        env = dict(env or {})
        if self.own_metrics:
            home = self.directory / f"home-{len(self.servers)}"
            home.mkdir()
            (home / "models").symlink_to(Path(os.environ["BENTOML_HOME"]) / "models")
            env["BENTOML_HOME"] = str(home)
        return self._track(serve_model(tag, self._log(), env), ready)

    def spawn(
        self,
        target: str,
        env: Mapping[str, str],
        *,
        ready: bool = True,
        cwd: Path | None = None,
        tag: str = "",
        prefix: Sequence[str] = (),
    ) -> Server:
        """``bentoml serve TARGET`` with exactly ``env`` (see :func:`spawn`), tracked."""
        srv = spawn(target, self._log(), env, cwd=cwd, tag=tag, prefix=prefix)
        return self._track(srv, ready)

    def ready(self, srv: Server, timeout: float = 180.0) -> None:
        """Wait for /readyz; fail the test with the server's log if it never comes."""
        try:
            srv.wait_ready(timeout)
        except NotReady as exc:
            pytest.fail(f"{exc.message}:\n{srv.log_text()[-3000:]}")

    def _track(self, srv: Server, ready: bool) -> Server:
        self.servers.append(srv)
        if ready:
            self.ready(srv)
        return srv

    def stop_all(self) -> None:
        for srv in self.servers:
            srv.stop()


def engine_worker(server: Server) -> psutil.Process:
    """The worker process that owns the ORT session: the Embedder's (``topology=split``)
    or the single service's (the default)."""
    workers: dict[str, psutil.Process] = {}
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        cmd = proc.cmdline()
        if "--service-name" in cmd:
            workers[cmd[cmd.index("--service-name") + 1]] = proc
    found = workers.get("embedder") or workers.get("embedkit")
    assert found is not None, f"no engine worker among {sorted(workers)}"
    return found


def assert_held_but_never_ready(server, seconds: float = 5.0) -> None:
    """The refusing server still holds its port but /readyz never answers 200.

    BentoML's arbiter keeps the socket while the refused workers exit, so a probe is
    accepted and gets no answer (a timeout) or a non-200. A closed port fails: it means
    no server ran at all, which would prove nothing about refusing the artifact.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, "the server exited instead of holding its port"
        try:
            status = httpx.get(server.url + "/readyz", timeout=2).status_code
        except httpx.ConnectError as exc:
            pytest.fail(f"port closed ({exc}): no server was running to refuse anything")
        except httpx.TimeoutException:
            status = None  # accepted, no worker to answer
        assert status != 200, "a refused artifact became ready"
        try:
            embed = httpx.post(server.url + "/embed", json={"texts": ["x"]}, timeout=2)
            assert embed.status_code != 200, "a refused artifact answered a request"
        except httpx.TimeoutException:
            pass
        time.sleep(0.5)


# --- fixtures (import them into a directory's conftest) -----------------------------


@pytest.fixture(scope="session")
def model_tag(fp32_artifact) -> str:
    """The fp32 artifact registered in the session's BentoML model store."""
    from embedkit.model.artifact import register

    return register(fp32_artifact)


@pytest.fixture
def spoilable_version(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[Path], tuple[str, Path]]]:
    """Registers a copy of an artifact directory, renamed ``spoiled-NAME``, as a new model
    version: its tag and store path, for a test that spoils the stored copy. A name of its
    own, because other tests look the store up while this one runs (a release's baseline
    is ``NAME:latest``, a variant's parent any version with its checksum); the versions
    leave the store at the test's end."""
    import shutil

    import bentoml

    from embedkit.model.artifact import SIGNATURE, Artifact, amend, register, seal

    tags: list[str] = []

    def spoilable(directory: Path) -> tuple[str, Path]:
        copy = tmp_path_factory.mktemp("spoilable") / "artifact"
        shutil.copytree(directory, copy, ignore=shutil.ignore_patterns(SIGNATURE))
        original = Artifact.load(copy)
        renamed = seal(amend(original, {"name": f"spoiled-{original.manifest.name}"}))
        tags.append(register(renamed))
        return tags[-1], Path(bentoml.models.get(tags[-1]).path)

    yield spoilable
    for tag in tags:
        bentoml.models.delete(tag)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    launch = Launcher(tmp_path_factory.mktemp("servers"))
    try:
        yield launch
    finally:
        launch.stop_all()


@pytest.fixture(scope="session")
def corpus(fp32_artifact):
    """400 short + 20 long distinct texts with their expected raw vectors (in-process engine)."""
    from embedkit.runtime.engine import Engine
    from embedkit_bench import loadtest

    texts = loadtest.sts_texts(n_short=400, n_long=20)
    return loadtest.build_corpus(Engine(fp32_artifact), texts, n_long=20)


@pytest.fixture(scope="session")
def session_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    launch = Launcher(tmp_path_factory.mktemp("session-servers"), own_metrics=True)
    try:
        yield launch
    finally:
        launch.stop_all()


@pytest.fixture(scope="session")
def server(model_tag: str, session_launcher: Launcher) -> Server:
    """The default configuration (auth off): one for the session, shared by every module
    that asks for it, so no test may break it (one that does starts its own)."""
    return session_launcher.start(model_tag)


CUDA_FIRST = json.dumps(["CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.fixture(scope="session")
def fallback_server(model_tag: str, session_launcher: Launcher) -> Server:
    """CUDA asked for first on a CPU-only onnxruntime: the CPU serves after a visible
    fallback (tests/http/test_operations.py, tests/faults/test_faults.py share it)."""
    return session_launcher.start(model_tag, {"EMBEDKIT_PROVIDERS": CUDA_FIRST})
