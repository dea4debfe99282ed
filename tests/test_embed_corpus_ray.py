"""`embedkit embed-corpus --engine ray`: one local Ray for the module (startup costs
seconds), small corpora, tiny partitions. The same files as `--engine local`; an actor
killed mid-run and a driver killed mid-run both end with every id exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedkit.batch import corpus, partitions
from embedkit.core.errors import InvalidInput
from embedkit.core.settings import Settings
from embedkit.model.evaldata import sts_sentences

pytest.importorskip("pyarrow")
ray = pytest.importorskip("ray", reason="Ray Data comes with the batch extra")
pq = pytest.importorskip("pyarrow.parquet")

from embedkit.batch import ray_engine  # noqa: E402  (needs ray)

SETTINGS = Settings(intra_op_threads=1)
TEXTS = sts_sentences("test")[:300]


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    # The test module's own classes (a crashing worker) go to the actors by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return path


def read_output(out: Path) -> tuple[list[str], np.ndarray]:
    files = sorted(out.glob("part-*.parquet"))
    ids = [i for f in files for i in partitions.read_ids(f)]
    return ids, np.concatenate([partitions.read_vectors(f) for f in files])


def options(tmp_path: Path, src: Path, fp32_artifact: Any, out: str = "ray") -> corpus.Options:
    return corpus.Options(src, tmp_path / out, str(fp32_artifact.path), partition_rows=25)


def dispatch(opts: corpus.Options, **kw: Any) -> corpus.Dispatch:
    return ray_engine.dispatcher(ray_engine.RayOptions(actors=2), opts, SETTINGS, **kw)


def test_same_output_as_local(tmp_path: Path, fp32_artifact) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    local = options(tmp_path, src, fp32_artifact, "local")
    corpus.run(local, corpus.local_embedder(local, SETTINGS))
    opts = options(tmp_path, src, fp32_artifact)
    report = corpus.run(opts, corpus.local_embedder(opts, SETTINGS), dispatch=dispatch(opts))
    assert (report.partitions, report.computed, report.documents) == (12, 300, 300)
    assert report.complete and report.duplicates == 0
    ids, vectors = read_output(tmp_path / "ray")
    local_ids, local_vectors = read_output(tmp_path / "local")
    assert ids == local_ids == [f"doc-{i}" for i in range(300)]
    np.testing.assert_allclose(vectors, local_vectors, atol=1e-5)
    for name in ("part-000000.parquet", "part-000011.parquet"):
        theirs = partitions.read_meta(tmp_path / "local" / name)
        assert partitions.read_meta(tmp_path / "ray" / name) == theirs
    assert json.loads((tmp_path / "ray" / corpus.MANIFEST).read_text())["complete"]
    # A rerun resumes everything: the driver dispatches nothing.
    again = corpus.run(opts, corpus.local_embedder(opts, SETTINGS), dispatch=dispatch(opts))
    assert (again.partitions_resumed, again.computed) == (12, 0)


def test_previous_copies_in_the_actors(tmp_path: Path, fp32_artifact) -> None:
    """An earlier (local) output as --previous: the actors copy the unchanged rows."""
    texts = list(TEXTS[:100])
    old = options(tmp_path, write_jsonl(tmp_path / "old.jsonl", texts), fp32_artifact, "old")
    corpus.run(old, corpus.local_embedder(old, SETTINGS))
    texts[5] = texts[60] = "a changed document"
    src = write_jsonl(tmp_path / "new.jsonl", texts)
    opts = replace(options(tmp_path, src, fp32_artifact), previous=tmp_path / "old")
    report = corpus.run(opts, corpus.local_embedder(opts, SETTINGS), dispatch=dispatch(opts))
    assert (report.computed, report.copied, report.documents) == (2, 98, 100)
    fresh = options(tmp_path, src, fp32_artifact, "fresh")
    corpus.run(fresh, corpus.local_embedder(fresh, SETTINGS))
    np.testing.assert_allclose(
        read_output(tmp_path / "ray")[1], read_output(tmp_path / "fresh")[1], atol=1e-5
    )


class CrashOnce(ray_engine.PartitionWorker):
    """Kills its own process (no exception, no cleanup) on partition 3, the first time:
    a marker file remembers across the restart."""

    def embed(self, rows: partitions.Rows) -> partitions.Embedded:
        marker = Path(self.options.out).parent / "crashed"
        if rows.part.index == 3 and not marker.exists():
            marker.touch()
            os._exit(1)
        return super().embed(rows)


def test_killed_actor_is_retried_every_id_once(tmp_path: Path, fp32_artifact) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:200])
    opts = options(tmp_path, src, fp32_artifact)
    run = dispatch(opts, worker=CrashOnce)
    report = corpus.run(opts, corpus.local_embedder(opts, SETTINGS), dispatch=run)
    assert (tmp_path / "crashed").exists()
    assert report.complete and report.documents == 200 and report.duplicates == 0
    ids, vectors = read_output(tmp_path / "ray")
    assert ids == [f"doc-{i}" for i in range(200)] and vectors.shape == (200, 384)
    assert not list((tmp_path / "ray").glob(".*.tmp"))


class AlwaysFails(ray_engine.PartitionWorker):
    def embed(self, rows: partitions.Rows) -> partitions.Embedded:
        raise InvalidInput(f"line {rows.lines[0]}: refused by the test")


def test_an_actors_error_is_one_line(tmp_path: Path, fp32_artifact) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:50])
    opts = options(tmp_path, src, fp32_artifact)
    with pytest.raises(InvalidInput, match=r"c\.jsonl: line \d+: refused by the test"):
        corpus.run(
            opts, corpus.local_embedder(opts, SETTINGS), dispatch=dispatch(opts, worker=AlwaysFails)
        )
    assert not json.loads((tmp_path / "ray" / corpus.MANIFEST).read_text())["complete"]


def test_driver_killed_then_rerun_every_id_once(tmp_path: Path, fp32_artifact) -> None:
    """The CLI, killed once a partition is on disk; the same command resumes. Both drivers
    join the module's Ray (--ray-address, as on a cluster): a driver's death ends its own
    actors, not the cluster, and no run pays for starting one."""
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    out = tmp_path / "ray"
    cmd = [
        *(sys.executable, "-m", "embedkit.cli", "embed-corpus", str(src)),
        *("--out", str(out), "--artifact", str(fp32_artifact.path), "--partition-rows", "10"),
        *("--engine", "ray", "--actors", "1", "--threads-per-actor", "1"),
        *("--ray-address", ray.get_runtime_context().gcs_address),
    ]
    env = {**os.environ, "EMBEDKIT_INTRA_OP_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        started = time.monotonic()
        while not list(out.glob("part-*.parquet")):
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() - started < 120, "no partition written in 120 s"
            time.sleep(0.05)
        first.kill()
    finally:
        first.wait(30)
    written = len(list(out.glob("part-*.parquet")))
    assert 1 <= written < 30
    assert not json.loads((out / corpus.MANIFEST).read_text())["complete"]
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert report["complete"] and report["partitions_resumed"] >= 1
    ids, _ = read_output(out)
    assert ids == [f"doc-{i}" for i in range(300)]
