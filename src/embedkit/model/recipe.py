"""Model recipes (``models/<name>.yaml``) and the sentence-transformers config they point at.

A recipe says *where* a model comes from, what it is for (``task``: an embedding model or
a cross-encoder that reranks) and how to export it. *How it embeds* (pooling, max length,
normalisation, lowercasing) or *how it scores a pair* (labels, activation, max length) is
read from the model's own sentence-transformers files, never guessed. Nothing here
imports torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from embedkit.core.configfile import load_yaml
from embedkit.core.errors import ModelSourceError, UnsupportedModel
from embedkit.core.settings import get_settings

DEFAULT_RECIPE = "all-minilm-l6-v2"
# embed: texts → vectors (a SentenceTransformer); rerank: (query, document) pairs → one
# relevance score each (a sentence-transformers CrossEncoder).
Task = Literal["embed", "rerank"]
_TAG_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")


class Pooling(StrEnum):
    MEAN = "mean"
    CLS = "cls"
    MAX = "max"
    MEAN_SQRT_LEN = "mean_sqrt_len_tokens"
    LASTTOKEN = "lasttoken"
    WEIGHTEDMEAN = "weightedmean"


# Modes whose exported graph we have verified against sentence-transformers.
SUPPORTED_POOLING = {Pooling.MEAN, Pooling.CLS, Pooling.MAX, Pooling.MEAN_SQRT_LEN}
_POOLING_KEYS = {
    "pooling_mode_mean_tokens": Pooling.MEAN,
    "pooling_mode_cls_token": Pooling.CLS,
    "pooling_mode_max_tokens": Pooling.MAX,
    "pooling_mode_mean_sqrt_len_tokens": Pooling.MEAN_SQRT_LEN,
    "pooling_mode_lasttoken": Pooling.LASTTOKEN,
    "pooling_mode_weightedmean_tokens": Pooling.WEIGHTEDMEAN,
}
_KNOWN_MODULES = {
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
    "sentence_transformers.models.Dense",
}


class Source(BaseModel):
    """Exactly one of: a Python package carrying the weights, a local path, or a hub id."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    package: str | None = None
    path: Path | None = None
    hub_id: str | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Source:
        if sum(x is not None for x in (self.package, self.path, self.hub_id)) != 1:
            raise ValueError("a source needs exactly one of package, path, hub_id")
        return self

    def resolve(self) -> tuple[Path, str]:
        """Local model directory and a version string for the manifest."""
        if self.package is not None:
            try:
                module = importlib.import_module(self.package)
            except ImportError as exc:
                raise ModelSourceError(
                    f"model package {self.package!r} is not installed "
                    "(pip install 'embedkit[export]')"
                ) from exc
            dist = self.package.replace("_", "-")
            version = importlib.metadata.version(dist)
            return Path(module.get_model_path()), f"{dist}=={version}"
        if self.path is not None:
            return Path(self.path), self.revision or "local"
        # A hub id needs the network; resolve it through huggingface_hub's cache.
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:  # pragma: no cover - comes with the export extra
            raise ModelSourceError("hub ids need the export extra") from exc
        assert self.hub_id is not None
        try:
            local = snapshot_download(self.hub_id, revision=self.revision)
        except Exception as exc:  # offline, unknown id, ...: one clear line
            raise ModelSourceError(f"cannot fetch {self.hub_id!r} from the hub: {exc}") from exc
        return Path(local), self.revision or "main"


