"""The staff operations page on the public host (``/admin/ops/``): queue depths, turns in flight
and recently failed across tenants, model endpoint health with a "Test endpoint" button,
ingestion backlog and month-to-date usage per tenant.

Both views are wrapped in the admin site's ``admin_view`` (``config.urls_public``), so they ask
for what the other staff pages ask for: an active staff user whose session is verified by a
second factor.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from config.errors import NotFound
from config.htmx import domain_errors_as_pages, is_fragment
from tenants import ops_selectors as selectors
from tenants.models import ModelEndpoint
from tenants.principal import Principal
from tenants.services.endpoint_probe import staff_model_endpoint_test


def _staff(request: HttpRequest) -> Principal:
    return Principal.for_staff(request.user)  # type: ignore[arg-type]  # admin_view let only staff in


@require_GET
def staff_ops(request: HttpRequest) -> HttpResponse:
    """The operations page; its reads do not grow in number with the tenants (one statement per
    section across every tenant schema, ``tenants.ops_selectors``)."""
    principal = _staff(request)
    now = timezone.now()
    tenants = selectors.ops_tenants(principal=principal)
    health, health_error = selectors.ops_endpoint_health(principal=principal)
    context = {
        **admin.site.each_context(request),
        "title": "Operations",
        "now": now,
        "queues": selectors.ops_queue_depths(principal=principal),
        "in_flight": selectors.ops_turns_in_flight(principal=principal, tenants=tenants, now=now),
        "failed": selectors.ops_turns_failed(principal=principal, tenants=tenants, now=now),
        "failed_window_hours": int(selectors.FAILED_TURNS_WINDOW.total_seconds() // 3600),
        "endpoints": health,
        "health_error": health_error,
        "backlog": selectors.ops_ingestion_backlog(principal=principal, tenants=tenants, now=now),
        "usage": selectors.ops_usage_month_to_date(principal=principal, tenants=tenants, now=now),
        "tenant_count": len(tenants),
    }
    return render(request, "tenants/staff_ops.html", context)


@require_POST
@domain_errors_as_pages
def staff_endpoint_test(request: HttpRequest, endpoint_id: int) -> HttpResponse:
    """Probe one platform endpoint now (audited in the public chain). htmx gets the result cell
    of the endpoint's row; without JavaScript the page is shown again with the result as a
    message. A tenant's own endpoint or an unknown id is 404."""
    principal = _staff(request)
    endpoint = ModelEndpoint.objects.filter(pk=endpoint_id, tenant__isnull=True).first()
    if endpoint is None:
        raise NotFound("No such platform model endpoint.")
    result = staff_model_endpoint_test(principal=principal, endpoint=endpoint)
    if is_fragment(request):
        return render(request, "tenants/staff_ops.html#probe-result", {"endpoint": endpoint, "result": result})
    if result.ok:
        messages.success(request, f"{endpoint.name}: ok in {result.latency_ms} ms.")
    else:
        messages.error(request, f"{endpoint.name}: {result.error}")
    return redirect("staff_ops")
