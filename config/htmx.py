"""Helpers for pages that serve both full loads and htmx fragment swaps."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.cache import patch_vary_headers

from config.errors import DomainError


def is_htmx(request: HttpRequest) -> bool:
    """True when htmx sent the request (django-htmx's ``request.htmx`` is truthy)."""
    return bool(getattr(request, "htmx", False))


def is_fragment(request: HttpRequest) -> bool:
    """True for an htmx request that wants a fragment (not a boosted full-page navigation)."""
    htmx = getattr(request, "htmx", None)
    return bool(htmx) and not htmx.boosted  # type: ignore[union-attr]


def render_page(request: HttpRequest, template: str, context: dict[str, Any], *, partial: str | None = None,
                status: int = 200) -> HttpResponse:
    """Render ``template``, or only its named ``partial`` for htmx fragment requests.

    Adds ``Vary: HX-Request`` because one URL serves two representations.
    """
    name = f"{template}#{partial}" if partial and is_fragment(request) else template
    response = render(request, name, context, status=status)
    patch_vary_headers(response, ["HX-Request"])
    return response


def toast(response: HttpResponse, message: str, level: str = "success") -> HttpResponse:
    """Ask the page to show a toast (``HX-Trigger``; read by static/js/portal.js)."""
    response["HX-Trigger"] = json.dumps({"toast": {"level": level, "message": message}})
    return response


# An out-of-band swap that empties the page's flash messages (base.html's #messages).
STALE_MESSAGES_CLEARED = b'<div id="messages" hx-swap-oob="true"></div>'


def after_write(request: HttpRequest, *, message: str, level: str = "success",
                fragment: Callable[[], HttpResponse], redirect_to: str) -> HttpResponse:
    """Finish a form post: the re-rendered fragment plus a toast for htmx (and the page's
    earlier flash messages cleared), or post/redirect/get with a flash message without
    JavaScript."""
    if is_fragment(request):
        response = fragment()
        # The toast reports this write; flash messages of the page's last load are stale now.
        response.content += STALE_MESSAGES_CLEARED
        return toast(response, message, level)
    getattr(messages, level if level != "danger" else "error")(request, message)
    return redirect(redirect_to)


def domain_errors_as_pages(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Turn a ``DomainError`` escaping a page view into an error page with its status."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return view(request, *args, **kwargs)
        except DomainError as exc:
            response = render(request, "errors/error.html", {"status": exc.status, "message": exc.message},
                              status=exc.status)
            return toast(response, exc.message, "danger") if is_fragment(request) else response

    return wrapper
