"""The console's audit pages."""

from __future__ import annotations

import datetime as dt

from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET

from compliance.forms import AuditFilterForm
from compliance.selectors import audit_event_list
from config.errors import NotFound
from config.htmx import domain_errors_as_pages, render_page

PAGE_SIZE = 50


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC)


@require_GET
@domain_errors_as_pages
def audit_event_list_view(request: HttpRequest) -> HttpResponse:
    """Audit events, newest first, filtered by actor, action and dates (UTC days), 50 a page."""
    form = AuditFilterForm(request.GET or None)
    filters = form.cleaned_data if form.is_valid() else {}
    since = filters.get("since")
    until = filters.get("until")
    events = audit_event_list(
        principal=request.principal,  # type: ignore[attr-defined]
        actor=filters.get("actor") or None,
        action=filters.get("action") or None,
        since=_day_start(since) if since else None,
        until=_day_start(until) + dt.timedelta(days=1) if until else None,
    )
    page = Paginator(events, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render_page(request, "compliance/audit_event_list.html",
                       {"form": form, "page": page, "query": query.urlencode()}, partial="audit-table")


@require_GET
@domain_errors_as_pages
def audit_event_detail(request: HttpRequest, seq: int) -> HttpResponse:
    """One event with its payload and its place in the hash chain."""
    event = audit_event_list(principal=request.principal).filter(seq=seq).first()  # type: ignore[attr-defined]
    if event is None:
        raise NotFound("No such audit event.")
    return render_page(request, "compliance/audit_event_detail.html", {"event": event})
