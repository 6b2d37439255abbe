"""Error pages (HTML on pages, the API's error body under /api/) and the public landing page."""

from __future__ import annotations

from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, HttpResponse, HttpResponsePermanentRedirect
from django.shortcuts import render
from django.templatetags.static import static

from config.api import error_response


def _page(request: HttpRequest, status: int, message: str) -> HttpResponse:
    if request.path.startswith("/api/"):
        return error_response(request, status=status, message=message)
    return render(request, "errors/error.html", {"status": status, "message": message}, status=status)


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return _page(request, 403, str(exception) if exception and str(exception) else "You may not open this page.")


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return _page(request, 404, "There is nothing at this address.")


def server_error(request: HttpRequest) -> HttpResponse:
    if request.path.startswith("/api/"):
        return error_response(request, status=500, message="Internal error. Quote the request id when reporting it.")
    # No template context processors here: they may be what failed.
    return HttpResponse(
        "<h1>Server error</h1><p>Something went wrong on our side. Request id: "
        f"{getattr(request, 'request_id', '')}</p>",
        status=500,
    )


@login_not_required
def public_home(request: HttpRequest) -> HttpResponse:
    """The public host's landing page: where staff and tenants go."""
    return render(request, "public/home.html")


@login_not_required
def favicon(request: HttpRequest) -> HttpResponse:
    """``/favicon.ico``, which browsers ask for on every host: a permanent redirect to the static icon."""
    return HttpResponsePermanentRedirect(static("favicon.ico"))

