"""Celery tasks of billing. tenant-schemas-celery runs each in the sender's schema (beat sends
the schedule's tasks once per tenant)."""

from __future__ import annotations

import structlog
from celery import Task, shared_task

logger = structlog.get_logger(__name__)

# --- Budgets ----------------------------------------------------------------------------------

# Webhook retries: 6 tries over about 4 minutes (exponential backoff 2**n seconds, jittered).
WEBHOOK_MAX_RETRIES = 6
WEBHOOK_BACKOFF_MAX_SECONDS = 120


@shared_task(name="billing.budget_reservations_expire", ignore_result=True)
def budget_reservations_expire_task() -> int:
    """Beat entry point, sent once per tenant: release budget reservations past their
    ``expires_at`` (a worker died between reserving and settling a model call)."""
    from billing.services.budgets import budget_reservations_expire

    released = budget_reservations_expire()
    if released:
        logger.warning("budget_reservations_expired", released=released)
    return released


@shared_task(name="billing.budget_alert_webhook", bind=True, ignore_result=True, max_retries=WEBHOOK_MAX_RETRIES)
def budget_alert_webhook_task(self: Task, *, tenant_id: int, body: str) -> int:
    """POST a threshold alert (``body``: the JSON text, signed as sent) to the tenant's webhook
    (``billing.services.budgets.alerts.webhook_post``); retried with exponential backoff
    (1, 2, 4, ... seconds, capped at ``WEBHOOK_BACKOFF_MAX_SECONDS``) on any failure, including a
    URL the egress guard refuses (it may be allowed later); gives up after ``WEBHOOK_MAX_RETRIES``."""
    from billing.services.budgets import webhook_post

    try:
        return webhook_post(tenant_id=tenant_id, body=body)
    except Exception as exc:
        countdown = min(2**self.request.retries, WEBHOOK_BACKOFF_MAX_SECONDS)
        logger.warning(
            "budget_webhook_failed", attempt=self.request.retries + 1, error=repr(exc)[:300], retry_in=countdown
        )
        raise self.retry(exc=exc, countdown=countdown) from exc


# --- End of budgets ---------------------------------------------------------------------------

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
    from billing.periods import month_before
    from billing.services.invoices import invoice_draft
    from config.errors import DomainError
    from tenants.models import Tenant
    from tenants.principal import Principal

    # Read afresh: tenant-schemas-celery may hand over a cached tenant whose plan or status changed.
    tenant = Tenant.objects.select_related("plan").get(schema_name=connection.schema_name)  # type: ignore[attr-defined]
    if not tenant.is_active:
        return "skipped_inactive"
    period = month_before(timezone.now(), tenant.time_zone)
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
