"""`embedkit reembed`: input parsing, retries, refusals, the checkpoint, shards.

The service is httpx's in-memory transport answering as the real one does (the
identity header, base64 float32 bodies, 429 + Retry-After), except for the last test:
shards through the session's real server. The unsharded run against a real server,
killed and resumed, is in tests/http/test_operations.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedkit.client import reembed
from embedkit.core.errors import IdentityMismatch, InvalidInput, Overloaded, Unauthorized
from embedkit.runtime.vectors import encode_base64
from embedkit.serve.engine.identity import HEADER, ServedIdentity

IDENTITY = ServedIdentity(
    "all-minilm-l6-v2", "v1", "fp32", "index-compatible", "fp32", "CPUExecutionProvider", "avx2"
)
DIM = 8


def vector(text: str) -> list[float]:
    rng = np.random.default_rng(abs(hash(text)) % 2**32)
    return rng.standard_normal(DIM).astype(np.float32).tolist()


class FakeService:
    """An in-memory embedkit: ``script`` yields the status (and headers) of each /embed
    call before the answers turn 200; ``identity`` may change between calls."""

    def __init__(self, script: list[tuple[int, dict[str, str]]] | None = None) -> None:
        self.script = list(script or [])
        self.identity = IDENTITY
        self.embedded: list[str] = []
        self.on_embed: Callable[[int], None] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"embedkit": self.identity.as_dict()}]})
        if self.script:
            status, extra = self.script.pop(0)
            body = {"error": {"message": "no", "type": "x", "param": None, "code": "overloaded"}}
            headers = {HEADER: self.identity.header_value(), **extra}
            return httpx.Response(status, json=body, headers=headers)
        texts = json.loads(request.content)["texts"]
        if self.on_embed is not None:
            self.on_embed(len(self.embedded))
        headers = {HEADER: self.identity.header_value()}
        self.embedded += texts
        vectors = np.array([vector(t) for t in texts], np.float32)
        answer: dict[str, object] = {"embeddings": encode_base64(vectors), "dimensions": DIM}
        return httpx.Response(200, json=answer, headers=headers)


def corpus(path: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    lines = [json.dumps({"id": f"d{i}", "text": f"document {i}"}) for i in range(n)]
    for lineno, raw in (bad or {}).items():
        lines[lineno - 1] = raw
    path.write_text("\n".join(lines) + "\n")
    return path


def run(
    tmp_path: Path, service: FakeService, sleeps: list[float] | None = None, **kw
) -> reembed.Summary:
    options = reembed.Options(
        url="http://embedkit.test",
        input=kw.pop("input", tmp_path / "corpus.jsonl"),
        out=tmp_path / "out",
        **{"chunk_size": 4, "concurrency": 1, **kw},
    )
    return reembed.run(
        options,
        transport=httpx.MockTransport(service),
        sleep=(sleeps if sleeps is not None else []).append,
    )


def read_output(out: Path) -> dict[str, np.ndarray]:
    """id -> vector, through index.jsonl (each id once)."""
    got: dict[str, np.ndarray] = {}
    for line in (out / "index.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["id"] not in got, f"{row['id']} twice"
        got[row["id"]] = np.load(out / row["file"])[row["row"]]
    return got


# --- input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "blank line"),
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object but list"),
        ('{"text": "x"}', "no 'id' field"),
        ('{"id": [1], "text": "x"}', "'id' is list, not a string or integer"),
        ('{"id": true, "text": "x"}', "'id' is bool"),
        ('{"id": "a"}', "no 'text' field"),
        ('{"id": "a", "text": null}', "'text' is NoneType, not a string"),
        ('{"id": "seen", "text": "x"}', "duplicate id 'seen' (first at line 1)"),
    ],
)
def test_a_bad_line_is_named_with_its_reason(raw: str, reason: str) -> None:
    got = reembed.parse_line(raw, 7, "id", "text", {"seen": 1})
    assert isinstance(got, dict) and got["line"] == 7 and reason in got["reason"], got


def test_configured_fields_and_integer_ids() -> None:
    assert reembed.parse_line('{"_id": 3, "body": "t"}', 1, "_id", "body", {}) == (3, "t")


def test_skip_records_every_bad_line_and_embeds_the_rest(tmp_path: Path) -> None:
    bad = {2: "{oops", 7: '{"id": "d0", "text": "again"}'}
    corpus(tmp_path / "corpus.jsonl", 10, bad)
    summary = run(tmp_path, FakeService())
    assert (summary.documents, summary.rejected) == (8, 2)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"].split(" (")[0]) for r in rejects] == [
        (2, "not JSON"),
        (7, "duplicate id 'd0'"),
    ]
    assert sorted(read_output(tmp_path / "out")) == sorted(
        f"d{i}" for i in range(10) if i not in (1, 6)
    )


def test_stop_names_the_line_and_keeps_the_chunks_before(tmp_path: Path) -> None:
    corpus(tmp_path / "corpus.jsonl", 10, {6: "[]"})
    with pytest.raises(InvalidInput, match=r"corpus.jsonl line 6: not a JSON object"):
        run(tmp_path, FakeService(), on_bad_line="stop")
    state = json.loads((tmp_path / "out" / reembed.CHECKPOINT).read_text())
    assert state["done"] == [[0, 0]] and not state["complete"]  # lines 1-4 kept
    corpus(tmp_path / "corpus.jsonl", 10)  # fixed in place: the run resumes
    service = FakeService()
    summary = run(tmp_path, service, on_bad_line="stop")
    assert (summary.documents, summary.chunks_resumed) == (10, 1)
    assert service.embedded == [f"document {i}" for i in range(4, 10)]


# --- the service -------------------------------------------------------------------------


def test_429_and_503_are_waited_out_as_retry_after_says(tmp_path: Path) -> None:
    corpus(tmp_path / "corpus.jsonl", 6)
    service = FakeService([(429, {"retry-after": "2"}), (503, {}), (429, {"retry-after": "1"})])
    sleeps: list[float] = []
    summary = run(tmp_path, service, sleeps)
    assert summary.retries == {"429": 2, "503": 1}
    assert sleeps[0] == 2.0 and sleeps[2] == 1.0 and 0 < sleeps[1] <= 1.0  # backoff
    assert summary.documents == 6 and len(service.embedded) == 6


def test_gives_up_after_max_wait_with_a_resumable_message(tmp_path: Path) -> None:
    corpus(tmp_path / "corpus.jsonl", 3)
    service = FakeService([(429, {"retry-after": "30"})] * 3)
    with pytest.raises(Overloaded, match=r"gave up on lines 1-3 after 10 s.*resume"):
        run(tmp_path, service, max_wait_s=10)


def test_a_refusal_is_one_line_and_not_retried(tmp_path: Path) -> None:
    corpus(tmp_path / "corpus.jsonl", 3)
    service = FakeService([(401, {})])
    with pytest.raises(Unauthorized, match="answered 401 to lines 1-3: overloaded: no"):
        run(tmp_path, service)
    assert service.script == []


def test_the_identity_changing_mid_run_stops_before_writing(tmp_path: Path) -> None:
    corpus(tmp_path / "corpus.jsonl", 12)
    service = FakeService()
    other = ServedIdentity(**{**IDENTITY.__dict__, "version": "v2"})

    def roll_out(done: int) -> None:
        if done >= 4:
            service.identity = other

    service.on_embed = roll_out
    with pytest.raises(IdentityMismatch, match=r"made with all-minilm-l6-v2:v1.*serves .*:v2"):
        run(tmp_path, service)
    state = json.loads((tmp_path / "out" / reembed.CHECKPOINT).read_text())
    assert state["done"] == [[0, 0]]
    assert not (tmp_path / "out" / "chunks" / "00000001.npy").exists()
    # Resuming against the new version is refused before any work is sent.
    before = len(service.embedded)
    with pytest.raises(IdentityMismatch):
        run(tmp_path, service)
    assert len(service.embedded) == before


def test_provider_and_isa_may_differ_between_pods(tmp_path: Path) -> None:
    corpus(tmp_path / "corpus.jsonl", 8)
    service = FakeService()
    gpu = ServedIdentity(**{**IDENTITY.__dict__, "isa": "avx512", "provider": "X"})
    service.on_embed = lambda done: setattr(service, "identity", gpu if done else IDENTITY)
    assert run(tmp_path, service).documents == 8


# --- the checkpoint --------------------------------------------------------------------------


def test_resume_redoes_only_unrecorded_chunks(tmp_path: Path) -> None:
    """A chunk whose files were written but which the checkpoint does not name (a kill
    between the two) is redone once, its files replaced: no loss, no duplicate."""
    corpus(tmp_path / "corpus.jsonl", 10)
    first = FakeService()
    run(tmp_path, first)
    out = tmp_path / "out"
    state = json.loads((out / reembed.CHECKPOINT).read_text())
    state.update(done=[[0, 0]], complete=False)  # as if killed after chunk 1's files
    (out / reembed.CHECKPOINT).write_text(json.dumps(state))
    (out / "index.jsonl").unlink()
    second = FakeService()
    summary = run(tmp_path, second)
    assert second.embedded == [f"document {i}" for i in range(4, 10)]
    assert summary.chunks_resumed == 1 and summary.embedded == 6
    got = read_output(out)
    assert list(got) == [f"d{i}" for i in range(10)]
    for i in range(10):
        assert np.array_equal(got[f"d{i}"], np.array(vector(f"document {i}"), np.float32))


def test_an_edited_input_or_other_settings_are_refused(tmp_path: Path) -> None:
    corpus(tmp_path / "corpus.jsonl", 8)
    run(tmp_path, FakeService())
    with pytest.raises(InvalidInput, match=r"chunk_size: 4 → 5"):
        run(tmp_path, FakeService(), chunk_size=5)
    lines = (tmp_path / "corpus.jsonl").read_text().splitlines()
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    with pytest.raises(InvalidInput, match=r"changed since .*lines 1-4"):
        run(tmp_path, FakeService())


def test_a_foreign_directory_is_not_written_into(tmp_path: Path) -> None:
    corpus(tmp_path / "corpus.jsonl", 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("x")
    with pytest.raises(InvalidInput, match=r"not empty and holds no reembed\.json"):
        run(tmp_path, FakeService())


def test_jsonl_format(tmp_path: Path) -> None:
    corpus(tmp_path / "corpus.jsonl", 5)
    run(tmp_path, FakeService(), format="jsonl")
    rows = [
        json.loads(x)
        for f in sorted((tmp_path / "out" / "chunks").glob("*.jsonl"))
        for x in f.read_text().splitlines()
    ]
    assert [r["id"] for r in rows] == [f"d{i}" for i in range(5)]
    assert np.allclose(rows[3]["embedding"], vector("document 3"))


def test_identity_header_round_trips() -> None:
    assert ServedIdentity.from_header(IDENTITY.header_value()) == IDENTITY
    for bad in ("", "x; variant=fp32", IDENTITY.header_value().replace("class=", "klass=")):
        with pytest.raises(ValueError):
            ServedIdentity.from_header(bad)


# --- shards (an Indexed Job's pods, one output) ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("3/3", "I must be below N"),
        ("-1/2", "is not I/N"),
        ("x/2", "is not I/N"),
        ("0/0", "N must be at least 1"),
        ("1/2/3", "is not I/N"),
        ("", "is not I/N"),
    ],
)
def test_a_bad_shard_is_a_one_line_error(text: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason) as caught:
        reembed.Shard.parse(text)
    assert "\n" not in caught.value.message and repr(text) in caught.value.message


def test_the_shard_comes_from_the_flag_or_the_indexed_jobs_index() -> None:
    env = {reembed.INDEX_ENV: "3"}
    assert reembed.resolve_shard("1/4", None, {}) == reembed.Shard(1, 4)
    assert reembed.resolve_shard(None, 4, env) == reembed.Shard(3, 4)
    assert reembed.resolve_shard("1/4", 4, env) == reembed.Shard(1, 4)  # the flag wins
    assert reembed.resolve_shard(None, None, {}) is None
    refusals = [
        ((None, None, env), r"JOB_COMPLETION_INDEX=3 is set .* give --shards N"),
        ((None, 4, {}), r"--shards 4 without this process's index"),
        (("1/4", 3, {}), r"--shard 1/4 and --shards 3 disagree"),
        ((None, 3, env), r"JOB_COMPLETION_INDEX '3/3': I must be below N"),
        ((None, 4, {reembed.INDEX_ENV: "one"}), r"JOB_COMPLETION_INDEX 'one/4' is not I/N"),
    ]
    for args, message in refusals:
        with pytest.raises(InvalidInput, match=message):
            reembed.resolve_shard(*args)
    with pytest.raises(InvalidInput, match="want 0 <= I < N"):
        reembed.Shard(2, 2)  # the Python API checks as the CLI does


def shard(tmp_path: Path, service: FakeService, spec: str, **kw) -> reembed.Summary:
    return run(tmp_path, service, shard=reembed.Shard.parse(spec), **kw)


def test_shards_embed_each_document_once_and_the_last_merges(tmp_path: Path) -> None:
    """22 lines in chunks of 4 (chunks 0-5) over 3 shards: shard I sends exactly chunks
    I and I+3; the merged index is the unsharded run's, rejects included."""
    bad = {2: "{oops", 10: '{"id": "d0", "text": "again"}'}  # chunk 0 (shard 0), 2 (shard 2)
    corpus(tmp_path / "corpus.jsonl", 22, bad)
    out = tmp_path / "out"
    sent: dict[int, list[str]] = {}
    for i in range(3):
        service = FakeService()
        summary = shard(tmp_path, service, f"{i}/3")
        sent[i] = service.embedded
        assert summary.shards_complete == i + 1
        assert (out / reembed.SHARDS_DONE).exists() == (i == 2)
        assert (out / "index.jsonl").exists() == (i == 2)
        own = [json.loads(x)["line"] for x in (out / f"index-shard-{i}-of-3.jsonl").open()]
        assert {(line - 1) // 4 for line in own} == {i, i + 3}
    docs = [f"document {i}" for i in range(22) if i not in (1, 9)]
    assert sorted(sent[0] + sent[1] + sent[2]) == sorted(docs)  # disjoint, all of them
    assert sent[1] == [f"document {i}" for i in [*range(4, 8), *range(16, 20)]]
    done = json.loads((out / reembed.SHARDS_DONE).read_text())
    assert (done["shards"], done["documents"], done["rejected"]) == (3, 20, 2)
    assert done["served"] == IDENTITY.header_value()
    rejects = [json.loads(x)["line"] for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [2, 10]
    # The same as one unsharded run over the same input.
    got = read_output(out)
    whole = tmp_path / "whole"
    reembed.run(
        reembed.Options(
            url="http://embedkit.test",
            input=tmp_path / "corpus.jsonl",
            out=whole,
            chunk_size=4,
            concurrency=1,
        ),
        transport=httpx.MockTransport(FakeService()),
    )
    assert list(got) == list(read_output(whole))
    for ident, vec in got.items():
        i = int(str(ident)[1:])
        assert np.array_equal(vec, np.array(vector(f"document {i}"), np.float32))


def test_one_shard_resumes_alone(tmp_path: Path) -> None:
    corpus(tmp_path / "corpus.jsonl", 24)  # chunks 0-5; shard 1 of 2 owns 1, 3, 5
    shard(tmp_path, FakeService(), "0/2")
    dying = FakeService()

    def die(done: int) -> None:
        if done >= 4:  # one of its chunks written, then the pod dies
            raise RuntimeError("killed")

    dying.on_embed = die
    with pytest.raises(RuntimeError, match="killed"):
        shard(tmp_path, dying, "1/2")
    out = tmp_path / "out"
    assert json.loads((out / "reembed-shard-1-of-2.json").read_text())["done"] == [[1, 1]]
    assert not (out / reembed.SHARDS_DONE).exists()
    again = FakeService()
    summary = shard(tmp_path, again, "1/2")
    assert summary.chunks_resumed == 1 and summary.shards_complete == 2
    assert again.embedded == [f"document {i}" for i in [*range(12, 16), *range(20, 24)]]
    assert list(read_output(out)) == [f"d{i}" for i in range(24)]


def test_shards_refuse_to_mix_with_other_layouts(tmp_path: Path) -> None:
    corpus(tmp_path / "corpus.jsonl", 8)
    run(tmp_path, FakeService())  # unsharded
    with pytest.raises(InvalidInput, match=r"holds an unsharded checkpoint \(reembed\.json\)"):
        shard(tmp_path, FakeService(), "0/2")
    out = tmp_path / "out"
    for path in out.iterdir():
        if path.is_file():
            path.unlink()
    for path in (out / "chunks").iterdir():
        path.unlink()
    shard(tmp_path, FakeService(), "0/2")
    with pytest.raises(InvalidInput, match=r"holds shards of a run in 2 shards, not 3"):
        shard(tmp_path, FakeService(), "1/3")
    with pytest.raises(InvalidInput, match=r"holds the checkpoints of a run in 2 shards"):
        run(tmp_path, FakeService())
    with pytest.raises(InvalidInput, match=r"shard-0-of-2\.json was made with .*chunk_size: 4 → 5"):
        shard(tmp_path, FakeService(), "1/2", chunk_size=5)
    newer = FakeService()
    newer.identity = ServedIdentity(**{**IDENTITY.__dict__, "version": "v2"})
    with pytest.raises(IdentityMismatch, match=r"shard-0-of-2\.json was made with .*:v1.*:v2"):
        shard(tmp_path, newer, "1/2")
    assert not (out / "reembed-shard-1-of-2.json").exists()  # refused before any work
    (out / "notes.txt").write_text("x")
    with pytest.raises(InvalidInput, match=r"holds no shard checkpoints of 2 \(it holds notes"):
        shard(tmp_path, FakeService(), "1/2")


def test_a_shard_leaves_the_others_half_written_files_alone(tmp_path: Path) -> None:
    corpus(tmp_path / "corpus.jsonl", 8)
    chunks = tmp_path / "out" / "chunks"
    chunks.mkdir(parents=True)
    mine, theirs = chunks / ".00000000.npy.1.ab.tmp", chunks / ".00000001.npy.1.cd.tmp"
    mine.write_bytes(b"half")
    theirs.write_bytes(b"in flight")
    shard(tmp_path, FakeService(), "0/2")
    assert not mine.exists() and theirs.exists()


def test_cli_refuses_an_index_without_the_count_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from embedkit.cli import app

    corpus(tmp_path / "corpus.jsonl", 2)
    args = ["reembed", str(tmp_path / "corpus.jsonl"), "--out", str(tmp_path / "out")]
    for extra, env, message in [
        ([], {reembed.INDEX_ENV: "1"}, "JOB_COMPLETION_INDEX=1 is set"),
        (["--shard", "3/3"], {}, "--shard '3/3': I must be below N"),
        (["--shard", "x/2"], {}, "is not I/N"),
        (["--shards", "4"], {}, "--shards 4 without this process's index"),
    ]:
        result = CliRunner().invoke(app, [*args, *extra], env=env)
        assert result.exit_code == 1, result.output
        assert result.output.startswith("error: ") and len(result.output.splitlines()) == 1
        assert message in result.output, result.output
    assert not (tmp_path / "out").exists()


class Killed(Exception):
    """Stands for the pod dying between two chunks."""


def test_shards_through_a_running_service(server, tmp_path: Path) -> None:
    """Three shards (one from JOB_COMPLETION_INDEX through the CLI, one killed after its
    first chunk and resumed) over the session's server: every id once, in input order,
    each vector the service's own for that text."""
    from typer.testing import CliRunner

    from embedkit.cli import app

    texts = [f"shard test sentence {i}: {'a longer tail ' * (i % 5)}{i * 7919}" for i in range(30)]
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    out = tmp_path / "out"

    def options(spec: str) -> reembed.Options:
        return reembed.Options(
            url=server.url,
            input=path,
            out=out,
            chunk_size=4,
            concurrency=1,
            shard=reembed.Shard.parse(spec),
        )

    def die(done: int, total: int, what: str) -> None:
        raise Killed

    with pytest.raises(Killed):
        reembed.run(options("1/3"), progress=die)
    assert json.loads((out / "reembed-shard-1-of-3.json").read_text())["done"] == [[1, 1]]
    assert reembed.run(options("0/3")).shards_complete == 1
    args = ["reembed", str(path), "--out", str(out), "--url", server.url, "--chunk-size", "4"]
    result = CliRunner().invoke(app, [*args, "--shards", "3"], env={reembed.INDEX_ENV: "2"})
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert (summary["shard"], summary["shards_complete"]) == ("2/3", 2)
    assert not (out / "index.jsonl").exists()
    resumed = reembed.run(options("1/3"))  # chunks 1, 4, 7 (2 lines) of 0-7: 1 was done
    assert (resumed.chunks_resumed, resumed.embedded, resumed.shards_complete) == (1, 6, 3)

    done = json.loads((out / reembed.SHARDS_DONE).read_text())
    assert (done["complete"], done["documents"], done["rejected"]) == (True, 30, 0)
    got = read_output(out)  # each id once
    assert list(got) == [f"s{i}" for i in range(30)]
    answer = httpx.post(server.url + "/embed", json={"texts": texts}, timeout=60).json()
    want = np.array(answer["embeddings"], np.float32)
    assert np.abs(np.array(list(got.values())) - want).max() <= 1e-4
