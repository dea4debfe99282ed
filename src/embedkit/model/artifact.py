"""Artifacts: an ONNX graph, its tokenizer and an immutable manifest.

An artifact directory holds ``model.onnx``, ``tokenizer.json`` and
``manifest.json`` (plus ``manifest.sig`` once signed). The manifest records
where the model came from, with which toolchain it was built, how it embeds and
the sha256 of every file; loading recomputes every checksum and refuses a
mismatch naming the file. Registered artifacts live in the BentoML model store
under a new version each time; nothing here runs a model.

A stage that makes a version writes its manifest once, at its end: :func:`draft` hashes
the files of a directory being built into a manifest held in memory, :func:`amend` adds
what later stages learn (fields, new files, each hashed once, when it is added) and
:func:`seal` writes ``manifest.json``: the one write (:func:`write_manifest`) of that
version. :func:`finalize` is the three for a stage that has everything at once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from embedkit.core.errors import ArtifactError, ChecksumMismatch
from embedkit.model import signing
from embedkit.model.recipe import EmbeddingConfig, PromptConfig, RerankConfig, Task
from embedkit.model.signing import Trust

MANIFEST = signing.MANIFEST
SIGNATURE = signing.SIGNATURE
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# The optional graph input of an include_prompt=false model (format 3).
POOLING_MASK_INPUT = "pooling_mask"
# 2: compatibility classes, the measurement binding and reference vectors. Format 1
# manifests still load (their new fields are absent); what serving does with a format-1
# variant is decided in serve/startup.py (refused by name: it records no binding).
# 3: the model's prompts (``prompts``, ``default_prompt_name``) and, for a model whose
# pooling leaves its prompt out (include_prompt: false), ``pooling_mask_input``: a graph
# input carrying the pooling mask beside the attention mask. Formats 1 and 2 load with no
# prompts and pooling over the attention mask, which is what they were built with.
# 4: a second runtime. The binding (``measured_on``) names the runtime and its version
# (``runtime``, ``version``; format 2-3 wrote ``onnxruntime``: VERSION, read as such) and
# the ``openvino-*`` modes run on OpenVINO (:attr:`Manifest.runtime`).
# 5: the task. A reranker (``task: rerank``) has a ``rerank`` section instead of
# ``embedding`` and records its ``source`` directory. Only a reranker is written as format
# 5: an embedding manifest has nothing format 5 added, so it stays format 4, byte for byte,
# and embedkits that read format 4 keep reading it; any manifest without ``task`` is embed.
FORMAT_VERSION = 5
EMBED_FORMAT_VERSION = 4
READABLE_FORMATS = (1, 2, 3, 4, 5)
# Fields format 5 added: left out of an embedding manifest's JSON (see above).
_FORMAT_5_FIELDS = ("task", "rerank", "source", "reference_scores")
BENTOML_MODULE = "embedkit"
# Files BentoML writes into a stored model's directory; not part of the artifact.
_STORE_FILES = {"model.yaml", "custom_objects.pkl"}
_CHUNK = 1 << 20

QuantizationMode = Literal[
    "none",
    "fused-fp32",
    "dynamic-int8",
    "static-int8",
    "fp16",
    "openvino-fp32",
    "openvino-bf16",
    "openvino-int8",
]
Runtime = Literal["onnxruntime", "openvino"]
# Modes another runtime than ONNX Runtime runs; the graph is ONNX in every case.
RUNTIME_OF_MODE: dict[str, Runtime] = {
    "openvino-fp32": "openvino",
    "openvino-bf16": "openvino",
    "openvino-int8": "openvino",
}
# What a variant may replace (docs/service.md § Compatibility classes): vectors close
# enough to the fp32 parent's to query an fp32 index; good only for an index built
# entirely with it; neither.
Compatibility = Literal["index-compatible", "reindex", "rejected"]
COMPATIBILITY_CLASSES: tuple[Compatibility, ...] = ("index-compatible", "reindex", "rejected")
# Reduced precisions a provider can apply to a graph at run time (not stored in its weights).
RuntimePrecision = Literal["trt-fp16"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_files(root: Path, *, exclude: set[str] | None = None) -> list[str]:
    """Every regular file under ``root`` as a POSIX relative path, in path order."""
    exclude = exclude or set()
    out = []
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in exclude:
            out.append(rel)
    return out


def sha256_tree(root: Path, *, exclude: set[str] | None = None) -> dict[str, str]:
    """sha256 of every regular file under ``root``, keyed by POSIX relative path."""
    return {rel: sha256_file(Path(root) / rel) for rel in tree_files(root, exclude=exclude)}


def _in_path_order(files: dict[str, str]) -> dict[str, str]:
    """``files`` in :func:`tree_files`' order (the order a manifest lists them in)."""
    return dict(sorted(files.items(), key=lambda item: PurePosixPath(item[0]).parts))


