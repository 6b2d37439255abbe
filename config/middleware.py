"""Cross-cutting HTTP middleware: request ids, liveness/readiness/metrics probes, body limits."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.utils.http import url_has_allowed_host_and_scheme

from config.probes import liveness, metrics, readiness

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
