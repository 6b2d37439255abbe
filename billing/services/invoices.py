"""Invoices: drafting a month's invoice from the usage events, finalizing it, voiding it.

An invoice covers one calendar month (``period`` ``YYYY-MM``) in the tenant's timezone
(``Tenant.time_zone``): the usage events with ``period_start <= created_at < period_end``, both
bounds aware datetimes at local midnight on the 1st.

Lines: one per (kind, model, endpoint = ``metadata->>'endpoint'``, agent_id, unit_price, unit)
of the period's usage events, aggregated in SQL (``GROUP BY``; events are never loaded into
Python, so memory does not grow with their number), plus one ``plan.fee`` line for the plan's
monthly fee (when the tenant has a plan).

The one rounding rule:

- a usage line's ``amount`` is the exact ``SUM(cost)`` of its events (12 decimal places, summed
  by PostgreSQL's ``numeric`` without loss) rounded once to cents, half up
  (``decimal.ROUND_HALF_UP``: 0.005 -> 0.01);
- ``usage_total`` is the sum of the usage lines' rounded amounts;
- ``total = usage_total + plan_fee`` (the fee is already in cents).

So the lines always sum to the total, and the total can differ from the rounded sum of all
costs by at most half a cent per line. Amounts are in the invoice's currency: the plan's
(USD without a plan); usage events in another currency refuse the draft (422
``currency_mismatch``) rather than mix currencies.

Life cycle: ``draft`` (recomputed by every ``invoice_draft``) -> ``finalized`` (``invoice_finalize``:
recomputed once more, numbered, frozen by a database trigger, billing migration 0004) ->
``void`` (``invoice_void``; the period may then be drafted again as a new invoice).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import NamedTuple

from django.db import connection, transaction
from django.utils import timezone

from billing.models import Invoice, InvoiceLine, UsageEvent
from billing.periods import month_bounds
from compliance.services import audit_event_create
from config.errors import Conflict, ValidationFailed
from tenants.models import Tenant
from tenants.principal import Principal

PLAN_FEE_KIND = "plan.fee"
DEFAULT_CURRENCY = "USD"
CENTS = Decimal("0.01")

# Grouped in PostgreSQL: the result has one row per line, however many events the month holds.
# ``currency`` is grouped too, only to detect events in another currency than the invoice's.
_USAGE_SQL = f"""
SELECT kind, model, COALESCE(metadata->>'endpoint', '') AS endpoint, agent_id, unit_price, unit, currency,
       SUM(quantity) AS quantity, SUM(cost) AS cost, COUNT(*) AS events
