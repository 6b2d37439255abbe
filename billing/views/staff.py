"""Staff page on the public host (``/admin/billing/invoices/``): every tenant's invoices and the
month-to-date spend per tenant. Wrapped in the admin site's ``admin_view`` (``config.urls_public``),
so it asks for what the other staff pages ask for: an active staff user whose session is
verified by a second factor."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from billing.selectors import invoices as selectors
from tenants.principal import Principal


def staff_invoice_list(request: HttpRequest) -> HttpResponse:
    """All tenants' invoices (tenant, number, period, status, total) and each tenant's spend
    since the 1st of its current month (exact sum of usage-event costs, per currency)."""
    principal = Principal.for_staff(request.user)  # type: ignore[arg-type]  # admin_view let only staff in
    context = {
        **admin.site.each_context(request),
        "title": "Invoices and spend across tenants",
        "invoices": selectors.staff_invoice_list(principal=principal),
        "spend": selectors.staff_spend_month_to_date(principal=principal),
    }
    return render(request, "billing/staff_invoices.html", context)
