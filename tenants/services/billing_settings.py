"""The tenant's billing settings: the time zone of budget periods and invoice months, and the
budget-alert webhook (URL and signing secret).

Rules: holders of ``billing:write`` (owners and admins) change them. The time zone is an IANA
name. The webhook URL passes the egress guard when it is saved (``config.egress``), so a refused
address is answered at once (422 ``egress_denied``) and not only when an alert is sent. The
secret is write-only: it is stored encrypted (``config.crypto``) and never returned, except a
secret the service generates, which the caller shows once. A webhook needs a secret (an unsigned
alert could be forged by anyone who learns the URL); clearing the URL clears the secret.
How alerts are signed and sent: docs/billing-budgets.md, "Webhook".
"""

from __future__ import annotations

import json
import secrets
import zoneinfo
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

import structlog
from django.db import transaction
from django.utils import timezone

from compliance.services import audit_event_create
from config.crypto import secret_encrypt
from config.egress import EgressDenied, egress_check_url
from config.errors import ValidationFailed
from tenants.models import Tenant
from tenants.principal import Principal

logger = structlog.get_logger(__name__)

URL_MAX_LENGTH = 500  # Tenant.alert_webhook_url's column
# A supplied secret must be at least as long as a 96-bit random value written in hex; the
# generated one carries 256 bits (``secrets.token_urlsafe(32)``).
SECRET_MIN_LENGTH = 24
SECRET_MAX_LENGTH = 256


@dataclass(frozen=True)
class BillingSettings:
    """What may be read back: the secret itself never is, only whether one is set."""

    time_zone: str
    alert_webhook_url: str
    alert_webhook_secret_set: bool


@dataclass(frozen=True)
class BillingSettingsUpdate:
    """The outcome of an update: the settings now, and the secret the service generated (to be
    shown once, then forgotten) or ``None``."""

    settings: BillingSettings
    generated_secret: str | None


@dataclass(frozen=True)
class WebhookTestOutcome:
    """The result of a test alert: ``delivered`` with the receiver's HTTP ``status``, or not
    with the reason in ``message``."""

    delivered: bool
    status: int | None
    message: str


def _invalid(field: str, message: str, *, code: str | None = None) -> ValidationFailed:
    return ValidationFailed(message, code=code, details=[{"field": field, "message": message}])


@lru_cache(maxsize=1)
def _time_zones() -> frozenset[str]:
    # The tz database, read once. ZoneInfo() alone would also load "localtime" (the host's own
    # zone, a symlink on Debian) or "Factory", which name no place.
    return frozenset(zoneinfo.available_timezones()) - {"localtime", "Factory", "posixrules"}


def time_zone_clean(value: str) -> str:
    """Return ``value`` stripped when it is an IANA time zone name (e.g. ``Europe/Berlin``,
    ``UTC``); raises ``ValidationFailed`` (422, field ``time_zone``) otherwise."""
    name = (value or "").strip()
    if name not in _time_zones():
        raise _invalid(
            "time_zone",
            f"'{name[:64]}' is not an IANA time zone name (e.g. 'Europe/Berlin', 'UTC').",
            code="invalid_time_zone",
        )
    return name


def webhook_url_clean(value: str) -> str:
    """Return the stripped URL ('' clears the webhook) after the egress guard allowed it.

    Raises ``ValidationFailed`` (field ``alert_webhook_url``) for an over-long URL, and
    ``EgressDenied`` (422 ``egress_denied``, the guard's reason) for a scheme other than
    http/https or a host/port the guard refuses (loopback, private, metadata, ... unless the
    staff allowlist opens it)."""
    url = (value or "").strip()
    if not url:
        return ""
    if len(url) > URL_MAX_LENGTH:
        raise _invalid("alert_webhook_url", f"The webhook URL is longer than {URL_MAX_LENGTH} characters.")
    try:
        egress_check_url(url)
    except EgressDenied as exc:
        raise EgressDenied(
            f"The webhook URL is refused: {exc.message}",
            details=[{"field": "alert_webhook_url", "message": exc.message}],
        ) from None
    return url


def _webhook_origin(url: str) -> str:
    # Webhook URLs often carry a token in their path (Slack, Teams): the audit trail keeps the origin.
    if not url:
        return ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def tenant_billing_settings_get(*, principal: Principal, tenant: Tenant) -> BillingSettings:
    """The tenant's billing settings (``billing:read``), without the secret."""
    principal.require("billing:read")
    return BillingSettings(
        time_zone=tenant.time_zone,
        alert_webhook_url=tenant.alert_webhook_url,
        alert_webhook_secret_set=bool(tenant.alert_webhook_secret_encrypted),
    )


