"""The HTTP contract: the routes the edge guards and the bodies they take and return.

Request models are validated by BentoML (strict types, so ``[1, "a"]`` or ``[true]``
is a 400); response models only describe the hand-written bodies
(:mod:`embedkit.serve.edge.bodies`) in the OpenAPI document. :data:`Item` is the one row
of the Embedder's internal batchable APIs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from embedkit.runtime.chunking import Aggregate

Lane = Literal["query", "bulk"]
# float/base64 as OpenAI's; the rest are codes (docs/service.md § Output encodings).
EncodingFormat = Literal["float", "base64", "int8", "uint8", "binary", "ubinary"]
TruncationDirection = Literal["right", "left"]
# Every embedding route and /tokenize answer with it: how many inputs truncation cut.
TRUNCATED_HEADER = "X-Embedkit-Truncated-Inputs"

# One item of the Embedder's batchable APIs: (time the front handed it over, token ids).
# The timestamp lets the Embedder measure queue wait across the process boundary. A model
# whose pooling leaves its prompt out (include_prompt: false) adds a third element: the
# leading positions (the prompt) the pooling skips. Every other model's items stay pairs.
Item = tuple[float, list[int]] | tuple[float, list[int], int]
# A row on its way to the Embedder (jobs, client, coalescer): token ids, or (token ids,
# leading positions the pooling skips), the item without its timestamp.
Row = list[int] | tuple[list[int], int]

NATIVE_MODEL_DESCRIPTION = (
    "Served model name (GET /v1/models lists them); omitted: the deployment's default "
    "(first) model."
)
PROMPT_NAME_DESCRIPTION = (
    "One of the model's prompts (GET /v1/models lists them), prepended to every input "
    "before tokenising; its tokens count in usage. Omitted: the model's default_prompt_name, "
    "if it has one, else no prompt. Never chosen by route or lane."
)

# Routes that need an API key (when keys are configured), obey the body limit,
# count against admission control and answer errors in the OpenAI shape.
EMBEDDING_ROUTES = frozenset({"/v1/embeddings", "/embed", "/embed/query", "/tokenize"})
RERANK_ROUTES = frozenset({"/rerank", "/v1/rerank", "/v2/rerank"})
INFERENCE_ROUTES = EMBEDDING_ROUTES | RERANK_ROUTES
METADATA_ROUTES = frozenset({"/v1/models", "/info"})
PROTECTED_ROUTES = INFERENCE_ROUTES | METADATA_ROUTES

# --- requests ----------------------------------------------------------------------------

_TRUNCATE = "Truncate inputs over the model's token limit; false answers 413 naming the input."
_DIRECTION = (
    "Which end truncation cuts ('right' keeps the start, 'left' the end); the special "
    "tokens ([CLS] … [SEP]) are kept either way. Default: the model's side (GET /info)."
)
_ENCODINGS = (
    "'float': JSON floats; 'base64': little-endian float32 bytes, base64; "
    "'int8'/'uint8': one code per dimension (sentence-transformers' quantize_embeddings "
    "with the model's calibrated ranges); 'binary'/'ubinary': the sign bits packed 8 to a "
    "byte (binary = ubinary - 128 as int8). Codes are JSON integer lists, or base64 of "
    "their raw bytes with base64_codes."
)
_BASE64_CODES = (
    "With an int8/uint8/binary/ubinary encoding_format: base64 of the codes' raw bytes "
    "instead of JSON integer lists."
)


class EmbeddingsRequest(BaseModel):
    """OpenAI ``POST /v1/embeddings``. Strict types: ``[1, "a"]`` or ``[true]`` is a 400."""

    # OpenAI answers 400 "Unrecognized request argument supplied: X" to unknown fields;
    # so do we (serve/http_errors.py), instead of dropping them silently.
    model_config = ConfigDict(extra="forbid")
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="A text, a list of texts, a list of token ids or a list of token-id lists."
    )
    model: StrictStr = Field(description="Served model name (see GET /v1/models).")
    encoding_format: EncodingFormat = Field(default="float", description=_ENCODINGS)
    dimensions: StrictInt | None = Field(
        default=None, description="Matryoshka truncation to this many dimensions (re-normalised)."
    )
    user: StrictStr | None = Field(default=None, description="Accepted and ignored.")
    prompt_name: StrictStr | None = Field(
        default=None, description=PROMPT_NAME_DESCRIPTION + " (An embedkit extension.)"
    )
    truncate: StrictBool = Field(default=True, description=_TRUNCATE)
    truncation_direction: TruncationDirection | None = Field(default=None, description=_DIRECTION)
    base64_codes: StrictBool = Field(default=False, description=_BASE64_CODES)


class EmbedRequest(BaseModel):
    """Native ``POST /embed`` and ``POST /embed/query``."""

    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(description="Texts to embed; empty strings are allowed.")
    model: StrictStr | None = Field(default=None, description=NATIVE_MODEL_DESCRIPTION)
    normalize: StrictBool = Field(
        default=True, description="L2-normalise (after truncation to `dimensions`)."
    )
    truncate: StrictBool = Field(default=True, description=_TRUNCATE)
    truncation_direction: TruncationDirection | None = Field(default=None, description=_DIRECTION)
    dimensions: StrictInt | None = Field(
        default=None, description="Keep only the first n dimensions."
    )
    encoding_format: EncodingFormat = Field(
        default="float",
        description=_ENCODINGS + " Here 'base64' (and base64_codes) give one base64 string of "
        "the row-major [n, width] array (~4x smaller than JSON).",
    )
    prompt_name: StrictStr | None = Field(default=None, description=PROMPT_NAME_DESCRIPTION)
    base64_codes: StrictBool = Field(default=False, description=_BASE64_CODES)


class ChunkingOptions(BaseModel):
    """Split texts over ``max_tokens`` into overlapping token windows (docs/service.md)."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: StrictInt | None = Field(
        default=None,
        description="Tokens per chunk, the model's special tokens included (at most the "
        "model's limit, the default).",
    )
    overlap: StrictInt = Field(
        default=0, description="Tokens shared by consecutive chunks (fewer than a chunk's text)."
    )
    aggregate: Aggregate = Field(
        default="mean",
        description="'mean': one vector per text, its chunks' raw vectors averaged with "
        "their token counts as weights, then normalised when normalize; 'none': one "
        "vector per chunk.",
    )


