"""Celery tasks of billing. tenant-schemas-celery runs each in the sender's schema (beat sends
the schedule's tasks once per tenant)."""

from __future__ import annotations

import structlog
from celery import shared_task

logger = structlog.get_logger(__name__)

# --- Invoices ---------------------------------------------------------------------------------


@shared_task(name="billing.invoice_draft_last_month", ignore_result=True)
def invoice_draft_last_month_task() -> str:
    """Beat entry point, sent once per tenant on the 1st of the month (``config.celery``): draft
    last month's invoice (in the tenant's timezone) from its usage events. Returns what happened:
    ``drafted``, ``redrafted``, ``skipped_finalized`` (the period is finalized already),
    ``skipped_inactive`` (a suspended tenant) or ``failed:<code>`` (e.g. ``currency_mismatch``,
    which needs a person and is logged)."""
    from django.db import connection
    from django.utils import timezone

    from billing.models import Invoice
    from billing.services.invoices import invoice_draft, period_previous
    from config.errors import DomainError
    from tenants.models import Tenant
    from tenants.principal import Principal

    # Read afresh: tenant-schemas-celery may hand over a cached tenant whose plan or status changed.
    tenant = Tenant.objects.select_related("plan").get(schema_name=connection.schema_name)  # type: ignore[attr-defined]
    if not tenant.is_active:
        return "skipped_inactive"
    period = period_previous(timezone.now(), tenant.time_zone)
    if Invoice.objects.filter(period=period, status=Invoice.Status.FINALIZED).exists():
        return "skipped_finalized"
    try:
        outcome = invoice_draft(principal=Principal.system("invoice-beat", tenant=tenant), period=period)
    except DomainError as exc:
        logger.warning("invoice_draft_failed", tenant=tenant.slug, period=period, code=exc.code, message=exc.message)
        return f"failed:{exc.code}"
    logger.info(
        "invoice_drafted",
        tenant=tenant.slug,
        period=period,
        invoice_id=outcome.invoice.pk,
        total=str(outcome.invoice.total),
        created=outcome.created,
    )
    return "drafted" if outcome.created else "redrafted"