def unsafe_entry(rel: str) -> str | None:
    """Why ``rel`` (a manifest ``files``/``records`` entry) cannot name a file inside the
    artifact directory it is joined to, or None: entries are relative POSIX paths below it."""
    if not rel:
        return "is empty"
    path = PurePosixPath(rel)
    if path.is_absolute():
        return "is an absolute path"
    if ".." in path.parts:
        return "has a '..' component"
    return None


def _check_entries(kind: str, entries: Iterable[str]) -> None:
    for rel in entries:
        why = unsafe_entry(rel)
        if why is not None:
            raise ValueError(
                f"{kind} entry {rel!r} {why}: entries are paths inside the artifact directory"
            )


class TokenizerSpec(BaseModel):
    """Tokenisation as the manifest fixes it (not as tokenizer.json happens to carry it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_length: int = Field(ge=1)
    truncation_side: Literal["right", "left"] = "right"
    do_lower_case: bool = False
    pad_token: str
    pad_id: int = Field(ge=0)


class MeasuredOn(BaseModel):
    """What a gate verdict was measured on; it holds only there."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    parent_sha256: str = Field(description="sha256 of the fp32 parent's model.onnx.")
    isa: str = Field(description="CPU instruction-set level (model.toolchain.CpuIsa.level).")
    runtime: Runtime = Field("onnxruntime", description="The runtime that ran the evaluation.")
    version: str = Field(description="That runtime's version.")

    @model_validator(mode="before")
    @classmethod
    def _format_3(cls, raw: Any) -> Any:
        """Formats 2-3 recorded ``onnxruntime: VERSION`` (their only runtime)."""
        if isinstance(raw, dict) and "onnxruntime" in raw:
            raw = {**raw, "runtime": "onnxruntime", "version": raw["onnxruntime"]}
            del raw["onnxruntime"]
        return raw


class ReferenceVectors(BaseModel):
    """A few texts and this artifact's vectors for them (each encoded alone), so a pod can
    check at startup that it computes what was measured."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    texts: list[str] = Field(min_length=1)
    vectors: list[list[float]] = Field(min_length=1)
    min_cosine: float = Field(ge=-1, le=1, description="Least cosine a pod must reproduce.")


class ReferenceScores(BaseModel):
    """A reranker's counterpart of :class:`ReferenceVectors` (format 5): a few pairs and this
    artifact's raw scores for them (each scored alone), checked at serving startup."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    pairs: list[tuple[str, str]] = Field(min_length=1)
    scores: list[float] = Field(min_length=1)
    max_abs_diff: float = Field(ge=0, description="Most a pod's raw score may differ.")

    @model_validator(mode="after")
    def _one_score_a_pair(self) -> ReferenceScores:
        if len(self.scores) != len(self.pairs):
            raise ValueError(f"{len(self.scores)} reference scores for {len(self.pairs)} pairs")
        return self