class Recipe(BaseModel):
    """How to obtain and export one model (``models/<name>.yaml``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(description="Artifact / BentoML model name (lowercase, - _ . allowed).")
    model_id: str = Field(description="Upstream identifier, recorded in the manifest.")
    source: Source
    opset: int = Field(18, ge=14, le=21)
    prompts: dict[str, str] = Field(
        default_factory=dict,
        description="Prompts to add to (or override in) the model's own "
        "config_sentence_transformers.json, by name.",
    )
    default_prompt_name: str | None = Field(
        None, description="Overrides the model's default_prompt_name (a name among the prompts)."
    )
    task: Task = Field(
        "embed",
        description="embed (a SentenceTransformer) or rerank (a CrossEncoder scoring pairs).",
    )

    @model_validator(mode="after")
    def _tag_name(self) -> Recipe:
        if not _TAG_NAME.match(self.name):
            raise ValueError(f"name {self.name!r} is not a valid BentoML model name")
        return self

    @classmethod
    def load(cls, path: Path) -> Recipe:
        return load_yaml(path, cls, "recipe", error=ModelSourceError)

    @classmethod
    def for_directory(cls, path: Path) -> Recipe:
        """An ad-hoc recipe for a local sentence-transformers directory; a CrossEncoder's
        (:func:`is_cross_encoder`) gets ``task: rerank``."""
        name = re.sub(r"[^a-z0-9._-]+", "-", Path(path).resolve().name.lower()).strip("-._")
        return cls(
            name=name or "model",
            model_id=str(path),
            source=Source(path=Path(path)),
            task="rerank" if is_cross_encoder(Path(path)) else "embed",
        )


def find_recipe(name_or_path: str | None) -> Recipe:
    """A recipe by name (``models/<name>.yaml``), recipe file, model directory or hub id."""
    if name_or_path is None:
        name_or_path = DEFAULT_RECIPE
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"}:
        return Recipe.load(path)
    if path.is_dir():
        return Recipe.for_directory(path)
    models_dir = get_settings().models_dir
    for candidate in sorted(models_dir.glob("*.y*ml")):
        recipe = Recipe.load(candidate)
        if name_or_path in {recipe.name, candidate.stem, recipe.model_id}:
            return recipe
    looks_local = (
        path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") != 1
    )
    if "/" in name_or_path and looks_local:
        raise ModelSourceError(f"model directory {name_or_path} does not exist")
    if "/" in name_or_path:  # org/name: a hub id (needs the network)
        name = re.sub(r"[^a-z0-9._-]+", "-", name_or_path.split("/")[-1].lower())
        return Recipe(name=name, model_id=name_or_path, source=Source(hub_id=name_or_path))
    raise ModelSourceError(
        f"{name_or_path!r} is neither a model directory, a recipe file, "
        f"nor a recipe in {models_dir}"
    )


class EmbeddingConfig(BaseModel):
    """How a sentence-transformers model turns tokens into one vector, read from its files."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    pooling: Pooling
    max_seq_length: int = Field(ge=1)
    normalize: bool
    do_lower_case: bool
    dimension: int = Field(ge=1)
    has_dense: bool = False
    # False (the Pooling config's include_prompt): prompt tokens attend but are left out of
    # the pooled mean, so the graph takes a pooling mask beside the attention mask.
    include_prompt: bool = True


