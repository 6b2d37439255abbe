"""Announcing a budget threshold crossed for the first time in a period: an audit event, an
email to the tenant's owners and admins, and a signed webhook when the tenant configured one.

Webhook signature (docs/billing-budgets.md, "Webhook"): ``X-Portal-Timestamp: <unix seconds>``
and ``X-Portal-Signature: sha256=<hex>``, the HMAC-SHA256 under the tenant's webhook secret of
``<timestamp>.<raw body>`` (the timestamp is signed so that a captured request cannot be
replayed later with a fresh one).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
from typing import Any

import structlog
from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django_tenants.utils import schema_context

from billing.models import Budget
from compliance.services import audit_event_create
from tenants.principal import Principal

logger = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Portal-Signature"
TIMESTAMP_HEADER = "X-Portal-Timestamp"


def webhook_signature(*, secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 under ``secret`` of ``<timestamp>.<body>`` (RFC 2104)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def budget_alert_payload(
    *, tenant: Any, budget: Budget, threshold: float, period_start: dt.datetime, spent: dict[str, Any]
) -> dict[str, Any]:
    """The JSON body of a threshold alert (webhook and audit payload)."""
    return {
        "event": "budget.threshold_crossed",
        "tenant": tenant.slug,
        "budget": {
            "id": budget.pk,
            "name": budget.name,
            "scope": budget.scope,
            "agent": budget.agent,
            "api_key": budget.api_key,
            "period": budget.period,
            "action": budget.action,
            "limit_tokens": budget.limit_tokens,
            "limit_cost": str(budget.limit_cost) if budget.limit_cost is not None else None,
        },
        "threshold": threshold,
        "period_start": period_start.isoformat(),
        "spent_tokens": spent["tokens"],
        "spent_cost": spent["cost"],
    }


def webhook_test_payload(*, tenant: Any, sent_at: dt.datetime) -> dict[str, Any]:
    """The JSON body of a test alert sent from the settings (``event: budget.test``), signed and
    sent like a real one so that the receiver's verification is what gets tested."""
    return {
        "event": "budget.test",
        "tenant": tenant.slug,
        "sent_at": sent_at.isoformat(),
        "message": "A test of the budget-alert webhook: no budget crossed a threshold.",
    }


def budget_alert_send(
    *, schema: str, tenant_id: int, budget_id: int, threshold: float, period_start: dt.datetime, spent: dict[str, Any]
) -> None:
    """Announce one crossed threshold (called after the settling transaction commits): audit
    event ``budget.threshold_crossed`` in the tenant's chain, email to owners and admins, and
    the webhook task when ``Tenant.alert_webhook_url`` is set. Never raises: an alert must not
    fail the turn that crossed it (failures are logged)."""
    from tenants.models import Membership, Tenant
    from tenants.roles import Role

    try:
        tenant = Tenant.objects.get(pk=tenant_id)
        with schema_context(schema):
            budget = Budget.objects.filter(pk=budget_id).first()
            if budget is None:
                return
            payload = budget_alert_payload(
                tenant=tenant, budget=budget, threshold=threshold, period_start=period_start, spent=spent
            )
            with transaction.atomic():
                audit_event_create(
                    actor=Principal.system("budgets", tenant=tenant),
                    action="budget.threshold_crossed",
                    target_type="budget",
                    target_id=budget.pk,
                    payload=payload,
                    schema=schema,
                )
        emails = list(
            Membership.objects.filter(tenant=tenant, role__in=[Role.OWNER, Role.ADMIN]).values_list(
                "user__email", flat=True
            )
        )
        limit = (f"{budget.limit_tokens} tokens" if budget.limit_tokens is not None else "") + (
            f"{' / ' if budget.limit_tokens is not None else ''}{budget.limit_cost} {tenant_currency(tenant)}"
            if budget.limit_cost is not None
            else ""
        )
        if emails:
            send_mail(
                subject=f"[{tenant.name}] Budget '{budget.name or budget}' reached {threshold:.0%}",
                message=(
                    f"The {budget.period} budget '{budget.name or budget}' ({budget.scope}"
                    f"{' ' + budget.agent if budget.agent else ''}{' ' + budget.api_key if budget.api_key else ''})"
                    f" reached {threshold:.0%} of its limit ({limit}) in the period starting "
                    f"{period_start:%Y-%m-%d}: {spent['tokens']} tokens, {spent['cost']} spent.\n"
                    f"Action when exceeded: {budget.action}."
                ),
                from_email=settings.DEFAULT_FROM_EMAIL,
                recipient_list=emails,
                fail_silently=True,
            )
        if tenant.alert_webhook_url:
            from billing.tasks import budget_alert_webhook_task

            with schema_context(schema):
                budget_alert_webhook_task.delay(tenant_id=tenant.pk, body=json.dumps(payload, sort_keys=True))
    except Exception:
        logger.exception("budget_alert_failed", budget_id=budget_id, threshold=threshold)


def tenant_currency(tenant: Any) -> str:
    plan = tenant.plan if tenant.plan_id else None
    return str(plan.currency) if plan is not None else "USD"


_client: Any = None


def webhook_post(*, tenant_id: int, body: str) -> int:
    """POST ``body`` to the tenant's alert webhook through the egress guard, signed (module
    docstring); returns the HTTP status. Raises ``httpx.HTTPError`` (including ``EgressDenied``)
    or ``WebhookFailed`` for a non-2xx answer, for the task to retry."""
    from config.crypto import secret_decrypt
    from config.egress import egress_client
    from tenants.models import Tenant

    global _client
    tenant = Tenant.objects.get(pk=tenant_id)
    if not tenant.alert_webhook_url:
        return 0
    if _client is None:
        _client = egress_client(timeout=10.0, max_response_bytes=64 * 1024, max_seconds=15.0)
    raw = body.encode()
    timestamp = str(int(time.time()))
    secret = secret_decrypt(tenant.alert_webhook_secret_encrypted)
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: webhook_signature(secret=secret, timestamp=timestamp, body=raw),
    }
    response = _client.post(tenant.alert_webhook_url, content=raw, headers=headers)
    if response.status_code >= 300:
        raise WebhookFailed(f"the webhook answered {response.status_code}")
    return int(response.status_code)


class WebhookFailed(Exception):
    """The webhook answered outside 2xx (retried)."""
