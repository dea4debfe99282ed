"""A real `bentoml serve service:EmbeddingAPI` subprocess for the HTTP tests.

The fp32 artifact (root conftest, a real export) is registered in the session's
temporary BENTOML_HOME; each test module that needs a server starts one from
the repo root on a free loopback port, waits for /readyz and tears the whole
process group down afterwards. Starting a server takes seconds: share them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BENTOML = str(Path(sys.executable).parent / "bentoml")


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


def start_server(tag: str, log: Path, env_extra: dict[str, str] | None = None) -> Server:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "EMBEDKIT_MODEL": tag,
        **(env_extra or {}),
    }
    port = free_port()
    fh = open(log, "wb")  # noqa: SIM115 - closed in stop_server
    proc = subprocess.Popen(
        [BENTOML, "serve", "service:EmbeddingAPI", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    fh.close()
    return Server(f"http://127.0.0.1:{port}", tag, log, proc)


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
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def model_tag(fp32_artifact) -> str:  # type: ignore[no-untyped-def]
    """The fp32 artifact registered in the session's BentoML model store."""
    from embedkit.artifact import register

    return register(fp32_artifact)


class Launcher:
    """Starts servers for one test module and stops them all at its end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[Server] = []

    def start(self, tag: str, env: dict[str, str] | None = None, *, ready: bool = True) -> Server:
        srv = start_server(tag, self.directory / f"serve-{len(self.servers)}.log", env)
        self.servers.append(srv)
        if ready:
            wait_ready(srv)
        return srv

    def stop_all(self) -> None:
        for srv in self.servers:
            stop_server(srv)


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
