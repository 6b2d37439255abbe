"""Reading usage."""

from __future__ import annotations

import datetime as dt

from django.db.models import QuerySet

from billing.models import UsageEvent
from tenants.principal import Principal


def usage_event_list(
    *,
    principal: Principal,
    kind: str | None = None,
    agent_id: int | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> QuerySet[UsageEvent]:
    """Usage events of the principal's tenant, newest first; ``since`` inclusive, ``until``
    exclusive. Raises ``Forbidden`` without ``usage:read``."""
    principal.require("usage:read")
    events = UsageEvent.objects.all()
    if kind:
        events = events.filter(kind=kind)
    if agent_id is not None:
        events = events.filter(agent_id=agent_id)
    if since:
        events = events.filter(created_at__gte=since)
    if until:
        events = events.filter(created_at__lt=until)
    return events.order_by("-id")
