"""Reading invoices: the tenant's list, one invoice with its lines, its CSV, and the staff views
across tenants (every tenant's invoices, month-to-date spend per tenant)."""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass
from decimal import Decimal

from django.db import connection
from django.db.models import Prefetch, QuerySet
from django.utils import timezone
from django_tenants.utils import schema_context

from billing.models import Invoice, InvoiceLine, UsageEvent
from billing.periods import month_bounds, month_of
from config.errors import NotFound
from tenants.models import Tenant
from tenants.principal import Principal


def invoice_list(*, principal: Principal, status: str | None = None) -> QuerySet[Invoice]:
    """The invoices of the principal's tenant (the current schema), newest first, without lines.
    Raises ``Forbidden`` without ``billing:read``."""
    principal.require("billing:read")
    invoices = Invoice.objects.all()
    if status:
        invoices = invoices.filter(status=status)
    return invoices.order_by("-id")


def invoice_get(*, principal: Principal, invoice_id: int) -> Invoice:
    """One invoice of the principal's tenant with its lines prefetched (``invoice.lines.all()``
    in position order). Raises ``Forbidden`` without ``billing:read``, ``NotFound`` for an id
    not in this tenant's schema (another tenant's ids look the same)."""
    principal.require("billing:read")
    lines = Prefetch("lines", queryset=InvoiceLine.objects.order_by("position", "id"))
    invoice = Invoice.objects.prefetch_related(lines).filter(pk=invoice_id).first()
    if invoice is None:
        raise NotFound("No such invoice.", code="invoice_not_found")
    return invoice


CSV_HEADER = [
    "position",
    "kind",
    "description",
    "model",
    "endpoint",
    "agent",
    "quantity",
    "unit",
    "unit_price",
    "amount",
    "currency",
]


