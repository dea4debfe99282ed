"""Optimum export of a sentence-transformers model to a pooled ONNX artifact.

The exported graph takes ``input_ids``/``attention_mask`` (plus
``token_type_ids`` only if the model declares it, and ``pooling_mask`` only if its
pooling leaves the prompt out, include_prompt: false) and returns only the pooled
``sentence_embedding [batch, dim]``: the per-token tensor never leaves the
session. The model's prompts go into the manifest. Normalisation is left out
of the graph on purpose and applied by the engine from the manifest, so a
client can still ask for raw vectors and Matryoshka truncation re-normalises
correctly.

A reranker (``task: rerank``, a sentence-transformers ``CrossEncoder``) goes through
Optimum's sequence-classification (``text-classification``) export instead: the graph
takes a pair's ``input_ids``/``attention_mask`` (and ``token_type_ids``, which tell the
query from the document, if the model has them) and returns its raw score,
``logits [batch, 1]``. The activation CrossEncoder applies after (Sigmoid by default) is
recorded in the manifest and applied by the runtime, so raw scores stay available.

Imports torch, sentence-transformers and Optimum lazily: never import this
module from the serving path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedkit.core.errors import ArtifactError, MissingExtra, ModelSourceError
from embedkit.model import toolchain
from embedkit.model.artifact import (
    FORMAT_VERSION,
    MODEL_FILE,
    POOLING_MASK_INPUT,
    TOKENIZER_FILE,
    Artifact,
    SourceRecord,
    draft,
    move_into_place,
    seal,
    sha256_tree,
    staging_dir,
)
from embedkit.model.recipe import (
    EmbeddingConfig,
    PromptConfig,
    Recipe,
    RerankConfig,
    is_cross_encoder,
    read_embedding_config,
    read_prompt_config,
    read_rerank_config,
)

log = logging.getLogger(__name__)
OUTPUT_NAME = "sentence_embedding"
SCORE_OUTPUT = "logits"  # a sequence classifier's raw scores, [batch, num_labels]
Step = Callable[[str], None]


def require_export_extra() -> None:
    try:
        import optimum.exporters.onnx  # noqa: F401
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(
            f"export needs the export extra ({exc.name} is missing): pip install 'embedkit[export]'"
        ) from exc


def source_checksum(model_dir: Path) -> str:
    """One sha256 over the source model's files (relative path + file digest, sorted)."""
    digest = hashlib.sha256()
    for rel, file_digest in sha256_tree(model_dir).items():
        digest.update(f"{rel}\0{file_digest}\n".encode())
    return digest.hexdigest()


def _load_pytorch(kind: str, model_dir: Path, device: str) -> Any:
    """sentence-transformers' ``kind`` (SentenceTransformer or CrossEncoder) of
    ``model_dir``, offline; missing torch or a loader failure is one line."""
    try:
        import sentence_transformers
        import torch  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(
            f"the PyTorch reference needs {exc.name}: pip install 'embedkit[export]'"
        ) from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return getattr(sentence_transformers, kind)(
            str(model_dir), device=device, local_files_only=True
        )
    except Exception as exc:  # the loader raises bare Exceptions: translate at the boundary
        what = "a sentence-transformers model" if kind == "SentenceTransformer" else f"a {kind}"
        raise ModelSourceError(f"cannot load {model_dir} as {what}: {exc}") from exc


def load_reference(model_dir: Path, device: str = "cpu") -> Any:
    """The PyTorch SentenceTransformer encoder: the reference for parity.

    Needs torch and sentence-transformers only (not Optimum): the GPU check loads it
    with ``device="cuda"`` where no exporter is installed.
    """
    return _load_pytorch("SentenceTransformer", model_dir, device)


def load_cross_encoder(model_dir: Path, device: str = "cpu") -> Any:
    """The PyTorch ``CrossEncoder``: a reranker's reference for parity (and what export
    reads its classifier from)."""
    return _load_pytorch("CrossEncoder", model_dir, device)


