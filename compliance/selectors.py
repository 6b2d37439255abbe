"""Reading the audit trail."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from django.db.models import QuerySet
from django_tenants.utils import get_tenant_model, schema_context

from compliance.chain import ChainReport, verify_events
from compliance.models import AuditEvent
from tenants.principal import Principal


def audit_event_list(
    *,
    principal: Principal,
    actor: str | None = None,
    action: str | None = None,
    target_type: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> QuerySet[AuditEvent]:
    """Events of the principal's tenant, newest first, filtered.

    ``actor`` matches the actor label (e-mail or key prefix) case-insensitively as a substring;
    ``action`` matches exactly or, ending in ``.``, as a prefix (``member.`` = every member
    action); ``since``/``until`` bound ``created_at`` (inclusive/exclusive).
    Raises ``Forbidden`` without ``audit:read``.
    """
    principal.require("audit:read")
    events = AuditEvent.objects.all()
    if actor:
        events = events.filter(actor_label__icontains=actor)
    if action:
        events = events.filter(action__startswith=action) if action.endswith(".") else events.filter(action=action)
    if target_type:
        events = events.filter(target_type=target_type)
    if since:
        events = events.filter(created_at__gte=since)
    if until:
        events = events.filter(created_at__lt=until)
    return events.order_by("-seq")


def audit_chain_verify(*, schema: str) -> ChainReport:
    """Verify the whole chain of ``schema``, streaming events in ``seq`` order."""
    with schema_context(schema):
        events: Iterator[AuditEvent] = AuditEvent.objects.order_by("seq").iterator(chunk_size=2000)
        return verify_events(schema, events)


def audited_schemas() -> list[str]:
    """Every schema that holds an audit chain: public first, then each tenant's."""
    tenants = get_tenant_model().objects.exclude(schema_name="public").order_by("schema_name")
    return ["public", *tenants.values_list("schema_name", flat=True)]
