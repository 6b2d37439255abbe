"""REST endpoints for usage events."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema

from billing import selectors
from billing.models import UsageEvent
from billing.schemas import UsageEventPage
from config.api import IsoDateTime, keyset_page, principal_of

router = Router(tags=["usage"])


class UsageFilters(Schema):
    kind: UsageEvent.Kind | None = Field(None, description="One kind of usage event")
    agent: int | None = Field(None, description="Agent id")
    from_: IsoDateTime | None = Field(None, alias="from", description="Inclusive lower bound of created_at")
    to: IsoDateTime | None = Field(None, description="Exclusive upper bound of created_at")
    limit: int = 50
    cursor: str | None = None


@router.get("/usage/events", response=UsageEventPage, summary="Usage events, newest first")
def usage_event_list(request: HttpRequest, filters: Query[UsageFilters]) -> dict[str, Any]:
    events = selectors.usage_event_list(
        principal=principal_of(request), kind=filters.kind, agent_id=filters.agent,
        since=filters.from_, until=filters.to,
    )
    rows, cursor = keyset_page(events, cursor=filters.cursor, limit=filters.limit)
    return {"items": rows, "next_cursor": cursor}
