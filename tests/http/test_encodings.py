"""Output encodings and truncation control through the real server (docs/service.md §
Output encodings, § Truncation): int8/uint8/binary/ubinary codes equal
sentence-transformers' ``quantize_embeddings`` of the served float vectors with the
manifest's ranges; truncation from either side; how many inputs were cut; every bad
field answered with its own 4xx.

One server, serving a copy of the session's fp32 artifact with ranges calibrated as a
release does (on fewer texts, to stay quick).
"""

from __future__ import annotations

import base64
import shutil

import httpx
import numpy as np
import pytest

from embedkit.model.artifact import Artifact, register, seal
from embedkit.release.calibration import with_ranges
from embedkit.runtime.vectors import QUANTIZED, RANGED, decode_base64
from embedkit.serve.edge.schemas import TRUNCATED_HEADER

MODEL = "all-minilm-l6-v2"
DIM = 384
ENCODINGS = QUANTIZED
DTYPES = {"int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}
LONG = "alpha " + "word " * 300 + "omega"  # 304 tokens with [CLS] and [SEP]: over 256


@pytest.fixture(scope="module")
def calibrated(fp32_artifact, tmp_path_factory) -> Artifact:
    from embedkit.release.calibration import calibrate

    dest = tmp_path_factory.mktemp("calibrated") / "artifact"
    shutil.copytree(fp32_artifact.path, dest)
    art = Artifact.load(dest)
    return seal(with_ranges(art, calibrate(art, limit=300)))


@pytest.fixture(scope="module")
def enc_server(calibrated, launcher):
    return launcher.start(register(calibrated))


@pytest.fixture(scope="module")
def ranges(calibrated) -> np.ndarray:
    r = calibrated.manifest.encoding_ranges
    assert r is not None
    return np.array([r.min, r.max])


@pytest.fixture(scope="module")
def texts(data_dir) -> list[str]:
    from embedkit.model import evaldata

    return [*evaldata.sts_sentences("test")[:30], "", LONG]


def post(server, path: str, body: object) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def floats(server, path: str, texts: list[str], **options) -> np.ndarray:
    """The served float32 vectors, exactly (base64 carries the float32 bytes)."""
    if path == "/v1/embeddings":
        body = post(
            server, path, {"model": MODEL, "input": texts, "encoding_format": "base64", **options}
        ).json()
        rows = [base64.b64decode(d["embedding"]) for d in body["data"]]
        return np.vstack([np.frombuffer(row, dtype="<f4") for row in rows])
    body = post(server, path, {"texts": texts, "encoding_format": "base64", **options}).json()
    return decode_base64(body["embeddings"], body["dimensions"])


def codes(server, path: str, texts: list[str], encoding: str, **options) -> np.ndarray:
    if path == "/v1/embeddings":
        r = post(
            server, path, {"model": MODEL, "input": texts, "encoding_format": encoding, **options}
        )
        assert r.status_code == 200, r.text
        return np.array([d["embedding"] for d in r.json()["data"]])
    r = post(server, path, {"texts": texts, "encoding_format": encoding, **options})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["encoding_format"] == encoding and body["truncated"] == (LONG in texts)
    return np.array(body["embeddings"])


# --- encodings ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/embed", "/embed/query", "/v1/embeddings"])
def test_codes_are_quantize_embeddings_with_the_manifest_ranges(enc_server, ranges, texts, path):
    from sentence_transformers.util import quantize_embeddings

    full = floats(enc_server, path, texts)
    for encoding in ENCODINGS:
        got = codes(enc_server, path, texts, encoding)
        want = quantize_embeddings(full, encoding, ranges=ranges)
        assert got.shape == want.shape and np.array_equal(got, want), encoding
        assert got.min() >= np.iinfo(DTYPES[encoding]).min
        assert got.max() <= np.iinfo(DTYPES[encoding]).max
    assert codes(enc_server, path, texts, "binary").shape == (len(texts), DIM // 8)


def test_fewer_dimensions_keep_the_first_codes(enc_server, ranges, texts) -> None:
    """Codes for n dimensions are the whole vector's first n codes (quantised before the
    Matryoshka re-normalisation); binary ones pack the re-normalised vector's signs, the
    same bits, 100 → 13 bytes (the last zero-padded)."""
    from sentence_transformers.util import quantize_embeddings

    full = floats(enc_server, "/embed", texts)
    for encoding in RANGED:
        got = codes(enc_server, "/embed", texts, encoding, dimensions=100)
        assert np.array_equal(got, codes(enc_server, "/embed", texts, encoding)[:, :100])
        want = quantize_embeddings(full[:, :100], encoding, ranges=ranges[:, :100])
        assert np.array_equal(got, want)
    short = floats(enc_server, "/embed", texts, dimensions=100)
    for encoding in ("binary", "ubinary"):
        got = codes(enc_server, "/embed", texts, encoding, dimensions=100)
        assert got.shape == (len(texts), 13)
        assert np.array_equal(got, quantize_embeddings(short, encoding))


def test_ranges_are_fixed_not_per_request(enc_server, texts) -> None:
    """A text's int8 codes alone and amid other texts: at most one bucket apart (batch
    padding moves floats by ~1e-7); ranges taken from each request would move them far."""
    alone = codes(enc_server, "/embed", texts[:1], "int8")
    amid = codes(enc_server, "/embed", texts[:4], "int8")[:1]
    assert np.abs(alone.astype(int) - amid).max() <= 1
    assert np.array_equal(alone, codes(enc_server, "/embed", texts[:1], "int8"))


def test_base64_codes_are_the_raw_bytes(enc_server, texts) -> None:
    for encoding in ENCODINGS:
        ints = codes(enc_server, "/embed", texts, encoding)
        body = post(
            enc_server,
            "/embed",
            {"texts": texts, "encoding_format": encoding, "base64_codes": True},
        ).json()
        raw = np.frombuffer(base64.b64decode(body["embeddings"]), dtype=DTYPES[encoding])
        assert np.array_equal(raw.reshape(ints.shape), ints)
        assert body["dimensions"] == DIM
        item = post(
            enc_server,
            "/v1/embeddings",
            {"model": MODEL, "input": texts[:2], "encoding_format": encoding, "base64_codes": True},
        ).json()["data"][1]["embedding"]
        assert np.array_equal(
            np.frombuffer(base64.b64decode(item), dtype=DTYPES[encoding]), ints[1]
        )


def test_openai_client_asks_for_codes(enc_server, ranges, texts) -> None:
    from openai import BadRequestError, OpenAI
    from sentence_transformers.util import quantize_embeddings

    client = OpenAI(base_url=enc_server.url + "/v1", api_key="unused", max_retries=0)
    full = floats(enc_server, "/v1/embeddings", texts[:8])
    batch = client.embeddings.create(model=MODEL, input=texts[:8], encoding_format="int8")  # type: ignore[arg-type]
    got = np.array([d.embedding for d in batch.data])
    assert np.array_equal(got, quantize_embeddings(full, "int8", ranges=ranges))
    left = client.embeddings.create(
        model=MODEL, input=[LONG], extra_body={"truncation_direction": "left"}
    )
    assert left.data[0].embedding
    with pytest.raises(BadRequestError, match="Unrecognized request argument supplied: foo"):
        client.embeddings.create(model=MODEL, input="x", extra_body={"foo": 1})


def test_normalize_must_match_the_calibration(enc_server, texts) -> None:
    r = post(
        enc_server, "/embed", {"texts": texts[:2], "encoding_format": "int8", "normalize": False}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "encoding_unavailable"
    assert "normalize=false" in r.json()["error"]["message"]
    raw = codes(enc_server, "/embed", texts[:4], "binary", normalize=False)
    assert np.array_equal(raw, codes(enc_server, "/embed", texts[:4], "binary"))  # same signs


# --- truncation -----------------------------------------------------------------------------


def test_truncation_direction_keeps_the_special_tokens(enc_server) -> None:
    marks = post(enc_server, "/tokenize", {"texts": ["alpha", "omega"]}).json()["ids"]
    cls, alpha, sep = marks[0]
    omega = marks[1][1]
    rows = {}
    for side in ("right", "left"):
        r = post(enc_server, "/tokenize", {"texts": [LONG, "short"], "truncation_direction": side})
        body = r.json()
        assert r.headers[TRUNCATED_HEADER] == "1" and body["truncated"] == 1
        rows[side] = body["ids"][0]
        assert len(rows[side]) == body["max_length"] == 256
        assert rows[side][0] == cls and rows[side][-1] == sep
    assert rows["right"][1] == alpha and omega not in rows["right"]
    assert rows["left"][-2] == omega and alpha not in rows["left"]
    full = post(enc_server, "/tokenize", {"texts": [LONG], "truncate": False})
    assert full.status_code == 413
    assert "input[0] has 304 tokens" in full.json()["error"]["message"]
    default = post(enc_server, "/tokenize", {"texts": [LONG]}).json()["ids"][0]
    assert default == rows["right"]  # the model's side (GET /info)
    info = httpx.get(enc_server.url + "/info", timeout=10).json()
    assert info["limits"]["truncation_side"] == "right"
    assert info["encodings"]["int8_ranges"]["texts"] == 300

    # The vector of the left-truncated text is the vector of the tokens it kept.
    left = floats(enc_server, "/embed/query", [LONG], truncation_direction="left")
    kept = floats(enc_server, "/v1/embeddings", [rows["left"][1:-1]])
    assert float((left * kept).sum()) > 0.99999
    right = floats(enc_server, "/embed/query", [LONG])
    assert float((left * right).sum()) < 0.999
    by_ids = post(
        enc_server,
        "/v1/embeddings",
        {"model": MODEL, "input": [[alpha] * 300 + [omega]], "truncation_direction": "left"},
    )
    assert by_ids.headers[TRUNCATED_HEADER] == "1"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/embed", {"texts": ["a", LONG, LONG]}, "truncated"),
        ("/embed/query", {"texts": [LONG]}, "truncated"),
        ("/tokenize", {"texts": ["a", LONG]}, "truncated"),
        ("/v1/embeddings", {"model": MODEL, "input": ["a", LONG, "b", LONG]}, None),
        ("/v1/embeddings", {"model": MODEL, "input": "a"}, None),
    ],
)
def test_every_route_counts_truncated_inputs(enc_server, path, body, field) -> None:
    r = post(enc_server, path, body)
    inputs = body.get("texts") or body["input"]
    want = sum(1 for t in ([inputs] if isinstance(inputs, str) else inputs) if t == LONG)
    assert r.status_code == 200 and r.headers[TRUNCATED_HEADER] == str(want)
    if field:
        assert r.json()[field] == want


def test_openai_route_refuses_overlong_without_truncation(enc_server) -> None:
    r = post(
        enc_server, "/v1/embeddings", {"model": MODEL, "input": ["a", LONG], "truncate": False}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "input_too_long"
    assert r.json()["error"]["message"].startswith("input[1] has 304 tokens")
    ids = post(
        enc_server, "/v1/embeddings", {"model": MODEL, "input": [[5] * 300], "truncate": False}
    )
    assert ids.status_code == 413 and "input[0] has 302 tokens" in ids.json()["error"]["message"]


# --- bad input: each its own 4xx ------------------------------------------------------------

BAD = [
    # (path, body, status, code, param, words in the message)
    ("/embed", {"texts": ["a"], "encoding_format": "int4"}, 400, "invalid_input", None, "int8"),
    (
        "/v1/embeddings",
        {"model": MODEL, "input": "a", "encoding_format": "fp8"},
        400,
        "invalid_input",
        None,
        "ubinary",
    ),
    ("/embed", {"texts": ["a"], "truncation_direction": "up"}, 400, "invalid_input", None, "left"),
    (
        "/v1/embeddings",
        {"model": MODEL, "input": "a", "truncation_direction": "middle"},
        400,
        "invalid_input",
        None,
        "right",
    ),
    ("/tokenize", {"texts": ["a"], "truncation_direction": 1}, 400, "invalid_input", None, ""),
    (
        "/v1/embeddings",
        {"model": MODEL, "input": "a", "normalize": False},
        400,
        "unsupported_parameter",
        "normalize",
        "/embed",
    ),
    (
        "/tokenize",
        {"texts": ["a"], "encoding_format": "int8"},
        400,
        "unsupported_parameter",
        "encoding_format",
        "/v1/embeddings",
    ),
    # native routes take `model` too (several models in one deployment); unknown → 404
    ("/embed", {"texts": ["a"], "model": "other"}, 404, "model_not_found", "model", MODEL),
    (
        "/v1/embeddings",
        {"model": MODEL, "input": "a", "foo": 1},
        400,
        "unknown_parameter",
        "foo",
        "Unrecognized request argument supplied: foo",
    ),
    (
        "/embed/query",
        {"texts": ["a"], "nomralize": True},
        400,
        "unknown_parameter",
        "nomralize",
        "nomralize",
    ),
    (
        "/embed",
        {"texts": ["a"], "base64_codes": True},
        400,
        "invalid_input",
        "base64_codes",
        "int8",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "code", "param", "words"), BAD)
def test_bad_fields_get_their_own_4xx(enc_server, path, body, status, code, param, words) -> None:
    r = post(enc_server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err
    assert err["type"] == "invalid_request_error" and words in err["message"]
    assert "\n" not in err["message"]


def test_docs_describe_the_new_fields(enc_server) -> None:
    doc = httpx.get(enc_server.url + "/docs.json", timeout=10).json()
    for route, fields in {
        "/v1/embeddings": ("truncate", "truncation_direction", "encoding_format", "base64_codes"),
        "/embed": ("truncate", "truncation_direction", "encoding_format", "base64_codes"),
        "/tokenize": ("truncate", "truncation_direction"),
    }.items():
        op = doc["paths"][route]["post"]
        props = op["requestBody"]["content"]["application/json"]["schema"]["properties"]
        for field in fields:
            assert props[field].get("description"), (route, field)
        assert TRUNCATED_HEADER in op["responses"]["200"]["headers"]
    text = str(doc["paths"]["/embed"]["post"]["requestBody"])
    for word in ("ubinary", "left"):
        assert word in text
