"""REST endpoints for invoices (``/api/v1/invoices``).

``billing:read`` lists and reads invoices and downloads them as CSV or PDF; ``billing:write``
drafts (``POST /invoices/draft``: 201 when the period's invoice is new, 200 when its draft was
recomputed), finalizes and voids. Amounts are decimal strings in the invoice's currency
(``billing.services.invoices`` states the rounding rule). Errors: 409 ``invoice_finalized``
(redrafting or finalizing an invoice that is no longer a draft), 409 ``period_open``
(finalizing a month that has not ended), 422 ``invalid_period`` / ``period_in_future`` /
``currency_mismatch``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db import connection
from django.http import HttpRequest, HttpResponse
from ninja import Field, Query, Router, Schema, Status
from pydantic import ConfigDict

from billing.models import Invoice
from billing.pdf import invoice_pdf
from billing.selectors import invoices as selectors
from billing.services import invoices as services
from config.api import keyset_page, principal_of

router = Router(tags=["invoices"])


class InvoiceDraftIn(Schema):
    model_config = ConfigDict(extra="forbid")

    period: str = Field(description="The calendar month YYYY-MM, in the tenant's timezone", examples=["2026-11"])


class InvoiceLineOut(Schema):
    position: int
    kind: str = Field(description="A usage kind, or plan.fee for the plan's monthly fee")
    description: str
    model: str
    endpoint: str
    agent_id: int | None
    agent_slug: str
    quantity: int
    unit: str
    unit_price: str = Field(description="Decimal string, 12 places")
    amount: str = Field(description="Decimal string, cents")


class InvoiceSummaryOut(Schema):
    id: int
    number: int | None = Field(description="The tenant's sequential number, set on finalize")
    period: str
    status: str = Field(description="draft, finalized or void")
    currency: str
    plan_code: str
    plan_fee: str
    usage_total: str
    total: str = Field(description="usage_total + plan_fee, a decimal string")
    events_count: int
    period_start: dt.datetime
    period_end: dt.datetime
    drafted_at: dt.datetime
    finalized_at: dt.datetime | None
    voided_at: dt.datetime | None


class InvoiceOut(InvoiceSummaryOut):
    lines: list[InvoiceLineOut]


class InvoicePage(Schema):
    items: list[InvoiceSummaryOut]
    next_cursor: str | None


class InvoiceFilters(Schema):
    status: Invoice.Status | None = None
    limit: int = 50
    cursor: str | None = None


def invoice_summary(invoice: Invoice) -> dict[str, Any]:
    return {
        "id": invoice.pk,
        "number": invoice.number,
        "period": invoice.period,
        "status": invoice.status,
        "currency": invoice.currency,
        "plan_code": invoice.plan_code,
        "plan_fee": f"{invoice.plan_fee:f}",
        "usage_total": f"{invoice.usage_total:f}",
        "total": f"{invoice.total:f}",
        "events_count": invoice.events_count,
        "period_start": invoice.period_start,
        "period_end": invoice.period_end,
        "drafted_at": invoice.drafted_at,
        "finalized_at": invoice.finalized_at,
        "voided_at": invoice.voided_at,
    }


def invoice_out(invoice: Invoice) -> dict[str, Any]:
    """An invoice with its lines as ``InvoiceOut``."""
    lines = [
        {
            "position": line.position,
            "kind": line.kind,
            "description": line.description,
            "model": line.model,
            "endpoint": line.endpoint,
            "agent_id": line.agent_id,
            "agent_slug": line.agent_slug,
            "quantity": line.quantity,
            "unit": line.unit,
            "unit_price": f"{line.unit_price:f}",
            "amount": f"{line.amount:f}",
        }
        for line in invoice.lines.all()
    ]
    return {**invoice_summary(invoice), "lines": lines}


def _filename(invoice: Invoice, extension: str) -> str:
    return f"invoice-{connection.tenant.slug}-{invoice.period}-{invoice.number or 'draft'}.{extension}"  # type: ignore[attr-defined]


@router.get("/invoices", response=InvoicePage, summary="Invoices, newest first (without lines)")
def invoice_list(request: HttpRequest, filters: Query[InvoiceFilters]) -> dict[str, Any]:
    invoices = selectors.invoice_list(principal=principal_of(request), status=filters.status)
    rows, cursor = keyset_page(invoices, cursor=filters.cursor, limit=filters.limit)
    return {"items": [invoice_summary(invoice) for invoice in rows], "next_cursor": cursor}


@router.post(
    "/invoices/draft",
    response={200: InvoiceOut, 201: InvoiceOut},
    summary="Draft (or recompute the draft of) a month's invoice from the usage events",
)
def invoice_draft(request: HttpRequest, payload: InvoiceDraftIn) -> Status[dict[str, Any]]:
    principal = principal_of(request)
    # The answer is the invoice read back, which needs billing:read: refuse before anything is written.
    principal.require("billing:read")
    outcome = services.invoice_draft(principal=principal, period=payload.period)
    invoice = selectors.invoice_get(principal=principal, invoice_id=outcome.invoice.pk)
    return Status(201 if outcome.created else 200, invoice_out(invoice))


@router.get("/invoices/{invoice_id}", response=InvoiceOut, summary="One invoice with its lines")
def invoice_get(request: HttpRequest, invoice_id: int) -> dict[str, Any]:
    return invoice_out(selectors.invoice_get(principal=principal_of(request), invoice_id=invoice_id))


@router.post(
    "/invoices/{invoice_id}/finalize",
    response=InvoiceOut,
    summary="Recompute, number and freeze a draft invoice of a month that has ended",
)
def invoice_finalize(request: HttpRequest, invoice_id: int) -> dict[str, Any]:
    principal = principal_of(request)
    principal.require("billing:write")
    invoice = selectors.invoice_get(principal=principal, invoice_id=invoice_id)
    services.invoice_finalize(principal=principal, invoice=invoice)
    return invoice_out(selectors.invoice_get(principal=principal, invoice_id=invoice_id))


@router.post("/invoices/{invoice_id}/void", response=InvoiceOut, summary="Void a finalized invoice")
def invoice_void(request: HttpRequest, invoice_id: int) -> dict[str, Any]:
    principal = principal_of(request)
    principal.require("billing:write")
    invoice = selectors.invoice_get(principal=principal, invoice_id=invoice_id)
    services.invoice_void(principal=principal, invoice=invoice)
    return invoice_out(selectors.invoice_get(principal=principal, invoice_id=invoice_id))


@router.get(
    "/invoices/{invoice_id}/csv", summary="The invoice as CSV: one row per line and a total row", response={200: str}
)
def invoice_csv(request: HttpRequest, invoice_id: int) -> HttpResponse:
    invoice = selectors.invoice_get(principal=principal_of(request), invoice_id=invoice_id)
    response = HttpResponse(selectors.invoice_csv(invoice), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{_filename(invoice, "csv")}"'
    return response


@router.get("/invoices/{invoice_id}/pdf", summary="The invoice as a PDF document", response={200: bytes})
def invoice_pdf_download(request: HttpRequest, invoice_id: int) -> HttpResponse:
    invoice = selectors.invoice_get(principal=principal_of(request), invoice_id=invoice_id)
    response = HttpResponse(
        invoice_pdf(invoice=invoice, tenant=connection.tenant),  # type: ignore[attr-defined]
        content_type="application/pdf",
    )
    response["Content-Disposition"] = f'attachment; filename="{_filename(invoice, "pdf")}"'
    return response