def _pad_token(model_dir: Path, tokenizer: Any) -> tuple[str, int]:
    import json

    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = model_dir / name
        if file.is_file():
            token = json.loads(file.read_text()).get("pad_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
                return token, int(tokenizer.token_to_id(token))
    padding = tokenizer.padding
    if padding:
        return str(padding["pad_token"]), int(padding["pad_id"])
    raise ModelSourceError(f"{model_dir}: the tokenizer defines no padding token")


def _keep_pooled_output(onnx_path: Path, dimension: int, name: str = OUTPUT_NAME) -> list[str]:
    """Keep only the output ``name`` (the pooled embedding; a reranker's scores), typed
    ``[batch_size, dimension]``; return the graph's inputs."""
    import onnx

    model = onnx.load(str(onnx_path))
    outputs = [o.name for o in model.graph.output]
    if name not in outputs:
        raise ArtifactError(f"exported graph has no {name!r} output (got {outputs})")
    for out in list(model.graph.output):
        if out.name != name:
            model.graph.output.remove(out)
        else:  # the exporter leaves the width symbolic; it is a fact of the model
            out.type.tensor_type.shape.dim[1].dim_value = dimension
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))
    return [i.name for i in model.graph.input]


def export(
    recipe: Recipe,
    output: Path,
    *,
    opset: int | None = None,
    step: Step | None = None,
    write: bool = True,
) -> Artifact:
    """Export ``recipe``'s model to a new fp32 artifact directory ``output``.

    The artifact is written to a temporary folder beside ``output`` and moved
    into place only when complete; an existing artifact is never overwritten.
    ``write=False`` leaves its manifest unwritten (:func:`embedkit.model.artifact.draft`)
    for a caller that adds to it and writes it once (the release pipeline).
    """
    say = step or (lambda _msg: None)
    output = Path(output)
    staging = staging_dir(output)
    try:
        return _export_into(recipe, output, staging, opset=opset, say=say, write=write)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export_into(
    recipe: Recipe, output: Path, staging: Path, *, opset: int | None, say: Step, write: bool
) -> Artifact:
    """The export proper, built inside ``staging`` (owned and removed by :func:`export`)."""
    say("resolving model source")
    model_dir, model_version = recipe.source.resolve()
    if recipe.task == "rerank":
        return _export_reranker(
            recipe, model_dir, model_version, output, staging, opset=opset, say=say, write=write
        )
    if is_cross_encoder(model_dir):
        raise ModelSourceError(f"{model_dir} is a cross-encoder; its recipe needs task: rerank")
    config = read_embedding_config(model_dir)
    prompts = read_prompt_config(model_dir, recipe)
    require_export_extra()

    say("loading the PyTorch encoder")
    reference = load_reference(model_dir)
    # Export Transformer → Pooling (→ Dense) without Normalize: the engine normalises.
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize

    modules = [m for m in reference if not isinstance(m, Normalize)]
    unnormalized = SentenceTransformer(modules=modules, device="cpu")
    unnormalized.max_seq_length = config.max_seq_length

    say("exporting with Optimum")
    from optimum.exporters.onnx import onnx_export_from_model

    onnx_dir = staging / "optimum"
    try:
        onnx_export_from_model(
            unnormalized,
            onnx_dir,
            opset=opset or recipe.opset,
            library_name="sentence_transformers",
            task="feature-extraction",
            do_validation=False,  # our contract check is stricter and runs next
            custom_onnx_configs=None
            if config.include_prompt
            else _pooling_mask_config(unnormalized),
        )
    except Exception as exc:  # Optimum raises many types; one clear line for the user
        raise ArtifactError(f"Optimum export failed: {exc}") from exc
    artifact_dir = staging / "artifact"
    artifact_dir.mkdir()
    shutil.move(onnx_dir / MODEL_FILE, artifact_dir / MODEL_FILE)
    inputs = _keep_pooled_output(artifact_dir / MODEL_FILE, config.dimension)

    say(
        "writing tokenizer and manifest" if write else "writing tokenizer (the manifest comes last)"
    )
    pad_token, pad_id = _copy_tokenizer(model_dir, artifact_dir)
    built = draft(
        artifact_dir,
        manifest_fields(
            recipe=recipe,
            model_version=model_version,
            source_sha256=source_checksum(model_dir),
            config=config,
            pad=(pad_token, pad_id),
            inputs=inputs,
            opset=opset or recipe.opset,
            prompts=prompts,
        ),
    )
    return move_into_place(seal(built) if write else built, output)