def invoice_csv(invoice: Invoice) -> str:
    """The invoice as CSV text: ``CSV_HEADER``, one row per line (``invoice.lines``, plan fee
    included), then a ``total`` row whose ``amount`` is ``invoice.total``. Decimals are written
    as plain decimal strings (amounts with two places, unit prices with twelve)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for line in invoice.lines.all():
        writer.writerow(
            [
                line.position + 1,
                line.kind,
                _csv_safe(line.description),
                _csv_safe(line.model),
                _csv_safe(line.endpoint),
                _csv_safe(line.agent_slug or (line.agent_id or "")),
                line.quantity,
                line.unit,
                f"{line.unit_price:f}",
                f"{line.amount:f}",
                invoice.currency,
            ]
        )
    writer.writerow(
        [
            "",
            "total",
            f"Invoice {invoice.number or 'DRAFT'} {invoice.period}",
            "",
            "",
            "",
            "",
            "",
            "",
            f"{invoice.total:f}",
            invoice.currency,
        ]
    )
    return out.getvalue()


def _csv_safe(value: object) -> str:
    # A cell starting with = + - @ is a formula to spreadsheets (CSV injection): quote it as text.
    text = str(value)
    return f"'{text}" if text[:1] in {"=", "+", "-", "@"} else text


# --- Staff (public host) ----------------------------------------------------------------------


@dataclass(frozen=True)
class StaffInvoiceRow:
    tenant: Tenant
    invoice_id: int
    number: int | None
    period: str
    status: str
    currency: str
    total: Decimal
    finalized_at: dt.datetime | None


@dataclass(frozen=True)
class TenantSpend:
    tenant: Tenant
    period: str
    events: int
    costs: list[tuple[str, Decimal]]  # (currency, exact sum of costs), one per currency seen


def _require_staff(principal: Principal) -> None:
    if principal.kind not in {"staff", "system"}:
        from config.errors import Forbidden

        raise Forbidden("The staff pages are for platform staff.", code="staff_only")


def staff_invoice_list(*, principal: Principal) -> list[StaffInvoiceRow]:
    """Every tenant's invoices (one query per tenant schema), newest period first, tenant by
    tenant in slug order. Raises ``Forbidden`` unless the principal is staff."""
    _require_staff(principal)
    rows: list[StaffInvoiceRow] = []
    for tenant in Tenant.objects.exclude(schema_name="public").order_by("slug"):
        with schema_context(tenant.schema_name):
            invoices = Invoice.objects.order_by("-period", "-id").values(
                "id", "number", "period", "status", "currency", "total", "finalized_at"
            )
            rows.extend(
                StaffInvoiceRow(
                    tenant=tenant,
                    invoice_id=i["id"],
                    number=i["number"],
                    period=i["period"],
                    status=i["status"],
                    currency=i["currency"],
                    total=i["total"],
                    finalized_at=i["finalized_at"],
                )
                for i in invoices
            )
    return rows


def staff_spend_month_to_date(*, principal: Principal, now: dt.datetime | None = None) -> list[TenantSpend]:
    """Month-to-date spend per tenant: the exact sum of usage-event costs since the 1st of the
    current month in each tenant's timezone (one aggregate query per tenant schema; costs in
    different currencies are summed apart, ``costs`` has one pair per currency). Raises ``Forbidden``
    unless the principal is staff."""
    _require_staff(principal)
    now = now or timezone.now()
    spend: list[TenantSpend] = []
    for tenant in Tenant.objects.exclude(schema_name="public").order_by("slug"):
        period = month_of(now, tenant.time_zone)
        start, _ = month_bounds(period, tenant.time_zone)
        with schema_context(tenant.schema_name), connection.cursor() as cursor:
            cursor.execute(
                f"SELECT currency, COUNT(*), COALESCE(SUM(cost), 0) FROM {UsageEvent._meta.db_table} "  # noqa: S608 (a model's table name)
                "WHERE created_at >= %s AND created_at < %s GROUP BY currency ORDER BY currency",
                [start, now],
            )
            by_currency = cursor.fetchall()
        spend.append(
            TenantSpend(
                tenant=tenant,
                period=period,
                events=sum(r[1] for r in by_currency),
                costs=[(r[0], r[2]) for r in by_currency],
            )
        )
    return spend


# --- Verification -----------------------------------------------------------------------------


@dataclass(frozen=True)
class InvoiceMismatch:
    """One difference between a stored invoice and its recomputation from the usage events."""

    number: int | None
    period: str
    line: str
    stored: str
    recomputed: str


def _line_label(key: tuple[object, ...]) -> str:
    kind, model, endpoint, agent_id, unit_price, unit = key
    return (
        f"{kind} model={model or '-'} endpoint={endpoint or '-'} agent={agent_id if agent_id is not None else '-'} "
        f"unit_price={unit_price:f}/{unit}"
    )  # type: ignore[str-format]


def invoice_mismatches(*, tenant: Tenant, invoice: Invoice) -> list[InvoiceMismatch]:
    """Recompute ``invoice`` (of ``tenant``, in the current schema) from the usage events with its
    own snapshot of currency and plan fee, and list every difference: per usage line (quantity,
    amount; a line only one side has), then usage total and total. Empty when they match."""
    from billing.services.invoices import PLAN_FEE_KIND, invoice_compute
    from config.errors import DomainError

    def mismatch(line: str, stored: object, recomputed: object) -> InvoiceMismatch:
        return InvoiceMismatch(
            number=invoice.number, period=invoice.period, line=line, stored=str(stored), recomputed=str(recomputed)
        )

    try:
        computed = invoice_compute(
            tenant=tenant,
            period=invoice.period,
            currency=invoice.currency,
            plan_fee=invoice.plan_fee,
            plan_code=invoice.plan_code,
        )
    except DomainError as exc:
        return [mismatch("(whole invoice)", f"total {invoice.total:f}", f"cannot recompute: {exc.message}")]
    stored = {
        (line.kind, line.model, line.endpoint, line.agent_id, line.unit_price, line.unit): line
        for line in invoice.lines.all()
        if line.kind != PLAN_FEE_KIND
    }
    fresh = {line.key: line for line in computed.lines}
    found: list[InvoiceMismatch] = []
    for key in sorted(stored.keys() | fresh.keys(), key=str):
        old, new = stored.get(key), fresh.get(key)
        old_text = f"quantity {old.quantity} amount {old.amount:f}" if old else "(no line)"
        new_text = f"quantity {new.quantity} amount {new.amount:f}" if new else "(no line)"
        if old_text != new_text:
            found.append(mismatch(_line_label(key), old_text, new_text))
    if invoice.usage_total != computed.usage_total:
        found.append(mismatch("usage_total", f"{invoice.usage_total:f}", f"{computed.usage_total:f}"))
    if invoice.total != computed.total:
        found.append(mismatch("total", f"{invoice.total:f}", f"{computed.total:f}"))
    return found