class EmbedBulkRequest(EmbedRequest):
    """Native ``POST /embed``: :class:`EmbedRequest` plus opt-in chunking (bulk lane only)."""

    chunking: ChunkingOptions | None = Field(
        default=None,
        description="Chunk texts over max_tokens instead of truncating them; the response's "
        "`chunks` says which span of which text each chunk is.",
    )


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: token ids (special tokens included) as the model sees them."""

    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr]
    model: StrictStr | None = Field(default=None, description=NATIVE_MODEL_DESCRIPTION)
    truncate: StrictBool = Field(default=True, description=_TRUNCATE)
    truncation_direction: TruncationDirection | None = Field(default=None, description=_DIRECTION)
    prompt_name: StrictStr | None = Field(default=None, description=PROMPT_NAME_DESCRIPTION)


_RERANK_MODEL = (
    "Served reranker name (GET /v1/models lists each model's task); omitted: the first "
    "reranker served. An embedding model here is a 400 naming its task."
)
_QUERY = "The query every document is scored against (kept whole: only documents are cut)."


class RerankRequest(BaseModel):
    """``POST /rerank``, text-embeddings-inference's shape."""

    model_config = ConfigDict(extra="forbid")
    query: StrictStr = Field(description=_QUERY)
    texts: list[StrictStr] = Field(description="The documents to score against the query.")
    raw_scores: StrictBool = Field(
        default=False,
        description="The classifier's raw logit instead of the model's activation (Sigmoid "
        "unless its config names another).",
    )
    return_text: StrictBool = Field(default=False, description="Echo each text in its hit.")
    truncate: StrictBool = Field(
        default=True,
        description="Cut a document so query + document fit the model's token limit; false "
        "answers 413 naming the pair.",
    )
    # TEI's clients send its enum's names capitalised: both spellings are taken.
    truncation_direction: Literal["right", "left", "Right", "Left"] | None = Field(
        default=None,
        description="Which end of a document truncation cuts ('right' keeps its start). "
        "Default: the model's side (GET /info).",
    )
    model: StrictStr | None = Field(default=None, description=_RERANK_MODEL)


