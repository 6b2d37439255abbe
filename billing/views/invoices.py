"""Console pages for invoices (``/invoices/``): the list with a form that drafts a month, one
invoice with its lines, finalizing it (``billing:write``), and its CSV and PDF downloads.

Permissions and tenant scoping are enforced by ``billing.services.invoices`` and
``billing.selectors.invoices``; the views parse, call one of them and render.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from billing.pdf import invoice_pdf
from billing.periods import month_before
from billing.selectors import invoices as selectors
from billing.services import invoices as services
from config.errors import DomainError
from config.htmx import domain_errors_as_pages, render_page
from tenants.principal import request_principal


class InvoiceDraftForm(forms.Form):
    period = forms.RegexField(
        regex=r"^\d{4}-(0[1-9]|1[0-2])$",
        max_length=7,
        label="Month (YYYY-MM)",
        error_messages={"invalid": "Write the month as YYYY-MM, e.g. 2026-11."},
        widget=forms.TextInput(attrs={"class": "form-control", "placeholder": "YYYY-MM"}),
    )


def _list_context(request: HttpRequest, form: InvoiceDraftForm | None = None) -> dict[str, object]:
    principal = request_principal(request)
    invoices = list(selectors.invoice_list(principal=principal)[:200])
    tenant = connection.tenant  # type: ignore[attr-defined]
    last_month = month_before(timezone.now(), tenant.time_zone)
    return {
        "invoices": invoices,
        "can_write": principal.can("billing:write"),
        "form": form or InvoiceDraftForm(initial={"period": last_month}),
        "time_zone": tenant.time_zone,
    }


@require_GET
@domain_errors_as_pages
def invoice_list(request: HttpRequest) -> HttpResponse:
    """The tenant's invoices, newest first (at most 200), and the draft form for writers."""
    return render_page(request, "billing/invoice_list.html", _list_context(request), partial="invoice-table")


@require_POST
@domain_errors_as_pages
def invoice_draft(request: HttpRequest) -> HttpResponse:
    """Draft (or recompute the draft of) the month in the form, then open the invoice."""
    principal = request_principal(request)
    principal.require("billing:write")
    form = InvoiceDraftForm(request.POST)
    if form.is_valid():
        try:
            outcome = services.invoice_draft(principal=principal, period=form.cleaned_data["period"])
        except DomainError as exc:
            form.add_error("period", exc.message)
        else:
            verb = "drafted" if outcome.created else "recomputed"
            messages.success(
                request,
                f"Invoice of {outcome.invoice.period} {verb}: {outcome.invoice.currency} {outcome.invoice.total}.",
            )
            return redirect("invoice_detail", invoice_id=outcome.invoice.pk)
    return render_page(request, "billing/invoice_list.html", _list_context(request, form), status=422)


@require_GET
@domain_errors_as_pages
def invoice_detail(request: HttpRequest, invoice_id: int) -> HttpResponse:
    """One invoice: its facts, lines, totals, downloads and (drafts, for writers) finalize."""
    principal = request_principal(request)
    invoice = selectors.invoice_get(principal=principal, invoice_id=invoice_id)
    return render_page(
        request,
        "billing/invoice_detail.html",
        {
            "invoice": invoice,
            "lines": list(invoice.lines.all()),
            "can_write": principal.can("billing:write"),
            "period_open": timezone.now() < invoice.period_end,
        },
    )


@require_POST
@domain_errors_as_pages
def invoice_finalize(request: HttpRequest, invoice_id: int) -> HttpResponse:
    """Finalize a draft invoice (recomputed, numbered, frozen) and show it again."""
    principal = request_principal(request)
    principal.require("billing:write")
    invoice = selectors.invoice_get(principal=principal, invoice_id=invoice_id)
    try:
        invoice = services.invoice_finalize(principal=principal, invoice=invoice)
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(
            request, f"Invoice {invoice.number} of {invoice.period} finalized: {invoice.currency} {invoice.total}."
        )
    return redirect("invoice_detail", invoice_id=invoice_id)


@require_GET
@domain_errors_as_pages
def invoice_csv(request: HttpRequest, invoice_id: int) -> HttpResponse:
    invoice = selectors.invoice_get(principal=request_principal(request), invoice_id=invoice_id)
    response = HttpResponse(selectors.invoice_csv(invoice), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="invoice-{invoice.period}-{invoice.number or "draft"}.csv"'
    return response


@require_GET
@domain_errors_as_pages
def invoice_pdf_download(request: HttpRequest, invoice_id: int) -> HttpResponse:
    invoice = selectors.invoice_get(principal=request_principal(request), invoice_id=invoice_id)
    response = HttpResponse(
        invoice_pdf(invoice=invoice, tenant=connection.tenant),  # type: ignore[attr-defined]
        content_type="application/pdf",
    )
    response["Content-Disposition"] = f'attachment; filename="invoice-{invoice.period}-{invoice.number or "draft"}.pdf"'
    return response
