"""Domain errors raised by services and selectors, shared by every app.

Views turn them into pages or messages; the REST API turns them into its one error body
(``config.api``). Each carries a stable machine-readable ``code`` and the HTTP status that fits.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base class: a request that cannot be carried out, with a message a user can read."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class ValidationFailed(DomainError):
    """The input is malformed or breaks a rule of the domain (HTTP 422)."""

    status = 422
    code = "validation_failed"


class NotAuthenticated(DomainError):
    """No credentials, or credentials that do not identify anyone (HTTP 401)."""

    status = 401
    code = "not_authenticated"


class Forbidden(DomainError):
    """The caller is known but may not do this (HTTP 403)."""

    status = 403
    code = "forbidden"


class NotFound(DomainError):
    """No such object in the caller's tenant; also used to avoid revealing other tenants' ids."""

    status = 404
    code = "not_found"


class Conflict(DomainError):
    """The request clashes with the current state, e.g. a duplicate (HTTP 409)."""

    status = 409
    code = "conflict"


class PayloadTooLarge(DomainError):
    """The request body is larger than the endpoint accepts (HTTP 413)."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(DomainError):
    """The uploaded content is of a type the endpoint does not accept (HTTP 415)."""

    status = 415
    code = "unsupported_media_type"


class TooManyRequests(DomainError):
    """A rate limit, budget or quota refuses the request for now (HTTP 429). ``retry_after`` is
    the number of seconds after which it may succeed (``Retry-After``), ``None`` if unknown;
    ``headers`` are extra response headers (``RateLimit-*``)."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None,
                 retry_after: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code, details=details)
        self.retry_after = retry_after
        self.headers = dict(headers or {})