class EncodingRanges(BaseModel):
    """Per-dimension [min, max] of the served vectors on calibration text: the int8/uint8
    output encodings' buckets (sentence-transformers' ``quantize_embeddings`` ``ranges``).

    Fixed once per release, so the same text always maps to the same codes; a request
    for fewer ``dimensions`` uses the first ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    min: list[float] = Field(min_length=1)
    max: list[float] = Field(min_length=1)
    normalized: bool = Field(description="Calibrated on L2-normalised vectors.")
    texts: int = Field(ge=1, description="How many calibration texts.")
    source: str = Field(description="The calibration text (e.g. 'stsbenchmark/sts-train').")


class SourceRecord(BaseModel):
    """Where the exported model came from: the local directory it was read from (a package's
    or the hub cache's, resolved) and, when the recipe named one, the package or hub id."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str
    package: str | None = None
    hub_id: str | None = None
    revision: str | None = None


def format_version_for(task: Task) -> int:
    """The format a manifest of ``task`` is written as (format 5 is a reranker's)."""
    return FORMAT_VERSION if task == "rerank" else EMBED_FORMAT_VERSION


class Quantization(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: QuantizationMode = "none"
    settings: dict[str, Any] = Field(default_factory=dict)
    approved: bool | None = Field(
        None, description="Passed the strict (index-compatible) gate; None if not gated."
    )
    forced: bool = Field(False, description="Registered despite failing the gate (--force).")
    variant: str | None = Field(None, description="The release candidate's name.")
    compatibility: Compatibility | None = Field(
        None, description="The gate's class (format 2); None if not gated."
    )
    measured_on: MeasuredOn | None = Field(
        None, description="Where the verdict was measured (format 2)."
    )


class PrecisionApproval(BaseModel):
    """A reduced run-time precision the quality gate approved for this artifact on a GPU.

    ``runtime.session`` enables such a precision only when the manifest carries
    its approval: settings alone never change the vectors an index was built with.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    precision: RuntimePrecision
    provider: str
    device: str = Field("", description="The GPU the gate ran on (e.g. 'NVIDIA H100').")
    segments_checked: int = Field(ge=1)
    approved_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())


class Manifest(BaseModel):
    """Everything needed to trust, load and reproduce an artifact."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    format_version: int = EMBED_FORMAT_VERSION
    name: str
    model_id: str
    model_version: str
    task: Task = Field("embed", description="embed (vectors) or rerank (pair scores); format 5.")
    source_sha256: str = Field(description="sha256 over the source model's files (sorted).")
    source: SourceRecord | None = Field(
        None, description="The directory the model was exported from (format 5)."
    )
    embedding: EmbeddingConfig | None = Field(
        None, description="How it embeds; every embedding model has it, a reranker not."
    )
    rerank: RerankConfig | None = Field(
        None, description="How a reranker scores a pair (task: rerank, format 5)."
    )
    tokenizer: TokenizerSpec
    inputs: list[str] = Field(description="Graph inputs, in the order the graph declares them.")
    output: str = "sentence_embedding"
    opset: int
    prompts: dict[str, str] = Field(
        default_factory=dict,
        description="The model's prompts by name, put before a text when tokenising (format 3).",
    )
    default_prompt_name: str | None = Field(
        None, description="The prompt a request that names none gets (format 3)."
    )
    pooling_mask_input: str | None = Field(
        None,
        description="Graph input for the pooling mask when it differs from the attention mask "
        "(include_prompt: false: prompt tokens attend but are not pooled); None: the graph "
        "pools over the attention mask (format 3).",
    )
    quantization: Quantization = Field(default_factory=Quantization)
    toolchain: dict[str, str]
    files: dict[str, str] = Field(description="sha256 of every file except manifest and signature.")
    parity: dict[str, Any] | None = None
    parent: str | None = Field(
        None, description="Tag or source manifest this variant derives from."
    )
    records: dict[str, str] = Field(
        default_factory=dict,
        description="Release records stored beside the artifact (name → file).",
    )
    performance: dict[str, Any] | None = Field(
        None,
        description="Flat summary of the release records (bench.*, runtime.*, profile.*), "
        "copied into the model store metadata.",
    )
    reference: ReferenceVectors | None = Field(
        None, description="Reference texts and vectors checked at serving startup (format 2)."
    )
    reference_scores: ReferenceScores | None = Field(
        None, description="A reranker variant's reference pairs and raw scores (format 5)."
    )
    precision_approvals: list[PrecisionApproval] = Field(
        default_factory=list,
        description="Reduced run-time precisions the gate approved (only these are served).",
    )
    encoding_ranges: EncodingRanges | None = Field(
        None,
        description="int8/uint8 output-encoding ranges calibrated at release (absent: those "
        "encodings are refused).",
    )
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    @model_validator(mode="after")
    def _task_sections(self) -> Manifest:
        if self.task == "embed" and (self.embedding is None or self.rerank is not None):
            raise ValueError("an embedding manifest needs an embedding section and no rerank")
        if self.task == "rerank":
            if self.rerank is None or self.embedding is not None:
                raise ValueError("a rerank manifest needs a rerank section and no embedding")
            if self.format_version < FORMAT_VERSION:
                raise ValueError(f"task rerank needs manifest format {FORMAT_VERSION}")
        return self

    @model_serializer(mode="wrap")
    def _format_4_stays_format_4(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """An embedding manifest below format 5 is written without format 5's fields."""
        data: dict[str, Any] = handler(self)
        if self.format_version < FORMAT_VERSION:
            for key in _FORMAT_5_FIELDS:
                data.pop(key, None)
        return data

    @property
    def embedding_config(self) -> EmbeddingConfig:
        """The embedding section; :class:`ArtifactError` naming the task for a reranker."""
        if self.embedding is None:
            raise ArtifactError(
                f"{self.name} is a {self.task} model (task: {self.task}); it does not embed"
            )
        return self.embedding

    @property
    def rerank_config(self) -> RerankConfig:
        """The rerank section; :class:`ArtifactError` naming the task for an embedding model."""
        if self.rerank is None:
            raise ArtifactError(
                f"{self.name} is an embedding model (task: {self.task}); it does not score pairs"
            )
        return self.rerank

    @model_validator(mode="after")
    def _entries_inside(self) -> Manifest:
        _check_entries("files", self.files)
        _check_entries("records", self.records.values())
        return self

    @model_validator(mode="after")
    def _prompts_consistent(self) -> Manifest:
        default = self.default_prompt_name
        if default is not None and default not in self.prompts:
            raise ValueError(f"default_prompt_name {default!r} is not one of the prompts")
        if self.pooling_mask_input is not None and self.pooling_mask_input not in self.inputs:
            raise ValueError(f"pooling_mask_input {self.pooling_mask_input!r} is not a graph input")
        return self

    @property
    def compatibility(self) -> Compatibility:
        """The class this artifact serves as. The fp32 export defines the index space; a
        format-1 variant approved by the then only (strict) gate is index-compatible."""
        q = self.quantization
        if q.mode == "none":
            return "index-compatible"
        if q.compatibility is not None:
            return q.compatibility
        return "index-compatible" if q.approved else "rejected"

    @property
    def runtime(self) -> Runtime:
        """The runtime that runs this graph: OpenVINO for its modes, else ONNX Runtime."""
        return RUNTIME_OF_MODE.get(self.quantization.mode, "onnxruntime")

    @property
    def prompt_config(self) -> PromptConfig:
        return PromptConfig(prompts=self.prompts, default_prompt_name=self.default_prompt_name)

    @property
    def variant(self) -> str:
        """The version's name among a release's: the candidate name, else the mode."""
        if self.quantization.mode == "none":
            return "fp32"
        return self.quantization.variant or self.quantization.mode

    def approval(self, precision: RuntimePrecision, provider: str) -> PrecisionApproval | None:
        """The gate's approval of ``precision`` on ``provider``, if the manifest records one."""
        for item in self.precision_approvals:
            if item.precision == precision and item.provider == provider:
                return item
        return None

    def summary(self) -> dict[str, Any]:
        """Flat metadata for the BentoML model store and /info (no None: BentoML refuses it)."""
        embedding, rerank = self.embedding, self.rerank
        summary = {
            "model_id": self.model_id,
            "model_version": self.model_version,
            "task": self.task,
            "source.path": None if self.source is None else self.source.path,
            "dimension": None if embedding is None else embedding.dimension,
            "pooling": None if embedding is None else embedding.pooling.value,
            "max_seq_length": (embedding or self.rerank_config).max_seq_length,
            "normalize": None if embedding is None else embedding.normalize,
            "activation": None if rerank is None else rerank.activation,
            "prompts": ",".join(self.prompts) or None,
            "default_prompt_name": self.default_prompt_name,
            "opset": self.opset,
            "quantization": self.quantization.mode,
            "runtime": self.runtime,
            "approved": self.quantization.approved,
            "variant": self.variant,
            "compatibility": self.compatibility,
            "source_sha256": self.source_sha256,
            "model_sha256": self.files.get(MODEL_FILE, ""),
            "parity_passed": None if self.parity is None else self.parity.get("passed"),
            "precision_approvals": ",".join(
                f"{a.precision}@{a.provider}" for a in self.precision_approvals
            )
            or None,
            "created_at": self.created_at,
            **{f"toolchain.{k}": v for k, v in sorted(self.toolchain.items())},
            **(self.performance or {}),
        }
        return {k: v for k, v in summary.items() if v is not None}


class Artifact:
    """A verified artifact directory. Construct with :meth:`load`.

    ``written`` is False for a version still being built (:func:`draft`, :func:`amend`):
    its manifest is held here and not yet in ``manifest.json`` (:func:`seal` writes it).
    Such an artifact runs (its files are hashed and listed) but is neither signed nor
    registered.
    """

    def __init__(
        self, path: Path, manifest: Manifest, tag: str | None = None, *, written: bool = True
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.tag = tag
        self.written = written

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def name(self) -> str:
        return self.manifest.name

    @classmethod
    def read_manifest(cls, path: Path) -> Manifest:
        file = Path(path) / MANIFEST
        if not Path(path).is_dir():
            raise ArtifactError(f"artifact directory {path} does not exist")
        try:
            raw = json.loads(file.read_text())
        except FileNotFoundError as exc:
            raise ArtifactError(f"{path} is not an embedkit artifact (no {MANIFEST})") from exc
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{file} is not valid JSON: {exc.msg}") from exc
        version = raw.get("format_version", 1) if isinstance(raw, dict) else None
        if version not in READABLE_FORMATS:
            raise ArtifactError(
                f"{file}: manifest format {version!r} is not one this embedkit reads "
                f"({', '.join(map(str, READABLE_FORMATS))}); use a matching embedkit or re-release"
            )
        try:
            return Manifest.model_validate(raw)
        except ValidationError as exc:
            raise ArtifactError(
                f"{file} is not a valid manifest: {exc.errors()[0]['msg']}"
            ) from exc

    @classmethod
    def load(
        cls, path: Path, *, verify: bool = True, tag: str | None = None, trust: Trust | None = None
    ) -> Artifact:
        """Read the manifest and (by default) check every file's sha256.

        The signature is checked when the trust policy (by default the
        settings' ``require_signature``/``trusted_keys``) requires it.
        """
        manifest = cls.read_manifest(path)
        artifact = cls(Path(path), manifest, tag)
        if verify:
            artifact.verify()
            trust = trust or Trust.from_settings()
            if trust.require_signature:
                signing.verify(artifact.path, trust.trusted_keys)
        return artifact

    def file(self, rel: str) -> Path:
        """``rel`` (a manifest entry) inside the artifact directory; ArtifactError naming it
        when it is absolute, has a ``..`` component or resolves (symlinks) outside."""
        why = unsafe_entry(rel)
        if why is None:
            root = self.path.resolve()
            if not (self.path / rel).resolve().is_relative_to(root):
                why = "resolves outside the artifact directory"
        if why is not None:
            raise ArtifactError(f"manifest of {self.path}: entry {rel!r} {why}; refusing to load")
        return self.path / rel

    def verify(self) -> None:
        """Recompute every checksum; raise naming the first file that differs or is missing,
        or the first entry that is not a path inside the artifact directory."""
        expected = self.manifest.files
        for name in (MODEL_FILE, TOKENIZER_FILE):
            if name not in expected:
                raise ArtifactError(f"manifest of {self.path} does not list {name}")
        for rel in sorted({*expected, *self.manifest.records.values()}):
            self.file(rel)  # every entry inside, before any file is read
        for rel, digest in sorted(expected.items()):
            file = self.file(rel)
            if not file.is_file():
                raise ChecksumMismatch(f"artifact file {rel} is missing from {self.path}")
            actual = sha256_file(file)
            if actual != digest:
                raise ChecksumMismatch(
                    f"checksum mismatch for {rel} in {self.path}: "
                    f"expected sha256 {digest[:12]}…, found {actual[:12]}… — refusing to load"
                )
        present = tree_files(self.path, exclude={MANIFEST, SIGNATURE, *_STORE_FILES})
        extra = set(present) - set(expected)
        if extra:
            raise ChecksumMismatch(f"files not covered by the manifest: {', '.join(sorted(extra))}")


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write ``manifest.json``: the only place it is written (through :func:`seal`)."""
    (Path(directory) / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")


def _with_files(fields: dict[str, Any], files: dict[str, str]) -> Manifest:
    return Manifest.model_validate({**fields, "files": _in_path_order(files)})


def draft(directory: Path, manifest_fields: dict[str, Any]) -> Artifact:
    """The artifact being built in ``directory``: every file in it hashed (once) into a
    manifest of ``manifest_fields`` held in memory; nothing written (:func:`seal`)."""
    files = sha256_tree(directory, exclude={MANIFEST, SIGNATURE})
    return Artifact(Path(directory), _with_files(manifest_fields, files), written=False)


def amend(artifact: Artifact, updates: dict[str, Any], *, files: Iterable[str] = ()) -> Artifact:
    """``artifact`` with manifest fields replaced by ``updates`` and ``files`` (paths inside
    it, written by the caller) hashed and listed; nothing written (:func:`seal`). Files
    listed before are not hashed again."""
    fields = artifact.manifest.model_dump(mode="json", exclude={"files"})
    fields.update(updates)
    listed = dict(artifact.manifest.files)
    for rel in files:
        listed[rel] = sha256_file(artifact.file(rel))
    return Artifact(artifact.path, _with_files(fields, listed), artifact.tag, written=False)


def seal(artifact: Artifact) -> Artifact:
    """Write ``artifact``'s manifest (once per version, at the end of the stage that makes
    it) and return the written artifact. Files it lists are not hashed again; a file in the
    directory it does not list yet is hashed and listed, one it lists but the directory
    lacks is refused. A new manifest voids an old signature: sign after this."""
    directory = artifact.path
    listed = dict(artifact.manifest.files)
    present = tree_files(directory, exclude={MANIFEST, SIGNATURE})
    missing = sorted(set(listed) - set(present))
    if missing:
        raise ArtifactError(f"{directory} lacks {', '.join(missing)}, which its manifest lists")
    for rel in present:
        if rel not in listed:
            listed[rel] = sha256_file(directory / rel)
    fields = artifact.manifest.model_dump(mode="json", exclude={"files"})
    manifest = _with_files(fields, listed)
    (directory / SIGNATURE).unlink(missing_ok=True)
    write_manifest(directory, manifest)
    return Artifact(directory, manifest, artifact.tag)


def finalize(directory: Path, manifest_fields: dict[str, Any]) -> Artifact:
    """Checksum every file in ``directory`` and write its manifest (:func:`draft` then
    :func:`seal`: a stage that has every field at once)."""
    return seal(draft(directory, manifest_fields))


def staging_dir(output: Path) -> Path:
    """Refuse an ``output`` that holds anything (artifacts are immutable) and return a
    temporary folder beside it to build in; :func:`move_into_place` finishes the job."""
    output = Path(output)
    if (output / MANIFEST).exists():
        raise ArtifactError(f"{output} already holds an artifact; artifacts are immutable")
    if output.exists() and any(output.iterdir()):
        raise ArtifactError(f"output directory {output} is not empty; artifacts are immutable")
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))


def move_into_place(built: Artifact, output: Path) -> Artifact:
    """Move an artifact built in a staging folder to ``output`` (absent or empty); its files
    were hashed when it was built and are not again (a move changes no byte)."""
    output = Path(output)
    if output.exists():
        output.rmdir()
    shutil.move(built.path, output)
    return Artifact(output, built.manifest, built.tag, written=built.written)


# --- BentoML model store -------------------------------------------------------


def register(
    artifact: Artifact, *, labels: dict[str, str] | None = None, version: str | None = None
) -> str:
    """Copy a verified artifact into the BentoML model store as a new version; return its tag.
    The version is BentoML's new one unless given (a version the store holds is refused)."""
    import bentoml

    if not artifact.written:
        raise ArtifactError(f"{artifact.path}: its manifest is not written yet (seal it first)")
    artifact.verify()
    manifest = artifact.manifest
    all_labels = {
        "quantization": manifest.quantization.mode,
        "format": f"embedkit-v{manifest.format_version}",
        "variant": manifest.variant,
        "compatibility": manifest.compatibility,
        **(labels or {}),
    }
    with bentoml.models.create(
        f"{manifest.name}:{version}" if version else manifest.name,
        module=BENTOML_MODULE,
        labels=all_labels,
        metadata=manifest.summary(),
    ) as model:
        dest = Path(model.path)
        for item in artifact.path.iterdir():
            if item.is_dir():
                shutil.copytree(item, dest / item.name)
            else:
                shutil.copy2(item, dest / item.name)
    tag = str(model.tag)
    Artifact.load(Path(model.path), tag=tag, trust=Trust())  # the stored copy must verify too
    return tag


def resolve(tag_or_dir: str | Path, *, verify: bool = True, trust: Trust | None = None) -> Artifact:
    """An artifact from a directory or a BentoML model tag, checksums (and signature) verified."""
    path = Path(tag_or_dir)
    if path.is_dir():
        return Artifact.load(path, verify=verify, trust=trust)
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        model = bentoml.models.get(str(tag_or_dir))
    except NotFound as exc:
        raise ArtifactError(
            f"no artifact directory or BentoML model {str(tag_or_dir)!r} "
            "(run `embedkit release` first)"
        ) from exc
    except (BentoMLException, ValueError) as exc:
        raise ArtifactError(f"{str(tag_or_dir)!r} is not a valid model tag: {exc}") from exc
    return Artifact.load(Path(model.path), verify=verify, tag=str(model.tag), trust=trust)


def manifest_json(artifact: Artifact) -> str:
    """The manifest for people (``embedkit info``): its ``task`` shown even where the file
    leaves it out (format 4 and older: embed)."""
    manifest = artifact.manifest
    data = manifest.model_dump(mode="json")
    shown = {"format_version": data.pop("format_version"), "task": manifest.task}
    return json.dumps({**shown, **data}, indent=2)
