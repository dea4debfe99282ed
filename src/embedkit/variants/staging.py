"""What every variant builder shares: a staging folder that becomes the variant's artifact
(the parent's tokenizer, the new graph, a manifest naming the parent and the mode), and
the calibration sentences some builders read, tokenised exactly as the engine does.

Used by :mod:`embedkit.variants.quantize` (ONNX Runtime's variants) and
:mod:`embedkit.variants.openvino`.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedkit.core.errors import ArtifactError, InvalidInput
from embedkit.model import evaldata, toolchain
from embedkit.model.artifact import (
    MANIFEST,
    MODEL_FILE,
    POOLING_MASK_INPUT,
    TOKENIZER_FILE,
    Artifact,
    QuantizationMode,
    draft,
    move_into_place,
    seal,
    sha256_file,
    staging_dir,
)
from embedkit.runtime.tokens import TextTokenizer, pad_batch


def _check_parent(parent: Artifact) -> None:
    mode = parent.manifest.quantization.mode
    if mode != "none":
        raise InvalidInput(
            f"variants are built from an fp32 export, but {parent.path} is already '{mode}'"
        )


def parent_ref(parent: Artifact) -> str | None:
    """How a variant's manifest names ``parent``: its tag, else the sha256 of its written
    manifest; None while that manifest is not written (the release fills it in then)."""
    if parent.tag:
        return parent.tag
    if not parent.written:
        return None
    return "manifest-sha256:" + sha256_file(parent.path / MANIFEST)


def staged(
    parent: Artifact,
    output: Path,
    build: Callable[[Path, Path], dict[str, Any]],
    mode: QuantizationMode,
    write: bool,
) -> Artifact:
    """Run ``build(src_model, dst_model) -> settings`` in a staging dir, hash the files into
    the variant's manifest, write it (unless ``write=False``: the caller adds to it and
    writes it, :func:`embedkit.model.artifact.seal`); move the artifact in place."""
    _check_parent(parent)
    if write and parent_ref(parent) is None:
        raise InvalidInput(
            f"the parent {parent.path} has no written manifest for the variant to name; "
            "write it first, or build with write=False"
        )
    output = Path(output)
    staging = staging_dir(output)
    try:
        work = staging / "work"
        art = staging / "artifact"
        work.mkdir()
        art.mkdir()
        # Builders read the parent's graph from `work`: ORT's quantizers write scratch files
        # beside their input (`model-inferred.onnx`), and the parent must not change, not
        # for a moment (a concurrent verify of it would see a file its manifest lacks).
        # A copy, not a hard link: nothing a builder does to its input can reach the parent.
        src = work / MODEL_FILE
        shutil.copyfile(parent.model_path, src)
        settings = build(src, art / MODEL_FILE)
        shutil.copyfile(parent.tokenizer_path, art / TOKENIZER_FILE)
        _strip_to_declared_output(art / MODEL_FILE, parent.manifest.output)
        fields = parent.manifest.model_dump(
            mode="json", exclude={"files", "created_at", "records", "parity", "quantization"}
        )
        fields.update(
            quantization={"mode": mode, "settings": settings},
            parent=parent_ref(parent),
            toolchain=toolchain.versions(),
            parity=None,
        )
        built = draft(art, fields)
        return move_into_place(seal(built) if write else built, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _strip_to_declared_output(model_path: Path, output: str) -> None:
    """Tools may leave or rename outputs; the artifact contract is one named output."""
    import onnx

    model = onnx.load(str(model_path))
    names = [o.name for o in model.graph.output]
    if output not in names:
        raise ArtifactError(f"variant graph lost its {output!r} output (has {names})")
    if names != [output]:
        for out in list(model.graph.output):
            if out.name != output:
                model.graph.output.remove(out)
        onnx.save(model, str(model_path))


def calibration_sentences(
    calibration: Path | None, size: int, seed: int
) -> tuple[list[str], dict[str, Any]]:
    path = Path(calibration) if calibration else evaldata.data_file("stsbenchmark/sts-train.csv")
    sentences = read_calibration_sentences(path, size, seed=seed)
    record = {"file": path.name, "sha256": sha256_file(path), "size": len(sentences), "seed": seed}
    return sentences, record


def read_calibration_sentences(path: Path, size: int, *, seed: int = 0) -> list[str]:
    """Unique sentences of an STS-Benchmark-format file (both sides), sampled reproducibly."""
    if size < 1:
        raise InvalidInput(f"calibration size must be >= 1, got {size}")
    seen: dict[str, None] = {}
    for pair in evaldata.read_sts(path):
        seen.setdefault(pair.sentence1)
        seen.setdefault(pair.sentence2)
    sentences = list(seen)
    random.Random(seed).shuffle(sentences)
    return sentences[:size]


class SentenceCalibrationReader:
    """ORT CalibrationDataReader over real sentences, tokenised exactly as the engine does."""

    def __init__(self, parent: Artifact, sentences: Sequence[str], batch_size: int = 16) -> None:
        tokenizer = TextTokenizer.from_artifact(parent)
        pad_id = tokenizer.pad_id
        ids = tokenizer.encode(list(sentences))
        # One width for every batch: the histogram calibrators (entropy, percentile)
        # stack activations across batches and need equal shapes.
        width = max(len(x) for x in ids)
        self._batches: list[dict[str, np.ndarray]] = []
        for start in range(0, len(ids), batch_size):
            input_ids, mask = pad_batch(ids[start : start + batch_size], pad_id)
            extra = ((0, 0), (0, width - input_ids.shape[1]))
            input_ids = np.pad(input_ids, extra, constant_values=pad_id)
            mask = np.pad(mask, extra, constant_values=0)
            feed = {
                "input_ids": input_ids,
                "attention_mask": mask,
                "token_type_ids": np.zeros_like(input_ids),
                POOLING_MASK_INPUT: mask,  # include_prompt=false graphs: no prompt here
            }
            self._batches.append({k: v for k, v in feed.items() if k in parent.manifest.inputs})
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self._batches)

    def rewind(self) -> None:
        self._iter = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)
