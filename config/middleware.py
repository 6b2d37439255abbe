"""Cross-cutting HTTP middleware: request ids, liveness/readiness/metrics probes, database
availability (503), body limits."""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from django.conf import settings
from django.contrib import messages
from django.core.signals import got_request_exception
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.utils.http import url_has_allowed_host_and_scheme

from config.db import database_unavailable, database_unavailable_response
from config.probes import liveness, metrics, readiness

logger = structlog.get_logger(__name__)

# A client-supplied X-Request-ID is kept only if it is short and plain, so it cannot be used
# to inject text into logs or headers.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Honour a sane ``X-Request-ID`` or mint one; expose it as ``request.request_id`` and
    return it on every response. django_structlog binds it to the log context from META."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        supplied = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = supplied if _REQUEST_ID_RE.match(supplied) else uuid.uuid4().hex
        request.META["HTTP_X_REQUEST_ID"] = request_id
        request.request_id = request_id  # type: ignore[attr-defined]
        response = self.get_response(request)
        response["X-Request-ID"] = request_id
        return response


class ProbeMiddleware:
    """Answer ``/healthz``, ``/readyz`` and ``/metrics`` on every host, before tenant routing.

    Orchestrators probe pods by IP, so these must not depend on the Host header naming a
    tenant, nor on ALLOWED_HOSTS.
    """

    routes: dict[str, Callable[[HttpRequest], HttpResponse]] = {
        "/healthz": liveness,
        "/readyz": readiness,
        "/metrics": metrics,
    }

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        handler = self.routes.get(request.path.rstrip("/") or "/")
        if handler is not None and request.method in {"GET", "HEAD"}:
            return handler(request)
        return self.get_response(request)


class DatabaseAvailabilityMiddleware:
    """Answer 503 with ``Retry-After`` (``config.db.database_unavailable_response``) when the
    request cannot get a database connection in time, instead of a 500 with a traceback.

    The connection is taken here, before tenant routing (the first middleware that queries), so
    a dry pool or a server refusing clients is met at one place; the request then keeps it until
    Django returns it at the end. Later failures to connect (after code handed the connection
    back, ``config.db.connection_release``) are caught too: from views (``process_exception``),
    and from other middleware, which Django turns into a 500 response that is replaced here
    (``got_request_exception`` marks the request). Probes are answered before this runs.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            connection.ensure_connection()
        except DatabaseError as exc:
            if not database_unavailable(exc):
                raise
            return self._unavailable(request, exc)
        response = self.get_response(request)
        failure = getattr(request, "_database_unavailable", None)
        if response.status_code == 500 and failure is not None:
            return self._unavailable(request, failure)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if database_unavailable(exception):
            return self._unavailable(request, exception)
        return None

    @staticmethod
    def _unavailable(request: HttpRequest, exc: BaseException) -> HttpResponse:
        logger.warning("database_unavailable", path=request.path, error=f"{type(exc).__name__}: {exc}")
        return database_unavailable_response(request)


def _mark_database_unavailable(sender: Any, request: HttpRequest | None = None, **kwargs: Any) -> None:
    """``got_request_exception`` receiver: remember on the request that the exception being turned
    into a 500 was a failure to get a database connection (``DatabaseAvailabilityMiddleware``)."""
    exc = sys.exc_info()[1]
    if request is not None and exc is not None and database_unavailable(exc):
        request._database_unavailable = exc  # type: ignore[attr-defined]


got_request_exception.connect(_mark_database_unavailable, dispatch_uid="config.middleware.database_unavailable")


class BodySizeMiddleware:
    """Refuse request bodies larger than the endpoint allows with 413, before reading them.

    JSON endpoints accept ``API_MAX_BODY_BYTES``; upload endpoints (paths listed in
    ``UPLOAD_PATH_PREFIXES``) accept ``KB_MAX_UPLOAD_MB``. The check uses Content-Length;
    bodies without one are bounded by Django's DATA_UPLOAD_MAX_MEMORY_SIZE as they are read.

    API paths get the API's error body. A console form post that came from one of our own pages
    (same-origin ``Referer``) is sent back there (303) with the reason as an error message, so a
    user who picked too many files sees the page they were on, not a bare status page; anything
    else gets a plain-text 413. It sits after the message middleware and before any view runs
    (CSRF reads the form only in ``process_view``), so nothing has read the body yet.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        limit = body_limit_for(request.path)
        if length <= limit:
            return self.get_response(request)
        if request.path.startswith("/api/"):
            return JsonResponse(
                {
                    "error": {
                        "code": "payload_too_large",
                        "message": f"Request body of {length} bytes exceeds the limit of {limit} bytes.",
                        "details": {"limit_bytes": limit},
                        "request_id": getattr(request, "request_id", None),
                    }
                },
                status=413,
            )
        message = (f"That upload is {length / 1048576:.1f} MB; one upload takes at most "
                   f"{limit / 1048576:.0f} MB. Upload fewer or smaller files at a time."
                   if is_upload_path(request.path)
                   else f"That form sent {length} bytes; the limit is {limit} bytes.")
        back = request.META.get("HTTP_REFERER", "")
        if back and hasattr(request, "_messages") and url_has_allowed_host_and_scheme(
                back, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
            messages.error(request, message)
            return HttpResponseRedirect(back, status=303)
        return HttpResponse(message, status=413, content_type="text/plain")


def is_upload_path(path: str) -> bool:
    """True when ``path`` is an upload endpoint (it matches one of ``UPLOAD_PATH_PREFIXES``)."""
    return any(re.match(prefix, path) for prefix in getattr(settings, "UPLOAD_PATH_PREFIXES", ()))


def body_limit_for(path: str) -> int:
    """Return the largest request body in bytes that ``path`` accepts: ``KB_MAX_UPLOAD_MB`` MiB
    for upload endpoints, ``API_MAX_BODY_BYTES`` for everything else."""
    if is_upload_path(path):
        return int(settings.KB_MAX_UPLOAD_MB * 1024 * 1024)
    return int(settings.API_MAX_BODY_BYTES)


class RateLimitHeadersMiddleware:
    """Put the ``RateLimit-*`` headers of the request's rate-limit count
    (``request.rate_limit_headers``, set by ``config.api.api_request_counted``) on its response,
    whatever made it (JSON, a stream, a file, an error). Headers the response already has win:
    a 429 carries those of the limit that refused it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        for name, value in getattr(request, "rate_limit_headers", {}).items():
            if not response.has_header(name):
                response[name] = value
        return response


class ApiErrorShapeMiddleware:
    """Give every 4xx/5xx answer under ``/api/`` the API's error body.

    The API's own handlers already do; this catches what happens outside them (405 from the
    router, 404 from URL resolution or an unknown host, CSRF failures, crashes in middleware).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if (
            request.path.startswith("/api/")
            and response.status_code >= 400
            and not response.get("Content-Type", "").startswith("application/json")
        ):
            from config.api import error_response

            message = {
                404: f"No API endpoint at {request.path}.",
                405: f"Method {request.method} is not allowed here.",
            }.get(response.status_code, response.reason_phrase or "Error")
            shaped = error_response(request, status=response.status_code, message=message)
            if response.has_header("Allow"):
                shaped["Allow"] = response["Allow"]
            return shaped
        return response
