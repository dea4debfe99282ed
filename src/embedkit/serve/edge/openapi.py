"""``/docs.json``: BentoML's generated OpenAPI document, made to describe what we serve."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from embedkit.core.settings import Settings
from embedkit.serve.edge.schemas import (
    INFERENCE_ROUTES,
    RERANK_ROUTES,
    TRUNCATED_HEADER,
    BilledUnits,
    ChunkSpan,
    CohereRerankResponse,
    EmbeddingItem,
    EmbeddingsResponse,
    EmbedResponse,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAIUsage,
    RerankHit,
    RerankMeta,
    RerankResult,
    RerankResultDocument,
    RerankUsage,
    TokenizeResponse,
    TokenUsage,
)
from embedkit.serve.pipeline.trace import BULK_AHEAD_HEADER, LANE_HEADER, REQUEST_ID_HEADER

ERROR_STATUSES = {
    "400": "Malformed JSON, wrong types, empty input, non-JSON Content-Type, an unknown "
    "encoding_format or truncation_direction; a prompt_name the model does not define "
    "(code unknown_prompt); a field another route takes (code unsupported_parameter) or no "
    "route takes (code unknown_parameter, OpenAI's 'Unrecognized request argument supplied'); "
    "an X-Embedkit-Lane other than query/bulk, or naming the other lane on a native or rerank "
    "route; a model of the other task (code wrong_model_task: a reranker on an embedding "
    "route, or the reverse). Rerank routes: an empty query or documents, top_n < 1, a "
    'document neither a string nor {"text": ...}.',
    "401": "Missing, invalid (code invalid_api_key) or revoked (code revoked_api_key) API key "
    "(only when keys are configured).",
    "404": "Unknown model.",
    "413": "Too many items, body too large, or a text over the token limit with truncate=false; "
    "rerank routes: more documents than max_rerank_documents, a query that leaves a document "
    "no room in the token limit (a query is never cut), or a pair over it with truncate=false.",
    "422": "dimensions or chunking out of range; int8/uint8 from a model without calibrated "
    "ranges, or with normalize unlike its calibration (code encoding_unavailable).",
    "429": "Overloaded (code overloaded), or the tenant's token quota is spent (code "
    "quota_exceeded): retry after the Retry-After header.",
    "500": "Internal error (details only in the server log).",
    "503": "Not ready yet.",
    "504": "The model did not answer in time.",
}


def openapi_document(
    spec: dict[str, Any],
    *,
    settings: Settings,
    model: str,
    model_dim: int | None = None,
    vocab_size: int | None = None,
    prompts: Sequence[str] = (),
    max_length: int | None = None,
    frame_tokens: int = 0,
    models: Sequence[str] = (),
    rerankers: Sequence[str] = (),
) -> dict[str, Any]:
    """BentoML's generated document made honest: our error body and statuses on every
    route, the limits the server enforces as schema constraints, and the GET routes
    (a mounted Starlette app BentoML does not describe).

    ``models``: the served embedding models (default: ``model``, when ``model_dim`` is
    given); ``rerankers``: the served rerankers. Each route's ``model`` enum names those
    of its task, and the routes of a task nobody serves are left out."""
    spec = copy.deepcopy(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    template = "#/components/schemas/{model}"
    bodies: tuple[type[BaseModel], ...] = (
        ErrorDetail,
        ErrorResponse,
        ModelCard,
        ModelList,
        EmbeddingItem,
        OpenAIUsage,
        EmbeddingsResponse,
        TokenUsage,
        EmbedResponse,
        TokenizeResponse,
        ChunkSpan,
        RerankHit,
        RerankResultDocument,
        RerankResult,
        RerankUsage,
        BilledUnits,
        RerankMeta,
        CohereRerankResponse,
    )
    for cls in bodies:
        schema = cls.model_json_schema(ref_template=template)
        schema.pop("$defs", None)
        schemas[cls.__name__] = _nullable(schema)
    if max_length is not None and "ChunkingOptions" in schemas:  # /embed's chunking limits
        props = _nullable(schemas["ChunkingOptions"])["properties"]
        props["max_tokens"].update(minimum=frame_tokens + 1, maximum=max_length)
        props["overlap"].update(minimum=0, maximum=max_length - frame_tokens - 1)
    # BentoML flattens `list[...] | str` response fields to the list: use ours.
    responses = {
        "/v1/embeddings": "EmbeddingsResponse",
        "/embed": "EmbedResponse",
        "/embed/query": "EmbedResponse",
        "/tokenize": "TokenizeResponse",
        "/v1/rerank": "CohereRerankResponse",
        "/v2/rerank": "CohereRerankResponse",
    }
    error = {
        "content": {
            "application/json": {"schema": {"$ref": template.format(model="ErrorResponse")}}
        }
    }
    limits = {"minItems": 1, "maxItems": settings.max_client_batch}
    ids = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, **_most(vocab_size and vocab_size - 1)},
        "minItems": 1,
    }
    embedding = list(models) or ([model] if model_dim is not None else [])
    for path in sorted(INFERENCE_ROUTES):
        op = spec.get("paths", {}).get(path, {}).get("post")
        if op is None:
            continue
        rerank = path in RERANK_ROUTES
        names = list(rerankers) if rerank else embedding
        if not names:  # no model of this route's task is served: not a route to offer
            del spec["paths"][path]
            continue
        for code, text in ERROR_STATUSES.items():
            op["responses"][code] = {"description": text, **error}
        body_schema = (
            {"type": "array", "items": {"$ref": template.format(model="RerankHit")}}
            if path == "/rerank"
            else {"$ref": template.format(model=responses[path])}
        )
        op["responses"]["200"] = {
            "description": "OK",
            "headers": {
                TRUNCATED_HEADER: {
                    "description": "How many inputs truncation cut.",
                    "schema": {"type": "integer", "minimum": 0},
                },
                **_TRACE_HEADERS,
            },
            "content": {"application/json": {"schema": body_schema}},
        }
        op["requestBody"]["required"] = True
        op["parameters"] = [
            *op.get("parameters", []),
            *_REQUEST_HEADERS[: 2 if path == "/v1/embeddings" else 1],
        ]
        props = op["requestBody"]["content"]["application/json"]["schema"].get("properties", {})
        for prop in props.values():  # BentoML flattens Optional[X] to X: OpenAPI 3.0 nullable
            if "default" in prop and prop["default"] is None:
                prop["nullable"] = True
        documents = {"minItems": 1, "maxItems": settings.max_rerank_documents}
        for field in ("texts", "documents"):
            if field in props:
                props[field].update(documents if rerank else limits)
        if "top_n" in props:
            props["top_n"].update(minimum=1)
        if "query" in props:
            props["query"].update(minLength=1)
        if "dimensions" in props:
            props["dimensions"].update(minimum=1, **_most(model_dim))
        if "model" in props:
            props["model"]["enum"] = names  # every served name of the route's task
        if "prompt_name" in props and prompts:  # none defined: any name is a documented 400
            props["prompt_name"]["enum"] = list(prompts)
        if "input" in props:
            props["input"].pop("type", None)  # BentoML adds "string" beside the anyOf
            props["input"]["anyOf"] = [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, **limits},
                ids,
                {"type": "array", "items": ids, **limits},
            ]
    ok = {"description": "OK"}
    spec.setdefault("paths", {})["/v1/models"] = {
        "get": {
            "responses": {
                "200": {
                    **ok,
                    "content": {
                        "application/json": {"schema": {"$ref": template.format(model="ModelList")}}
                    },
                },
                "401": {"description": ERROR_STATUSES["401"], **error},
            }
        }
    }
    spec["paths"]["/info"] = {
        "get": {
            "responses": {
                "200": {**ok, "content": {"application/json": {"schema": {"type": "object"}}}},
                **{
                    c: {"description": ERROR_STATUSES[c], **error}
                    for c in ("401", "429", "500", "504")
                },
            }
        }
    }
    return spec


# docs/service.md § Lanes, § Request ids, § Tenants.
_REQUEST_HEADERS = [
    {
        "name": REQUEST_ID_HEADER,
        "in": "header",
        "required": False,
        "description": "Your id for this request, echoed back and logged; another value is "
        "replaced by a generated one.",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
    },
    {
        "name": LANE_HEADER,
        "in": "header",
        "required": False,
        "description": "The lane to run on (default: one input → query, several → bulk); a "
        "bulk-class tenant runs on bulk regardless.",
        "schema": {"type": "string", "enum": ["query", "bulk"]},
    },
]
_TRACE_HEADERS = {
    REQUEST_ID_HEADER: {"description": "The request's id.", "schema": {"type": "string"}},
    LANE_HEADER: {"description": "The lane that served it.", "schema": {"type": "string"}},
    BULK_AHEAD_HEADER: {
        "description": "Bulk ORT runs its query calls waited behind (topology=single).",
        "schema": {"type": "integer", "minimum": 0},
    },
}


def _most(limit: int | None) -> dict[str, int]:
    """A schema's ``maximum``, where the limit is known (an embedding model is served)."""
    return {} if limit is None else {"maximum": limit}


def _nullable(schema: Any) -> Any:
    """pydantic's ``anyOf: [X, {type: null}]`` as OpenAPI 3.0 says it (X, nullable), in place."""
    if isinstance(schema, dict):
        options = schema.get("anyOf")
        if isinstance(options, list) and {"type": "null"} in options and len(options) == 2:
            (kept,) = [o for o in options if o != {"type": "null"}]
            del schema["anyOf"]
            schema.update(kept, nullable=True)
        for value in schema.values():
            _nullable(value)
    elif isinstance(schema, list):
        for value in schema:
            _nullable(value)
    return schema
