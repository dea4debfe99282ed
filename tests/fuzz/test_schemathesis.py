"""schemathesis against the live service's own OpenAPI document (/docs.json), over HTTP.

Bounded for CI (examples per operation and a time budget; fixed seed, no example
database, so a run is reproducible). The check is the one that matters for
robustness: no generated request — valid or not — gets a 5xx. The full
conformance run (`--checks all`) is documented in docs/service.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ST = str(Path(sys.executable).parent / "st")
MAX_EXAMPLES = 40
MAX_TIME_S = 60


def test_no_generated_request_gets_a_5xx(server, tmp_path: Path) -> None:
    cmd = [
        ST,
        "run",
        server.url + "/docs.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--max-time",
        str(MAX_TIME_S),
        "--seed",
        "8",
        "--generation-database",
        "none",
        "--request-timeout",
        "60",
        "--workers",
        "2",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=MAX_TIME_S + 120, cwd=tmp_path
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    # Every route was really exercised (the JUnit report lists one case per operation).
    report = next(tmp_path.glob("*.xml")).read_text()
    for op in ("POST /v1/embeddings", "POST /embed", "POST /embed/query", "POST /tokenize"):
        assert f'name="{op}"' in report, report
    assert 'failures="0"' in report and 'errors="0"' in report
    # Nothing the server logged as an unexpected error either.
    assert "unexpected error in the front service" not in server.log_text()
