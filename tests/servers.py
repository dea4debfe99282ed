"""Real `bentoml serve` subprocesses for tests: spawn, wait for /readyz, tear down.

Used by tests/http, tests/load, tests/faults, tests/fuzz and tests/deploy. Servers
listen on a free loopback port, run in their own process group (so a test can
find and kill a worker, and teardown reaches every child) and log to a file
the test can search. Starting one takes seconds: share them per module.

The pytest fixtures at the bottom are imported by the conftest of each test
directory that starts servers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from embedkit.bench.http import stop_process_group

ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).parent / "bentoml")
SERVICE = "service:EmbeddingAPI"


@dataclass
class Server:
    url: str
    tag: str
    log: Path
    proc: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def wait_for_line(self, needle: str, timeout: float = 90.0) -> str:
        """The first log line containing ``needle`` (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_text().splitlines():
                if needle in line:
                    return line
            time.sleep(0.3)
        raise AssertionError(f"no log line with {needle!r}:\n{self.log_text()[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    target: str,
    log: Path,
    env: Mapping[str, str],
    *,
    cwd: Path = ROOT,
    tag: str = "",
    prefix: Sequence[str] = (),
) -> Server:
    """``bentoml serve TARGET`` (a service import path or a Bento tag) on a free loopback
    port with exactly ``env``; ``prefix`` wraps the command (e.g. ``setpriv`` to drop root)."""
    port = free_port()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [*prefix, BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env=dict(env),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(f"http://127.0.0.1:{port}", tag or target, log, proc)


def start_server(tag: str, log: Path, env_extra: Mapping[str, str] | None = None) -> Server:
    """The repo's service (``service:EmbeddingAPI``) serving model ``tag``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDKIT_MODEL": tag, **(env_extra or {})}
    return spawn(SERVICE, log, env, tag=tag)


def wait_ready(server: Server, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server not ready after {timeout} s:\n{server.log_text()[-3000:]}")


def stop_server(server: Server) -> None:
    stop_process_group(server.proc)


class Launcher:
    """Starts servers for one test module and stops them all at its end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[Server] = []

    def _log(self) -> Path:
        return self.directory / f"serve-{len(self.servers)}.log"

    def start(
        self, tag: str, env: Mapping[str, str] | None = None, *, ready: bool = True
    ) -> Server:
        srv = start_server(tag, self._log(), env)
        return self._track(srv, ready)

    def spawn(
        self, target: str, env: Mapping[str, str], *, ready: bool = True, **kw: object
    ) -> Server:
        """Like :func:`spawn`, tracked for teardown."""
        return self._track(spawn(target, self._log(), env, **kw), ready)  # type: ignore[arg-type]

    def _track(self, srv: Server, ready: bool) -> Server:
        self.servers.append(srv)
        if ready:
            wait_ready(srv)
        return srv

    def stop_all(self) -> None:
        for srv in self.servers:
            stop_server(srv)


# --- fixtures (import them into a directory's conftest) -----------------------------


@pytest.fixture(scope="session")
def model_tag(fp32_artifact) -> str:  # type: ignore[no-untyped-def]
    """The fp32 artifact registered in the session's BentoML model store."""
    from embedkit.model.artifact import register

    return register(fp32_artifact)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    launch = Launcher(tmp_path_factory.mktemp("servers"))
    try:
        yield launch
    finally:
        launch.stop_all()


@pytest.fixture(scope="module")
def server(model_tag: str, launcher: Launcher) -> Server:
    """The default configuration (auth off), shared by a module's tests."""
    return launcher.start(model_tag)