def _copy_tokenizer(model_dir: Path, artifact_dir: Path) -> tuple[str, int]:
    """The model's fast tokenizer into the artifact; its padding token and id."""
    from tokenizers import Tokenizer

    src_tokenizer = model_dir / TOKENIZER_FILE
    if not src_tokenizer.is_file():
        raise ModelSourceError(
            f"{model_dir} has no {TOKENIZER_FILE} (a fast tokenizer is required)"
        )
    shutil.copyfile(src_tokenizer, artifact_dir / TOKENIZER_FILE)
    return _pad_token(model_dir, Tokenizer.from_file(str(src_tokenizer)))


def _export_reranker(
    recipe: Recipe,
    model_dir: Path,
    model_version: str,
    output: Path,
    staging: Path,
    *,
    opset: int | None,
    say: Step,
    write: bool,
) -> Artifact:
    """A CrossEncoder through Optimum's sequence-classification export: pairs in, one raw
    score per pair out (``logits [batch, 1]``); the activation goes to the manifest."""
    config = read_rerank_config(model_dir)
    require_export_extra()

    say("loading the PyTorch cross-encoder")
    reference = load_cross_encoder(model_dir)
    classifier = reference.model  # the transformers *ForSequenceClassification inside

    say("exporting with Optimum (text-classification)")
    from optimum.exporters.onnx import onnx_export_from_model

    onnx_dir = staging / "optimum"
    try:
        onnx_export_from_model(
            classifier,
            onnx_dir,
            opset=opset or recipe.opset,
            library_name="transformers",
            task="text-classification",
            do_validation=False,  # the pair contract is stricter and runs next
        )
    except Exception as exc:  # Optimum raises many types; one clear line for the user
        raise ArtifactError(f"Optimum export failed: {exc}") from exc
    artifact_dir = staging / "artifact"
    artifact_dir.mkdir()
    shutil.move(onnx_dir / MODEL_FILE, artifact_dir / MODEL_FILE)
    inputs = _keep_pooled_output(artifact_dir / MODEL_FILE, config.num_labels, SCORE_OUTPUT)

    say(
        "writing tokenizer and manifest" if write else "writing tokenizer (the manifest comes last)"
    )
    pad = _copy_tokenizer(model_dir, artifact_dir)
    built = draft(
        artifact_dir,
        rerank_manifest_fields(
            recipe=recipe,
            model_dir=model_dir,
            model_version=model_version,
            config=config,
            pad=pad,
            inputs=inputs,
            opset=opset or recipe.opset,
        ),
    )
    return move_into_place(seal(built) if write else built, output)


def rerank_manifest_fields(
    *,
    recipe: Recipe,
    model_dir: Path,
    model_version: str,
    config: RerankConfig,
    pad: tuple[str, int],
    inputs: list[str],
    opset: int,
) -> dict[str, Any]:
    src = recipe.source
    return {
        "format_version": FORMAT_VERSION,
        "name": recipe.name,
        "model_id": recipe.model_id,
        "model_version": model_version,
        "task": "rerank",
        "source_sha256": source_checksum(model_dir),
        "source": SourceRecord(
            path=str(Path(model_dir).resolve()),
            package=src.package,
            hub_id=src.hub_id,
            revision=src.revision,
        ).model_dump(),
        "rerank": config.model_dump(),
        "tokenizer": {
            "max_length": config.max_seq_length,
            "truncation_side": "right",
            "do_lower_case": config.do_lower_case,
            "pad_token": pad[0],
            "pad_id": pad[1],
        },
        "inputs": inputs,
        "output": SCORE_OUTPUT,
        "opset": opset,
        "toolchain": toolchain.versions(),
    }


