"""The one error hierarchy.

Every error a user can cause or meet carries its HTTP status, an OpenAI-style
error ``type`` and, where it applies, the offending request parameter. The
HTTP layer maps these in one place (``embedkit.serve.edge.http_errors``); the CLI prints
``str(error)`` on one line. Nothing here knows about a web framework.
"""

from __future__ import annotations


class EmbedkitError(Exception):
    """Base class: a clear, one-line message plus how to surface it."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_openai(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# --- client mistakes (4xx) -------------------------------------------------


class InvalidInput(EmbedkitError):
    """Malformed or wrongly typed input (bad JSON, empty list, None items...)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_input"


class UnknownPrompt(InvalidInput):
    """A ``prompt_name`` the model does not define; the message lists the ones it does."""

    code = "unknown_prompt"


class UnknownParameter(InvalidInput):
    """A request field no route of ours knows (OpenAI: "Unrecognized request argument")."""

    code = "unknown_parameter"


class UnsupportedParameter(InvalidInput):
    """A field another route takes, sent to one that does not (refused, never ignored)."""

    code = "unsupported_parameter"


class WrongTask(InvalidInput):
    """A route of one task (embedding, rerank) asked for a model of the other; the
    message names the model's task and the routes that serve it."""

    code = "wrong_model_task"


class Unauthorized(EmbedkitError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class RevokedKey(Unauthorized):
    """A key on ``revoked_keys``: refused even while a tenant still lists it."""

    code = "revoked_api_key"


class ModelNotFound(EmbedkitError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(EmbedkitError):
    """Too many items, too large a body, or a text over the token limit."""

    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class InputTooLong(PayloadTooLarge):
    """A text exceeds the model's token limit while truncation is off."""

    code = "input_too_long"


class InvalidDimensions(EmbedkitError):
    status = 422
    type = "invalid_request_error"
    code = "invalid_dimensions"


class InvalidChunking(EmbedkitError):
    """Chunking options out of range for this model (window size, overlap)."""

    status = 422
    type = "invalid_request_error"
    code = "invalid_chunking"


class EncodingUnavailable(EmbedkitError):
    """An output encoding the served model cannot produce as asked (no calibrated int8
    ranges, or ranges calibrated for other vectors)."""

    status = 422
    type = "invalid_request_error"
    code = "encoding_unavailable"


class Overloaded(EmbedkitError):
    """Admission refused: the queue is full. Clients should retry later."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QuotaExceeded(Overloaded):
    """A tenant's token-rate quota is spent; ``retry_after_s``: until its bucket holds
    the request's tokens again (serve/tenants.py)."""

    code = "quota_exceeded"


class IdentityMismatch(EmbedkitError):
    """Vectors of two served identities (model version, variant, precision) would mix in
    one output, e.g. `embedkit reembed` resuming against a service that now serves another."""

    status = 409
    type = "invalid_request_error"
    code = "identity_mismatch"


# --- our side (5xx) ----------------------------------------------------------


class NotReady(EmbedkitError):
    status = 503
    type = "server_error"
    code = "not_ready"


class UpstreamTimeout(EmbedkitError):
    status = 504
    type = "server_error"
    code = "timeout"


class InferenceError(EmbedkitError):
    """The model produced something unusable (NaN/Inf) or the runtime failed."""

    status = 500
    type = "server_error"
    code = "inference_error"


# --- artifacts, configuration and tooling -------------------------------------


class ArtifactError(EmbedkitError):
    """An artifact is missing, malformed, tampered with or unsigned."""

    status = 503
    type = "server_error"
    code = "artifact_error"


class ChecksumMismatch(ArtifactError):
    code = "checksum_mismatch"


class SignatureError(ArtifactError):
    code = "signature_error"


class ConfigurationError(EmbedkitError):
    """Settings that cannot serve together (e.g. several models with topology=split)."""

    status = 500
    type = "server_error"
    code = "configuration_error"


class ModelSourceError(EmbedkitError):
    """The export source is not a usable sentence-transformers model."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_model_source"


class UnsupportedModel(ModelSourceError):
    """The model uses a feature we cannot export faithfully (e.g. a pooling mode)."""

    code = "unsupported_model"


class ProviderUnavailable(EmbedkitError):
    """Strict provider routing refused a fallback."""

    status = 503
    type = "server_error"
    code = "provider_unavailable"


class ContractViolation(EmbedkitError):
    """Validation of an artifact failed (parity, shapes, operators)."""

    status = 500
    type = "server_error"
    code = "contract_violation"


class PerformanceRegression(EmbedkitError):
    """A release's default version is slower than the previous ``:latest`` beyond
    ``config/perf-gate.yaml``; it was not registered (``--override-perf-gate REASON``)."""

    status = 500
    type = "server_error"
    code = "performance_regression"


class MissingExtra(EmbedkitError):
    """An optional dependency group is needed (e.g. ``pip install embedkit[export]``)."""

    status = 500
    type = "server_error"
    code = "missing_extra"


class BuildError(EmbedkitError):
    """Packaging a Bento failed, or produced one unfit to ship (``embedkit.deploy.bento.audit``)."""

    status = 500
    type = "server_error"
    code = "build_error"