@transaction.atomic
def tenant_billing_settings_update(
    *,
    principal: Principal,
    tenant: Tenant,
    time_zone: str | None = None,
    alert_webhook_url: str | None = None,
    alert_webhook_secret: str = "",
    generate_secret: bool = False,
) -> BillingSettingsUpdate:
    """Change the tenant's billing settings (``billing:write``); ``None`` keeps a field as is.

    - ``time_zone``: an IANA name; applies to budget periods and invoice months from the next
      period computed (a period already open keeps the bounds it was opened with).
    - ``alert_webhook_url``: http(s), checked by the egress guard; '' removes the webhook and its
      secret.
    - ``alert_webhook_secret``: '' keeps the current one; otherwise 24-256 characters, stored
      encrypted. ``generate_secret`` mints a random one instead (returned once in
      ``generated_secret``). A URL without any secret is refused.

    Saving the current values changes nothing and writes no audit event (a repeated PUT is a
    no-op). Otherwise one audit event ``tenant.billing_settings_changed`` in the tenant's chain
    names the changed fields; the secret appears only as ``alert_webhook_signing: set|generated|cleared`` (a key named
    ``*secret*`` would be redacted whole by ``compliance.redaction``).

    Raises ``Forbidden`` (403), ``ValidationFailed`` (422: ``invalid_time_zone``,
    ``validation_failed`` with ``details[0].field``) or ``EgressDenied`` (422 ``egress_denied``).
    """
    principal.require("billing:write")
    if alert_webhook_secret and generate_secret:
        raise _invalid("alert_webhook_secret", "Give a secret or ask for one to be generated, not both.")
    new_zone = time_zone_clean(time_zone) if time_zone is not None else None
    new_url = webhook_url_clean(alert_webhook_url) if alert_webhook_url is not None else None
    secret = (alert_webhook_secret or "").strip()
    if secret and not SECRET_MIN_LENGTH <= len(secret) <= SECRET_MAX_LENGTH:
        raise _invalid(
            "alert_webhook_secret",
            f"The webhook secret must be {SECRET_MIN_LENGTH} to {SECRET_MAX_LENGTH} characters long.",
        )

    # Lock the row: two admins saving at once must not leave one's URL with the other's secret.
    row = Tenant.objects.select_for_update().get(pk=tenant.pk)
    changed: dict[str, object] = {}
    if new_zone is not None and new_zone != row.time_zone:
        row.time_zone = new_zone
        changed["time_zone"] = new_zone
    if new_url is not None and new_url != row.alert_webhook_url:
        row.alert_webhook_url = new_url
        changed["alert_webhook_url"] = _webhook_origin(new_url)
    generated: str | None = None
    if not row.alert_webhook_url:
        if secret or generate_secret:
            raise _invalid("alert_webhook_secret", "Set a webhook URL before its secret.")
        if row.alert_webhook_secret_encrypted:
            row.alert_webhook_secret_encrypted = ""
            changed["alert_webhook_signing"] = "cleared"
    else:
        if generate_secret:
            generated = secret = secrets.token_urlsafe(32)
        if secret:
            row.alert_webhook_secret_encrypted = secret_encrypt(secret)
            changed["alert_webhook_signing"] = "generated" if generated else "set"
        elif not row.alert_webhook_secret_encrypted:
            raise _invalid(
                "alert_webhook_secret", "A webhook needs a signing secret: give one or ask for one to be generated."
            )
    if changed:
        fields = ["time_zone", "alert_webhook_url", "alert_webhook_secret_encrypted"]
        row.save(update_fields=fields)
        audit_event_create(
            actor=principal,
            action="tenant.billing_settings_changed",
            target_type="tenant",
            target_id=row.pk,
            payload={"changed": changed},
            schema=row.schema_name,
        )
        logger.info("tenant_billing_settings_changed", tenant=row.slug, fields=sorted(changed))
        # The caller's object (e.g. request.tenant) shows the new values too.
        for name in fields:
            setattr(tenant, name, getattr(row, name))
    return BillingSettingsUpdate(
        settings=BillingSettings(
            time_zone=row.time_zone,
            alert_webhook_url=row.alert_webhook_url,
            alert_webhook_secret_set=bool(row.alert_webhook_secret_encrypted),
        ),
        generated_secret=generated,
    )


def tenant_alert_webhook_test(*, principal: Principal, tenant: Tenant) -> WebhookTestOutcome:
    """Send a signed test alert (``event: budget.test``) to the saved webhook now, through the
    same function the alert task uses (``billing.services.budgets.alerts.webhook_post``), and
    report what happened (``billing:write``). Not retried: the person clicking sees the answer.
    Audited as ``tenant.alert_webhook_tested`` with the outcome. Raises ``Forbidden``, or
    ``ValidationFailed`` when no webhook is saved."""
    from billing.services.budgets.alerts import webhook_post, webhook_test_payload

    principal.require("billing:write")
    if not tenant.alert_webhook_url:
        raise _invalid("alert_webhook_url", "No webhook URL is saved: save one before sending a test alert.")
    body = json.dumps(webhook_test_payload(tenant=tenant, sent_at=timezone.now()), sort_keys=True)
    try:
        status = webhook_post(tenant_id=tenant.pk, body=body)
    except EgressDenied as exc:
        outcome = WebhookTestOutcome(
            delivered=False, status=None, message=f"Refused by the egress guard: {exc.message}"
        )
    except Exception as exc:
        # Any failure (network, TLS, timeout, non-2xx, unreadable secret) is reported, not raised.
        from billing.services.budgets.alerts import WebhookFailed

        reason = str(exc) if isinstance(exc, WebhookFailed) else f"{type(exc).__name__}: {str(exc)[:200]}"
        outcome = WebhookTestOutcome(delivered=False, status=None, message=f"Not delivered: {reason}.")
    else:
        outcome = WebhookTestOutcome(
            delivered=True, status=status, message=f"Test alert delivered: the webhook answered {status}."
        )
    with transaction.atomic():
        audit_event_create(
            actor=principal,
            action="tenant.alert_webhook_tested",
            target_type="tenant",
            target_id=tenant.pk,
            schema=tenant.schema_name,
            payload={
                "url": _webhook_origin(tenant.alert_webhook_url),
                "delivered": outcome.delivered,
                "status": outcome.status,
            },
        )
    return outcome
