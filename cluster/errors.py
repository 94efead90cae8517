"""Errors that cross the router's boundary, each with the HTTP status and OpenAI error type it maps to."""
from __future__ import annotations


class PdserveError(Exception):
    """Base: `status` is the HTTP status, `type` OpenAI's error type, `code` an optional short code."""

    status = 500
    type = "internal_server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(PdserveError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(PdserveError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFoundError(PdserveError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RequestTooLargeError(PdserveError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(PdserveError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class NoWorkerError(PdserveError):
    """No ready worker of a role the request needs."""

    status = 503
    type = "service_unavailable"
    code = "no_worker_available"


class WorkerError(PdserveError):
    """A worker failed the request (after any retries the router makes)."""

    status = 502
    type = "internal_server_error"
    code = "worker_error"


class NotFoundError(PdserveError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ConflictError(PdserveError):
    """The request conflicts with the target's state (a stale expected epoch, a switch running)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"