FROM {UsageEvent._meta.db_table}
WHERE created_at >= %s AND created_at < %s
GROUP BY kind, model, endpoint, agent_id, unit_price, unit, currency
ORDER BY kind, model, endpoint, agent_id NULLS FIRST, unit_price, unit, currency
"""  # noqa: S608 (the model's table name, no input)


def round_cents(value: Decimal) -> Decimal:
    """``value`` rounded to cents, half up (the invoices' one rounding rule)."""
    return value.quantize(CENTS, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class LineComputation:
    """One computed invoice line; ``cost`` is the exact sum (12 dp), ``amount`` its rounding."""

    kind: str
    model: str
    endpoint: str
    agent_id: int | None
    unit_price: Decimal
    unit: str
    quantity: int
    cost: Decimal
    amount: Decimal

    @property
    def key(self) -> tuple[str, str, str, int | None, Decimal, str]:
        """What identifies the line: (kind, model, endpoint, agent_id, unit_price, unit)."""
        return (self.kind, self.model, self.endpoint, self.agent_id, self.unit_price, self.unit)


@dataclass(frozen=True)
class InvoiceComputation:
    """An invoice recomputed from the usage events (nothing saved)."""

    period: str
    period_start: dt.datetime
    period_end: dt.datetime
    currency: str
    plan_code: str
    plan_fee: Decimal
    lines: list[LineComputation]
    events_count: int

    @property
    def usage_total(self) -> Decimal:
        return sum((line.amount for line in self.lines), Decimal("0.00"))

    @property
    def total(self) -> Decimal:
        return self.usage_total + self.plan_fee


def invoice_compute(
    *,
    tenant: Tenant,
    period: str,
    currency: str | None = None,
    plan_fee: Decimal | None = None,
    plan_code: str | None = None,
) -> InvoiceComputation:
    """The invoice of ``period`` recomputed from the usage events of the current schema (which
    must be ``tenant``'s), in one aggregate query. ``currency``, ``plan_fee`` and ``plan_code``
    default to the tenant's plan today (USD, 0 and "" without a plan); ``invoice_verify`` passes
    a finalized invoice's snapshot instead. Raises ``ValidationFailed``: ``invalid_period``, or
    ``currency_mismatch`` when the period holds events in another currency."""
    _require_schema(tenant)
    start, end = month_bounds(period, tenant.time_zone)
    plan = tenant.plan
    currency = currency or (plan.currency if plan else DEFAULT_CURRENCY)
    plan_fee = round_cents(plan_fee if plan_fee is not None else (plan.monthly_fee if plan else Decimal(0)))
    plan_code = plan_code if plan_code is not None else (plan.code if plan else "")
    lines: list[LineComputation] = []
    foreign: set[str] = set()
    events = 0
    with connection.cursor() as cursor:
        cursor.execute(_USAGE_SQL, [start, end])
        for kind, model, endpoint, agent_id, unit_price, unit, row_currency, quantity, cost, count in cursor:
            events += count
            if row_currency != currency:
                foreign.add(row_currency)
                continue
            lines.append(
                LineComputation(
                    kind=kind,
                    model=model,
                    endpoint=endpoint[:100],
                    agent_id=agent_id,
                    unit_price=unit_price,
                    unit=unit,
                    quantity=int(quantity),
                    cost=cost,
                    amount=round_cents(cost),
                )
            )
    if foreign:
        raise ValidationFailed(
            f"Usage events of {period} are in {', '.join(sorted(foreign))}, not in the invoice's currency "
            f"{currency}: an invoice has one currency.",
            code="currency_mismatch",
            details={"currency": currency, "event_currencies": sorted(foreign)},
        )
    return InvoiceComputation(
        period=period,
        period_start=start,
        period_end=end,
        currency=currency,
        plan_code=plan_code,
        plan_fee=plan_fee,
        lines=lines,
        events_count=events,
    )


class DraftOutcome(NamedTuple):
    invoice: Invoice
    created: bool


@transaction.atomic
def invoice_draft(*, principal: Principal, period: str) -> DraftOutcome:
    """Create or recompute the draft invoice of ``period`` (``YYYY-MM``, the tenant's timezone)
    from the usage events; returns it and whether it was created. Idempotent: drafting again
    replaces the lines with the same computation over the events present now.

    Raises ``Forbidden`` without ``billing:write``; ``ValidationFailed`` for a malformed period
    (``invalid_period``), a month that has not begun (``period_in_future``) or events in another
    currency (``currency_mismatch``); ``Conflict`` (``invoice_finalized``) when the period's
    invoice is finalized. A voided invoice is left as it is: drafting its period makes a new one.
    """
    principal.require("billing:write")
    tenant = _tenant_of(principal)
    start, _ = month_bounds(period, tenant.time_zone)
    if start > timezone.now():
        raise ValidationFailed(
            f"{period} has not begun: there is nothing to invoice yet.",
            code="period_in_future",
            details={"field": "period"},
        )
    _lock("invoice-period", period)
    invoice = Invoice.objects.select_for_update().exclude(status=Invoice.Status.VOID).filter(period=period).first()
    created = invoice is None
    if invoice is not None and invoice.status != Invoice.Status.DRAFT:
        raise _finalized(invoice)
    invoice = _draft_write(invoice or Invoice(period=period), invoice_compute(tenant=tenant, period=period))
    audit_event_create(
        actor=principal,
        action="invoice.drafted",
        target_type="invoice",
        target_id=invoice.pk,
        payload={
            "period": period,
            "total": str(invoice.total),
            "currency": invoice.currency,
            "events": invoice.events_count,
            "created": created,
        },
    )
    return DraftOutcome(invoice, created)


@transaction.atomic
def invoice_finalize(*, principal: Principal, invoice: Invoice) -> Invoice:
    """Recompute the draft ``invoice`` one last time, give it the tenant's next number (1, 2, 3,
    ... per tenant schema) and freeze it (``finalized_at``; the trigger refuses later changes).

    Numbers are taken under a transaction-level advisory lock of the schema (``pg_advisory_xact_lock``),
    held until commit: concurrent finalizes take turns, so numbers have no gaps or duplicates
    (the unique constraint on ``number`` is the backstop). Raises ``Forbidden`` without
    ``billing:write``; ``Conflict`` ``invoice_finalized`` when it is not a draft, ``period_open``
    while its month has not ended (events could still arrive); the errors of ``invoice_compute``.
    """
    principal.require("billing:write")
    tenant = _tenant_of(principal)
    _lock("invoice-period", invoice.period)
    invoice = Invoice.objects.select_for_update().get(pk=invoice.pk)
    if invoice.status != Invoice.Status.DRAFT:
        raise _finalized(invoice)
    now = timezone.now()
    if now < invoice.period_end:
        raise Conflict(
            f"{invoice.period} has not ended yet ({invoice.period_end.isoformat()}): usage events could "
            "still arrive. Finalize it after the month ends.",
            code="period_open",
            details={"period_end": invoice.period_end.isoformat()},
        )
    invoice = _draft_write(invoice, invoice_compute(tenant=tenant, period=invoice.period))
    _lock("invoice-number")
    last = Invoice.objects.filter(number__isnull=False).order_by("-number").values_list("number", flat=True).first()
    invoice.number = (last or 0) + 1
    invoice.status = Invoice.Status.FINALIZED
    invoice.finalized_at = now
    invoice.save(update_fields=["number", "status", "finalized_at"])
    audit_event_create(
        actor=principal,
        action="invoice.finalized",
        target_type="invoice",
        target_id=invoice.pk,
        payload={
            "period": invoice.period,
            "number": invoice.number,
            "total": str(invoice.total),
            "currency": invoice.currency,
        },
    )
    return invoice


@transaction.atomic
def invoice_void(*, principal: Principal, invoice: Invoice) -> Invoice:
    """Cancel the finalized ``invoice`` (status ``void``, ``voided_at``); its number stays taken
    and its period may be drafted again. Raises ``Forbidden`` without ``billing:write``;
    ``Conflict`` ``invoice_not_finalized`` for a draft or an invoice already void."""
    principal.require("billing:write")
    _tenant_of(principal)
    invoice = Invoice.objects.select_for_update().get(pk=invoice.pk)
    if invoice.status != Invoice.Status.FINALIZED:
        raise Conflict(
            f"Only a finalized invoice can be voided; this one is {invoice.status}.", code="invoice_not_finalized"
        )
    invoice.status = Invoice.Status.VOID
    invoice.voided_at = timezone.now()
    invoice.save(update_fields=["status", "voided_at"])
    audit_event_create(
        actor=principal,
        action="invoice.voided",
        target_type="invoice",
        target_id=invoice.pk,
        payload={"period": invoice.period, "number": invoice.number},
    )
    return invoice


# --- Internals --------------------------------------------------------------------------------


def _tenant_of(principal: Principal) -> Tenant:
    if principal.tenant is None:
        raise ValidationFailed("Invoices belong to a tenant: act in a tenant.", code="no_tenant")
    _require_schema(principal.tenant)
    return principal.tenant


def _require_schema(tenant: Tenant) -> None:
    # Queries go to the connection's schema: writing one tenant's invoice into another's is refused.
    schema = connection.schema_name  # type: ignore[attr-defined]  # django-tenants' backend
    if schema != tenant.schema_name:
        raise RuntimeError(f"invoices of {tenant.slug} must be computed in schema {tenant.schema_name}, not {schema}")


def _lock(*names: str) -> None:
    """A transaction-level advisory lock on (schema, *names), released at commit or rollback."""
    text = ":".join(["invoices", connection.schema_name, *names])  # type: ignore[attr-defined]
    key = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [key])


def _finalized(invoice: Invoice) -> Conflict:
    return Conflict(
        f"The invoice of {invoice.period} is {invoice.status} (number {invoice.number}): it can no longer change.",
        code="invoice_finalized",
        details={"invoice_id": invoice.pk, "status": invoice.status, "number": invoice.number},
    )


def _description(line: LineComputation, agent_slug: str) -> str:
    label = UsageEvent.Kind(line.kind).label if line.kind in UsageEvent.Kind.values else line.kind
    parts = [label]
    if line.model:
        parts.append(line.model + (f" via {line.endpoint}" if line.endpoint else ""))
    elif line.endpoint:
        parts.append(f"via {line.endpoint}")
    if line.agent_id is not None:
        parts.append(f"agent {agent_slug or f'#{line.agent_id}'}")
    return ", ".join(parts)[:300]


def _draft_write(invoice: Invoice, computation: InvoiceComputation) -> Invoice:
    """Save ``computation`` into the draft ``invoice`` and replace its lines."""
    from agents.models import Agent

    invoice.period_start, invoice.period_end = computation.period_start, computation.period_end
    invoice.currency, invoice.plan_code = computation.currency, computation.plan_code
    invoice.plan_fee = computation.plan_fee
    invoice.usage_total, invoice.total = computation.usage_total, computation.total
    invoice.events_count = computation.events_count
    invoice.drafted_at = timezone.now()
    invoice.save()
    InvoiceLine.objects.filter(invoice=invoice).delete()
    agent_ids = {line.agent_id for line in computation.lines if line.agent_id is not None}
    slugs = dict(Agent.objects.filter(pk__in=agent_ids).values_list("id", "slug")) if agent_ids else {}
    rows = [
        InvoiceLine(
            invoice=invoice,
            position=position,
            kind=line.kind,
            model=line.model,
            endpoint=line.endpoint,
            agent_id=line.agent_id,
            agent_slug=slugs.get(line.agent_id, "") if line.agent_id else "",
            quantity=line.quantity,
            unit=line.unit,
            unit_price=line.unit_price,
            amount=line.amount,
            description=_description(line, slugs.get(line.agent_id, "") if line.agent_id else ""),
        )
        for position, line in enumerate(computation.lines)
    ]
    if computation.plan_code:
        rows.append(
            InvoiceLine(
                invoice=invoice,
                position=len(rows),
                kind=PLAN_FEE_KIND,
                quantity=1,
                unit="month",
                unit_price=computation.plan_fee,
                amount=computation.plan_fee,
                description=f"Plan {computation.plan_code}: monthly fee",
            )
        )
    InvoiceLine.objects.bulk_create(rows)
    return invoice
