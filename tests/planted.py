"""Planted variants: real ONNX graphs whose effect on the vectors is known exactly.

Each is the fp32 graph with one fixed MatMul appended to its pooled output, so it
goes through the engine and the gate like any variant:

* ``copy``: no MatMul at all (the fp32 graph itself) → index-compatible;
* ``rotated``: every coordinate pair rotated by the same small angle. Every cosine
  between two vectors is unchanged (Spearman and retrieval identical), but each vector
  is cos(0.2) ≈ 0.980 from its fp32 self → fidelity fails → reindex;
* ``damaged``: all but 24 of the coordinates zeroed → task quality collapses → rejected.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.model import toolchain
from embedkit.model.artifact import MODEL_FILE, TOKENIZER_FILE, Artifact, MeasuredOn, finalize, seal
from embedkit.quality.gate import GateThresholds, GateVerdict, with_verdict

ANGLE = 0.2
_TH = GateThresholds(spearman_drop_max={}, cosine_p1_min=0.99, overlap_min=0.95)


def _matrix(kind: str, dim: int) -> np.ndarray | None:
    if kind == "copy":
        return None
    if kind == "rotated":
        c, s = np.cos(ANGLE), np.sin(ANGLE)
        m = np.eye(dim, dtype=np.float32)
        for i in range(0, dim - 1, 2):
            m[i, i], m[i, i + 1], m[i + 1, i], m[i + 1, i + 1] = c, s, -s, c
        return m
    if kind == "damaged":
        return np.diag((np.arange(dim) < 24).astype(np.float32))
    raise ValueError(kind)


def plant(parent: Artifact, kind: str, output: Path) -> Artifact:
    """The ``kind`` variant of ``parent`` as a new artifact directory (not gated)."""
    import onnx
    from onnx import helper, numpy_helper

    output.mkdir(parents=True)
    model = onnx.load(str(parent.model_path))
    matrix = _matrix(kind, parent.manifest.embedding_config.dimension)
    if matrix is not None:
        out = parent.manifest.output
        graph = model.graph
        for node in graph.node:
            node.output[:] = [f"{out}_unplanted" if o == out else o for o in node.output]
        graph.initializer.append(numpy_helper.from_array(matrix, "planted_matrix"))
        graph.node.append(
            helper.make_node("MatMul", [f"{out}_unplanted", "planted_matrix"], [out], "planted")
        )
    onnx.save(model, str(output / MODEL_FILE))
    shutil.copyfile(parent.tokenizer_path, output / TOKENIZER_FILE)
    fields = parent.manifest.model_dump(
        mode="json", exclude={"files", "created_at", "records", "parity", "quantization"}
    )
    fields.update(
        quantization={"mode": "fused-fp32", "settings": {"planted": kind}},
        parent=str(parent.path),
    )
    return finalize(output, fields)


def _here() -> MeasuredOn:
    return MeasuredOn(
        parent_sha256="",
        isa=toolchain.detect_isa().level,
        runtime="onnxruntime",
        version=toolchain.runtime_version(),
    )


def stamped(parent: Artifact, source: Artifact, out: Path, klass: str, **measured: str) -> Artifact:
    """A copy of ``source`` stamped as ``klass``, measured here against ``parent``
    (``measured`` overrides a binding field, e.g. isa='amx')."""
    shutil.copytree(source.path, out)
    on = _here().model_copy(update={"parent_sha256": parent.manifest.files["model.onnx"]})
    fields: dict[str, Any] = {"compatibility": klass}
    verdict = GateVerdict(
        approved=klass == "index-compatible",
        **fields,
        failures=[],
        segments_checked=1,
        measured_on=on.model_copy(update=measured),
    )
    return seal(with_verdict(Artifact.load(out), verdict, name=f"planted-{klass}", thresholds=_TH))