class PromptConfig(BaseModel):
    """The model's prompts (``config_sentence_transformers.json``) after the recipe's edits."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    prompts: dict[str, str] = Field(default_factory=dict)
    default_prompt_name: str | None = None

    @model_validator(mode="after")
    def _default_is_a_prompt(self) -> PromptConfig:
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise ValueError(
                f"default_prompt_name {self.default_prompt_name!r} is not one of the prompts "
                f"({known})"
            )
        return self


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ModelSourceError(f"cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc


def _undeclared_max_length(model_dir: Path) -> int | None:
    """sentence-transformers' limit when the model declares none: the tokenizer's
    ``model_max_length`` capped at ``max_position_embeddings``. Not the position table
    alone: XLM-R and MPNet have 514 rows for 512 tokens (their position ids start after
    ``padding_idx``), so a 514-token input would index past the table."""
    limits = []
    for name, key in (
        ("tokenizer_config.json", "model_max_length"),
        ("config.json", "max_position_embeddings"),
    ):
        file = model_dir / name
        data = _read_json(file) if file.is_file() else {}
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, int) and value > 0:
            limits.append(value)
    return min(limits, default=None)


def read_embedding_config(model_dir: Path) -> EmbeddingConfig:
    """Pooling, max length, normalisation and lowercasing from the model's own config."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelSourceError(f"model directory {model_dir} does not exist")
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        raise ModelSourceError(
            f"{model_dir} is not a sentence-transformers model (no modules.json)"
        )
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not modules:
        raise ModelSourceError(f"{modules_file} lists no modules")
    types = [m.get("type", "") for m in modules]
    unknown = [t for t in types if t not in _KNOWN_MODULES]
    if unknown:
        raise UnsupportedModel(f"unsupported sentence-transformers module(s): {', '.join(unknown)}")
    if types[0] != "sentence_transformers.models.Transformer":
        raise UnsupportedModel("the first module must be a sentence_transformers Transformer")
    pooling_modules = [m for m in modules if m["type"].endswith(".Pooling")]
    if len(pooling_modules) != 1:
        raise UnsupportedModel("exactly one Pooling module is required")

    pooling_cfg = _read_json(model_dir / pooling_modules[0]["path"] / "config.json")
    modes = [mode for key, mode in _POOLING_KEYS.items() if pooling_cfg.get(key)]
    if len(modes) != 1:
        raise UnsupportedModel(
            f"pooling must use exactly one mode, found {[m.value for m in modes] or 'none'}"
        )
    pooling = modes[0]
    if pooling not in SUPPORTED_POOLING:
        raise UnsupportedModel(
            f"pooling mode {pooling.value!r} is not supported "
            f"(supported: {', '.join(sorted(p.value for p in SUPPORTED_POOLING))})"
        )

    sbert_file = model_dir / "sentence_bert_config.json"
    sbert = _read_json(sbert_file) if sbert_file.is_file() else {}
    max_len = sbert.get("max_seq_length")
    if max_len is None:
        max_len = _undeclared_max_length(model_dir)
    if not isinstance(max_len, int) or max_len < 1:
        raise ModelSourceError(f"{model_dir}: cannot determine max_seq_length")

    dimension = int(pooling_cfg.get("word_embedding_dimension", 0))
    has_dense = any(t.endswith(".Dense") for t in types)
    if has_dense:
        dense = [m for m in modules if m["type"].endswith(".Dense")][-1]
        dimension = int(_read_json(model_dir / dense["path"] / "config.json")["out_features"])
    return EmbeddingConfig(
        pooling=pooling,
        max_seq_length=max_len,
        normalize=any(t.endswith(".Normalize") for t in types),
        do_lower_case=bool(sbert.get("do_lower_case", False)),
        dimension=dimension,
        has_dense=has_dense,
        include_prompt=bool(pooling_cfg.get("include_prompt", True)),
    )


def read_prompt_config(model_dir: Path, recipe: Recipe | None = None) -> PromptConfig:
    """``prompts`` / ``default_prompt_name`` from the model's sentence-transformers config,
    with the recipe's prompts added or overriding by name and its default (if set) winning.

    Null prompts (sentence-transformers writes ``{"query": null, ...}`` placeholders) are
    not prompts: a request naming one is refused rather than silently given none.
    """
    file = Path(model_dir) / "config_sentence_transformers.json"
    saved = _read_json(file) if file.is_file() else {}
    raw = saved.get("prompts") or {}
    if not isinstance(raw, dict):
        raise ModelSourceError(f"{file}: prompts must be an object of name → text")
    prompts = {str(k): v for k, v in raw.items() if isinstance(v, str)}
    default = saved.get("default_prompt_name")
    if recipe is not None:
        prompts.update(recipe.prompts)
        default = recipe.default_prompt_name or default
    try:
        return PromptConfig(prompts=prompts, default_prompt_name=default)
    except ValidationError as exc:
        raise ModelSourceError(f"{model_dir}: {exc.errors()[0]['msg']}") from exc


# --- cross-encoders (task: rerank) ----------------------------------------------------------

# The one module a sequence-classification CrossEncoder lists (v5 names it by its new home;
# v4 and older save no modules.json at all, only the transformers files).
_CROSS_ENCODER_MODULES = {
    "sentence_transformers.models.Transformer",
    "sentence_transformers.base.modules.transformer.Transformer",
}
# CrossEncoder's activation_fn by dotted path → what the engine applies to the raw score.
# It instantiates only torch.* paths unless trust_remote_code (never here): others fall back
# to the default, as CrossEncoder itself does.
_ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.Tanh": "tanh",
}
Activation = Literal["sigmoid", "identity", "tanh"]


