"""Real `bentoml serve` processes for benchmarks, soaks and tests: start, wait, stop.

One launcher for everything that talks to a live server (`embedkit bench --http`,
`embedkit bench-http`, `embedkit soak`, tests/http, tests/load, tests/faults, tests/fuzz,
tests/deploy). A server listens on a free 127.0.0.1 port only, runs in its own process
group (BentoML forks workers: a test can find and kill one, and stopping reaches every
child) and writes its output to a log file. ``bentoml serve service:EmbeddingAPI``
imports ``service.py`` from the working directory, the project root like every command.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from embedkit.client import api
from embedkit.core.errors import NotReady

SERVICE = "service:EmbeddingAPI"
# The venv's own bentoml (beside this interpreter), whatever PATH holds.
BENTOML = str(Path(sys.executable).parent / "bentoml")
HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback port nobody listens on right now, below the kernel's ephemeral range.

    `bentoml serve` binds its internal endpoints (circus, the dispatcher) to ports the
    kernel picks from that range while it starts; a port taken from the same range and
    released before the server binds it can be handed out again in between ("Address
    already in use", seen with several servers starting in one test run)."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 16000), low)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything below the range is taken: the kernel's pick
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server's whole process group, SIGKILL it if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_ready(
    url: str,
    *,
    timeout: float = 180.0,
    proc: subprocess.Popen[bytes] | None = None,
    path: str = "/readyz",
) -> None:
    """Poll ``url`` + ``path`` until it answers 200; fail early if ``proc`` exits meanwhile
    (``path``: another server's readiness route, e.g. Infinity's ``/health``)."""

    def exited(_: int) -> str | None:
        if proc is not None and proc.poll() is not None:
            return f"the server for {url} exited early (code {proc.returncode})"
        return None

    api.wait_ready(url, timeout_s=timeout, path=path, interval_s=0.3, stop=exited)


@dataclass
class Server:
    """One `bentoml serve` process group and where it logs."""

    url: str
    tag: str
    log: Path
    proc: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> None:
        try:
            wait_ready(self.url, timeout=timeout, proc=self.proc)
        except NotReady as exc:
            raise NotReady(f"{exc.message} (log: {self.log})") from None

    def wait_for_line(self, needle: str, timeout: float = 90.0) -> str:
        """The first log line containing ``needle`` (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_text().splitlines():
                if needle in line:
                    return line
            time.sleep(0.3)
        raise TimeoutError(f"no log line with {needle!r}:\n{self.log_text()[-3000:]}")

    def metrics(self) -> str:
        with api.Client(self.url, timeout_s=10) as client:
            return client.metrics()

    def stop(self) -> None:
        stop_process_group(self.proc)


def spawn(
    target: str,
    log: Path,
    env: Mapping[str, str],
    *,
    cwd: Path | None = None,
    tag: str = "",
    prefix: Sequence[str] = (),
) -> Server:
    """``bentoml serve TARGET`` (a service import path or a Bento tag) on a free loopback
    port with exactly ``env``, in ``cwd`` (default: the working directory); ``prefix``
    wraps the command (e.g. ``setpriv`` to drop root). Does not wait for readiness."""
    port = free_port()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [*prefix, BENTOML, "serve", target, "--host", HOST, "--port", str(port)],
            cwd=cwd,
            env=dict(env),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(f"http://{HOST}:{port}", tag or target, log, proc)


def serve_model(tag: str, log: Path, env_extra: Mapping[str, str] | None = None) -> Server:
    """This project's service (:data:`SERVICE`) serving the registered model ``tag``,
    with this process's environment plus ``env_extra``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDKIT_MODEL": tag, **(env_extra or {})}
    return spawn(SERVICE, log, env, tag=tag)


# --- a server in a throw-away BentoML home ----------------------------------------------


@dataclass
class IsolatedServer(Server):
    """A :class:`Server` whose model store is a fresh BENTOML_HOME of its own."""

    home: Path

    def stop(self, *, keep_home: bool = False) -> None:
        super().stop()
        if not keep_home:
            shutil.rmtree(self.home, ignore_errors=True)  # the model store copy is ~90 MB


def start_service(
    artifact: str | Path, env_extra: Mapping[str, str] | None = None
) -> IsolatedServer:
    """Register ``artifact`` in a fresh BENTOML_HOME and serve it on a free loopback port.

    Registration runs in a subprocess, so this process's BentoML home (and the user's
    model store) stay untouched. Call :meth:`Server.wait_ready` before sending load and
    :meth:`IsolatedServer.stop` after; the log is ``home/serve.log``.
    """
    home = Path(tempfile.mkdtemp(prefix="embedkit-serve-"))
    env = {**os.environ, "BENTOML_HOME": str(home), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    code = (
        "from embedkit.model.artifact import register, resolve;"
        f"print(register(resolve({str(artifact)!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        shutil.rmtree(home, ignore_errors=True)
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise NotReady(f"cannot register {artifact} for the server: {tail}")
    tag = done.stdout.strip().splitlines()[-1]
    server = spawn(SERVICE, home / "serve.log", {**env, "EMBEDKIT_MODEL": tag}, tag=tag)
    return IsolatedServer(server.url, server.tag, server.log, server.proc, home)
