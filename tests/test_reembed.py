"""`embedkit reembed` without a server: input parsing, retries, refusals, the checkpoint.

The service is httpx's in-memory transport answering as the real one does (the
identity header, base64 float32 bodies, 429 + Retry-After); the run against a real
server, killed and resumed, is in tests/http/test_operations.py.
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