class RerankDocument(BaseModel):
    """A document given as an object (Cohere v1, Jina); only ``text`` is read."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr


class CohereRerankRequest(BaseModel):
    """``POST /v1/rerank`` and ``POST /v2/rerank``, the Cohere and Jina shape."""

    model_config = ConfigDict(extra="forbid")
    query: StrictStr = Field(description=_QUERY)
    documents: list[StrictStr | RerankDocument] = Field(
        description="The documents to score: strings, or objects with a `text`."
    )
    model: StrictStr | None = Field(default=None, description=_RERANK_MODEL)
    top_n: StrictInt | None = Field(
        default=None,
        description="Return the n best (at least 1; more than the documents returns all). "
        "Omitted: all, best first.",
    )
    return_documents: StrictBool = Field(
        default=False, description="Put each document's text in its result."
    )


# --- responses (for the OpenAPI document; bodies are written by hand) -------------------


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str = Field(
        description="floats, integer codes (int8/uint8/binary/ubinary) or a base64 string."
    )


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: OpenAIUsage


class TokenUsage(BaseModel):
    tokens: int


class ChunkSpan(BaseModel):
    index: int = Field(description="The text's index in `texts`.")
    start: int = Field(description="First character of the chunk in that text.")
    end: int = Field(description="One past its last character: text[start:end].")
    tokens: int = Field(description="Tokens embedded for it, special tokens included.")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]] | list[list[int]] | str
    model: str
    dimensions: int = Field(description="Dimensions embedded (a binary code is ceil(n/8) bytes).")
    encoding_format: EncodingFormat = "float"
    usage: TokenUsage
    chunks: list[ChunkSpan] | None = Field(
        default=None,
        description="With chunking, one entry per chunk in text order: the rows of "
        "`embeddings` (aggregate 'none') or what each text's mean was taken over ('mean').",
    )
    truncated: int = Field(description="How many texts truncation cut.")


class TokenizeResponse(BaseModel):
    ids: list[list[int]]
    counts: list[int]
    max_length: int
    usage: TokenUsage
    truncated: int = Field(description="How many texts truncation cut.")


class RerankHit(BaseModel):
    """One item of ``/rerank``'s answer (a list of them, highest score first)."""

    index: int = Field(description="The text's index in `texts`.")
    score: float
    text: str | None = Field(default=None, description="With return_text.")


class RerankResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="The document's index in `documents`.")
    relevance_score: float = Field(description="The model's activated score (Sigmoid: 0-1).")
    document: RerankResultDocument | None = Field(
        default=None, description="With return_documents."
    )


class RerankUsage(BaseModel):
    total_tokens: int = Field(description="Tokens of every (query, document) pair scored.")


class BilledUnits(BaseModel):
    search_units: int = Field(description="Cohere's unit: one per started 100 documents.")
    input_tokens: int = Field(description="As usage.total_tokens.")


class RerankMeta(BaseModel):
    api_version: dict[str, str]
    billed_units: BilledUnits


class CohereRerankResponse(BaseModel):
    id: str = Field(description="The request's id (its X-Request-Id).")
    model: str
    results: list[RerankResult] = Field(description="Highest relevance_score first, top_n of them.")
    usage: RerankUsage
    meta: RerankMeta


# Which request fields each route takes: a field of another route is refused by name
# (UnsupportedParameter), one of none as OpenAI does (UnknownParameter).
REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "/v1/embeddings": EmbeddingsRequest,
    "/embed": EmbedBulkRequest,
    "/embed/query": EmbedRequest,
    "/tokenize": TokenizeRequest,
    "/rerank": RerankRequest,
    "/v1/rerank": CohereRerankRequest,
    "/v2/rerank": CohereRerankRequest,
}


def routes_taking(field: str) -> list[str]:
    """The routes whose request body has ``field``."""
    return [route for route, model in REQUEST_MODELS.items() if field in model.model_fields]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    task: Literal["embed", "rerank"] = Field(
        description="embed: served on the embedding routes; rerank: a cross-encoder, served "
        "on /rerank, /v1/rerank and /v2/rerank."
    )
    dimensions: int | None = Field(
        default=None, description="The model's output dimension (before `dimensions`); embed only."
    )
    activation: str | None = Field(
        default=None, description="rerank only: the activation of its scores (raw_scores skips it)."
    )
    max_length: int = Field(description="The model's token limit, special tokens included.")
    prompts: dict[str, str] = Field(
        default_factory=dict, description="The model's prompts by name (prompt_name)."
    )
    default_prompt_name: str | None = Field(
        default=None, description="The prompt a request that names none gets."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
