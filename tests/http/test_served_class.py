"""The served identity over HTTP: the class served, on every route and error; a variant
measured on another ISA level is refused (one log line, a metric) and fp32 serves; an
OpenVINO variant serves on OpenVINO and says so."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from tests.planted import plant, stamped

from embedkit.model import toolchain
from embedkit.model.artifact import Artifact, register
from embedkit.serve.engine.identity import HEADER


@pytest.fixture(scope="module")
def copy_variant(fp32_artifact: Artifact, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    return plant(fp32_artifact, "copy", tmp_path_factory.mktemp("planted") / "copy")


def test_variant_measured_on_another_isa_is_refused_and_fp32_serves(
    launcher, model_tag: str, fp32_artifact: Artifact, copy_variant: Artifact, tmp_path: Path
) -> None:
    import bentoml

    other = "amx" if toolchain.detect_isa().level != "amx" else "avx2"
    art = stamped(fp32_artifact, copy_variant, tmp_path / "v", "index-compatible", isa=other)
    server = launcher.start(register(art))
    # The parent is found by its graph's checksum, newest intact version first. Other
    # modules register copies of the same export meanwhile (test_encodings' calibrated
    # one), so the server's choice is checked against the store, not recomputed here.
    info = httpx.get(server.url + "/info", timeout=30).json()
    parent = info["served"]["tag"]
    stored = bentoml.models.get(parent).info.metadata
    assert parent.partition(":")[0] == model_tag.partition(":")[0]
    assert stored["quantization"] == "none"
    assert stored["model_sha256"] == fp32_artifact.manifest.files["model.onnx"]
    line = server.wait_for_line("embedkit refuses variant")
    assert f"measured on ISA level {other}" in line and parent in line
    ok = httpx.post(server.url + "/embed", json={"texts": ["a"]}, timeout=30)
    bad = httpx.post(server.url + "/embed", json={"texts": "not a list"}, timeout=30)
    body = {"input": "a", "model": model_tag.partition(":")[0]}
    openai = httpx.post(server.url + "/v1/embeddings", json=body, timeout=30)
    assert ok.status_code == 200 and bad.status_code == 400 and openai.status_code == 200
    for response in (ok, bad, openai):
        header = response.headers[HEADER]
        assert header.startswith(parent + "; variant=fp32; class=index-compatible")
        assert "precision=fp32" in header and f"isa={toolchain.detect_isa().level}" in header
    assert info["manifest"]["variant"] == "fp32"
    assert f"measured on ISA level {other}" in info["served"]["refused"]
    model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]
    assert model["embedkit"]["compatibility"] == "index-compatible"
    text = httpx.get(server.url + "/metrics", timeout=30).text
    refusals = [x for x in text.splitlines() if x.startswith("embedkit_variant_refusals_total{")]
    assert any('variant="planted-index-compatible"' in x and 'reason="isa"' in x for x in refusals)
    assert 'variant="fp32"' in next(
        line for line in text.splitlines() if line.startswith("embedkit_served_model_info{")
    )


def test_named_reindex_variant_serves_and_says_so(
    launcher, model_tag: str, fp32_artifact: Artifact, copy_variant: Artifact, tmp_path: Path
) -> None:
    art = stamped(fp32_artifact, copy_variant, tmp_path / "v", "reindex")
    register(art)
    server = launcher.start(model_tag, {"EMBEDKIT_VARIANT": "planted-reindex"})
    response = httpx.post(server.url + "/embed", json={"texts": ["a"]}, timeout=30)
    assert response.status_code == 200
    assert "; variant=planted-reindex; class=reindex;" in response.headers[HEADER]
    info = httpx.get(server.url + "/info", timeout=30).json()
    assert info["served"]["compatibility"] == "reindex" and info["served"]["refused"] is None


def test_a_forced_rejected_variant_is_refused_even_when_named(
    launcher, model_tag: str, fp32_artifact: Artifact, copy_variant: Artifact, tmp_path: Path
) -> None:
    """Class ``rejected`` never serves (docs/service.md): registered with --force and named
    with EMBEDKIT_VARIANT, it is refused at startup and its fp32 parent serves."""
    import shutil

    from embedkit.model.artifact import seal
    from embedkit.quality.gate import GateThresholds, GateVerdict, with_verdict

    shutil.copytree(copy_variant.path, tmp_path / "r")
    verdict = GateVerdict(
        approved=False,
        compatibility="rejected",
        failures=[],
        segments_checked=1,
        measured_on={
            "parent_sha256": fp32_artifact.manifest.files["model.onnx"],
            "isa": toolchain.detect_isa().level,
            "onnxruntime": toolchain.runtime_version(),
        },
    )
    th = GateThresholds(spearman_drop_max={}, cosine_p1_min=0.99, overlap_min=0.95)
    art = seal(
        with_verdict(
            Artifact.load(tmp_path / "r"),
            verdict,
            force=True,
            name="forced-rejected",
            thresholds=th,
        )
    )
    server = launcher.start(register(art), {"EMBEDKIT_VARIANT": "forced-rejected"})
    line = server.wait_for_line("embedkit refuses variant")
    assert "forced-rejected" in line and "class rejected" in line
    ok = httpx.post(server.url + "/embed", json={"texts": ["a"]}, timeout=30)
    assert ok.status_code == 200
    assert "; variant=fp32; class=index-compatible;" in ok.headers[HEADER]
    info = httpx.get(server.url + "/info", timeout=30).json()
    assert "class rejected" in info["served"]["refused"]


def test_an_openvino_variant_serves_on_openvino_with_a_stream_per_run(
    launcher, fp32_artifact: Artifact, tmp_path: Path
) -> None:
    """`bentoml serve` of an OpenVINO variant measured here: it serves on OpenVINO, says so
    (header, /info) and has a stream per parallel run of the service (else they queue)."""
    pytest.importorskip("openvino", reason="needs the openvino extra")
    import numpy as np

    from embedkit.core.settings import Settings
    from embedkit.model.artifact import amend, seal
    from embedkit.runtime.engine import Engine
    from embedkit.serve.pipeline.options import ort_runs
    from embedkit.variants.quantize import build_variant

    ov = build_variant(fp32_artifact, "openvino-fp32", tmp_path / "ov")
    version = toolchain.runtime_version("openvino")
    art = stamped(
        fp32_artifact, ov, tmp_path / "v", "index-compatible", runtime="openvino", version=version
    )
    # A name of its own: the session's store is shared (NAME:latest is a release's baseline).
    server = launcher.start(register(seal(amend(art, {"name": "served-openvino"}))))
    texts = ["a short one", "a longer sentence about the weather in Lisbon today"]
    r = httpx.post(server.url + "/embed", json={"texts": texts}, timeout=60)
    assert r.status_code == 200, r.text
    assert "; variant=planted-index-compatible;" in r.headers[HEADER]
    assert "precision=fp32; provider=OpenVINO/CPU;" in r.headers[HEADER]
    want = Engine(fp32_artifact).encode(texts)
    assert np.abs(np.asarray(r.json()["embeddings"]) - want).max() < 1e-4
    engine = httpx.get(server.url + "/info", timeout=30).json()["engine"]
    assert engine["runtime"] == "openvino"
    assert engine["openvino"]["streams"] == ort_runs(Settings())