class RerankConfig(BaseModel):
    """How a CrossEncoder scores one (query, document) pair, read from its files."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    architecture: str = Field(description="The transformers class (config.json architectures).")
    num_labels: int = Field(1, ge=1, le=1, description="Scores per pair: one (a relevance score).")
    activation: Activation = Field(
        description="Applied to the graph's raw score for a default (non-raw) score, as "
        "CrossEncoder.predict does (its activation_fn)."
    )
    max_seq_length: int = Field(
        ge=1, description="Tokens of a whole pair, special tokens included."
    )
    do_lower_case: bool = False
    truncation: Literal["only_second"] = Field(
        "only_second",
        description="Over the limit, only the document is cut; the query is kept whole.",
    )


def _st_config(model_dir: Path) -> dict[str, Any]:
    file = model_dir / "config_sentence_transformers.json"
    data = _read_json(file) if file.is_file() else {}
    return data if isinstance(data, dict) else {}


def _hf_config(model_dir: Path) -> dict[str, Any]:
    file = model_dir / "config.json"
    if not file.is_file():
        raise ModelSourceError(f"{model_dir} has no config.json (not a transformers model)")
    data = _read_json(file)
    if not isinstance(data, dict):
        raise ModelSourceError(f"{file} is not a JSON object")
    return data


def is_cross_encoder(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a sentence-transformers CrossEncoder rather than an
    embedding model: its config says so (v5), or it pools nothing and its transformer is a
    ``*ForSequenceClassification`` (v4 and older, or a bare transformers classifier)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return False
    if _st_config(model_dir).get("model_type") == "CrossEncoder":
        return True
    modules_file = model_dir / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file)
        types = [m.get("type", "") for m in modules] if isinstance(modules, list) else []
        if any(t.endswith(".Pooling") for t in types):
            return False
    if not (model_dir / "config.json").is_file():
        return False
    architectures = _hf_config(model_dir).get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def _activation(model_dir: Path, config: dict[str, Any]) -> Activation:
    """CrossEncoder's choice, in its order: config_sentence_transformers.json's
    ``activation_fn`` (v5), config.json's ``sentence_transformers.activation_fn`` (v4), its
    ``sbert_ce_default_activation_function`` (older), else Sigmoid for one label."""
    st = config.get("sentence_transformers")
    candidates = [
        _st_config(model_dir).get("activation_fn"),
        st.get("activation_fn") if isinstance(st, dict) else None,
        config.get("sbert_ce_default_activation_function"),
    ]
    for path in candidates:
        if not isinstance(path, str) or not path.startswith("torch."):
            continue  # CrossEncoder skips what it would not import without trust_remote_code
        if path not in _ACTIVATIONS:
            known = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in _ACTIVATIONS}))
            raise UnsupportedModel(
                f"{model_dir}: activation {path} is not supported (supported: {known})"
            )
        return _ACTIVATIONS[path]  # type: ignore[return-value]
    return "sigmoid"


def read_rerank_config(model_dir: Path) -> RerankConfig:
    """Labels, activation, max length and lowercasing of a CrossEncoder directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelSourceError(f"model directory {model_dir} does not exist")
    config = _hf_config(model_dir)
    architectures = [str(a) for a in config.get("architectures") or []]
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UnsupportedModel(
            f"{model_dir} is not a sequence-classification cross-encoder "
            f"(architectures: {', '.join(architectures) or 'none'})"
        )
    modules_file = model_dir / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file)
        types = [m.get("type", "") for m in modules] if isinstance(modules, list) else []
        if len(types) != 1 or types[0] not in _CROSS_ENCODER_MODULES:
            raise UnsupportedModel(
                f"{model_dir}: a cross-encoder must be one Transformer module, "
                f"found {', '.join(types) or 'none'}"
            )
    # transformers' own rule: num_labels, else one per id2label entry, else 2.
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
    if labels != 1:
        raise UnsupportedModel(
            f"{model_dir} has {labels} labels; reranking needs one score per pair (num_labels 1)"
        )
    prompts = read_prompt_config(model_dir)
    if prompts.default_prompt_name is not None:
        raise UnsupportedModel(
            f"{model_dir}: a cross-encoder with a default prompt "
            f"({prompts.default_prompt_name!r}) is not supported"
        )
    sbert_file = model_dir / "sentence_bert_config.json"
    sbert = _read_json(sbert_file) if sbert_file.is_file() else {}
    max_len = sbert.get("max_seq_length")
    if max_len is None:
        max_len = _undeclared_max_length(model_dir)
    if not isinstance(max_len, int) or max_len < 1:
        raise ModelSourceError(f"{model_dir}: cannot determine max_seq_length")
    return RerankConfig(
        architecture=next(a for a in architectures if a.endswith("ForSequenceClassification")),
        activation=_activation(model_dir, config),
        max_seq_length=max_len,
        do_lower_case=bool(sbert.get("do_lower_case", False)),
    )