def _pooling_mask_config(model: Any) -> dict[str, Any]:
    """Optimum's sentence-transformers export with a third input, ``pooling_mask``, that the
    Pooling module reads instead of the attention mask (include_prompt: false).

    The transformer still attends over ``attention_mask``; the caller zeroes the prompt's
    positions in ``pooling_mask``, as sentence-transformers' Pooling does with its prompt
    length. Pooling stays inside the graph (so does a Dense after it): only this input is
    new, and a model that pools its prompt keeps the two-input graph unchanged.
    """
    from optimum.exporters.onnx.model_configs import SentenceTransformersTransformerOnnxConfig
    from optimum.exporters.onnx.model_patcher import ModelPatcher
    from optimum.utils import DummyTextInputGenerator

    class PoolingMaskGenerator(DummyTextInputGenerator):
        SUPPORTED_INPUT_NAMES = (POOLING_MASK_INPUT,)

        def generate(self, input_name: str, *args: Any, **kwargs: Any) -> Any:
            return super().generate("attention_mask", *args, **kwargs)

    class PoolingMaskPatcher(ModelPatcher):
        def __init__(self, config: Any, model: Any, model_kwargs: Any) -> None:
            super().__init__(config, model, model_kwargs)
            transformer, *rest = list(model)

            def patched_forward(input_ids: Any, attention_mask: Any, pooling_mask: Any) -> Any:
                features = transformer({"input_ids": input_ids, "attention_mask": attention_mask})
                features["attention_mask"] = pooling_mask  # the mask Pooling reads
                for module in rest:
                    features = module(features)
                return {k: features[k] for k in ("token_embeddings", OUTPUT_NAME)}

            self.patched_forward = patched_forward

    base = SentenceTransformersTransformerOnnxConfig

    class PoolingMaskConfig(base):  # type: ignore[misc,valid-type]
        _MODEL_PATCHER = PoolingMaskPatcher
        DUMMY_INPUT_GENERATOR_CLASSES = (*base.DUMMY_INPUT_GENERATOR_CLASSES, PoolingMaskGenerator)

        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            return {**super().inputs, POOLING_MASK_INPUT: {0: "batch_size", 1: "sequence_length"}}

    return {"model": PoolingMaskConfig(model[0].auto_model.config, task="feature-extraction")}


def manifest_fields(
    *,
    recipe: Recipe,
    model_version: str,
    source_sha256: str,
    config: EmbeddingConfig,
    pad: tuple[str, int],
    inputs: list[str],
    opset: int,
    prompts: PromptConfig | None = None,
) -> dict[str, Any]:
    prompts = prompts or PromptConfig()
    return {
        "name": recipe.name,
        "model_id": recipe.model_id,
        "model_version": model_version,
        "source_sha256": source_sha256,
        "embedding": config.model_dump(),
        "tokenizer": {
            "max_length": config.max_seq_length,
            "truncation_side": "right",
            "do_lower_case": config.do_lower_case,
            "pad_token": pad[0],
            "pad_id": pad[1],
        },
        "inputs": inputs,
        "output": OUTPUT_NAME,
        "opset": opset,
        "prompts": prompts.prompts,
        "default_prompt_name": prompts.default_prompt_name,
        "pooling_mask_input": POOLING_MASK_INPUT if POOLING_MASK_INPUT in inputs else None,
        "toolchain": toolchain.versions(),
    }
