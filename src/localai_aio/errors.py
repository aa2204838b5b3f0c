"""Typed API errors, and the one map from an engine's errors to them (``from_engine``).

Handlers raise these; engines raise their own (``backends.base``) and never see these. Nothing else
builds error bodies, so every route answers ``{"error": {"message", "type", "param", "code"}}`` with the
right status; Anthropic's, ElevenLabs' and Ollama's routes answer their own shapes (``body_for``). The middleware
that renders them is ``server.error_responses``.
"""

from __future__ import annotations

import logging
from typing import Any

from localai_aio.backends.base import ConstraintError, EngineBusy, InputRefused, PromptTooLong, Unsupported

log = logging.getLogger(__name__)

#: Anthropic's error type by HTTP status; other statuses are api_error (5xx) or invalid_request_error.
ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
}


class APIError(Exception):
    """An error the client should see. Subclasses fix the status and the OpenAI error type."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_for(self, dialect: str) -> dict[str, Any]:
        """The error body in the shape of the API the route belongs to."""
        if dialect == "anthropic":
            kind = ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        if dialect == "ollama":
            return {"error": self.message}
        if dialect == "elevenlabs":
            return {"detail": {"status": self.code or self.type, "message": self.message, "param": self.param}}
        return self.body()


class InvalidRequest(APIError):
    pass


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(APIError):
    """The caller is known but may not do this (a user key on an admin route). OpenAI answers a key that
    lacks a permission with ``invalid_request_error`` too; the code says which refusal it is."""

    status = 403
    code = "insufficient_permissions"


class HostNotAllowed(PermissionDenied):
    """Without keys, a request for a host name the server was not told about (DNS rebinding)."""

    code = "host_not_allowed"


class OriginNotAllowed(PermissionDenied):
    """A state-changing request sent by another site's web page."""

    code = "origin_not_allowed"


class NotFound(APIError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(APIError):
    status = 405
    code = "method_not_allowed"


class Conflict(APIError):
    """The request would replace something it was not told it may replace."""

    status = 409
    code = "conflict"


class PayloadTooLarge(APIError):
    status = 413
    code = "request_too_large"


def body_too_large(limit_mb: float) -> PayloadTooLarge:
    """The one 413 for a body over ``--upload-limit``, however it was found out (its Content-Length, or
    counting a chunked, compressed or multipart body as it arrives)."""
    return PayloadTooLarge(f"Request body is larger than the upload limit of {limit_mb:g} MB")


class UnsupportedMediaType(APIError):
    status = 415
    code = "unsupported_media_type"


class NotImplementedForModel(APIError):
    """The model's backend cannot do what the request asks (a capability, not a bug)."""

    status = 400
    code = "unsupported_for_model"


class RetryLater(APIError):
    """A 503 the client should retry after ``Retry-After`` seconds (``retry_after``, else the class's)."""

    status = 503
    type = "server_error"
    retry_after = 1

    def __init__(self, message: str, *, retry_after: int | None = None, **kwargs: Any):
        super().__init__(message, headers={"Retry-After": str(retry_after or self.retry_after)}, **kwargs)


class ServerBusy(RetryLater):
    """Too many requests are waiting."""

    code = "server_overloaded"


class StorageUnavailable(RetryLater):
    """The database or the blob store cannot be reached now (the server keeps serving what needs neither)."""

    code = "storage_unavailable"
    retry_after = 5


class ModelLoadFailed(APIError):
    """A configured model could not be loaded (bad file, missing file, unusable backend)."""

    status = 500
    type = "server_error"
    code = "model_load_failed"


class InternalError(APIError):
    status = 500
    type = "server_error"
    code = "internal_error"


def from_engine(exc: BaseException) -> APIError | None:
    """The API error an engine's error means to the client, or None for a failure that is a bug. Engines
    raise only their own errors (``backends.base``); this is the one place they become HTTP answers."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ConstraintError):
        return InvalidRequest(str(exc), param=exc.param, code="constraint_unsatisfiable")
    if isinstance(exc, InputRefused):
        return InvalidRequest(str(exc), param=exc.param)
    if isinstance(exc, PromptTooLong):
        return ContextLengthExceeded(str(exc), param=exc.param)
    if isinstance(exc, Unsupported):
        return NotImplementedForModel(str(exc), param=exc.param)
    if isinstance(exc, EngineBusy):
        return ServerBusy(str(exc), retry_after=exc.retry_after)
    return None


def failure(exc: BaseException, what: str, request_id: str | None) -> APIError:
    """What a client is told of ``exc`` once its answer has started: an API error as it is; anything
    else is logged here, with the request id, and told only that generation failed."""
    known = from_engine(exc)
    if known is not None:
        return known
    log.error("%s failed (request id %s)", what, request_id, exc_info=exc)
    return InternalError("Generation failed")
