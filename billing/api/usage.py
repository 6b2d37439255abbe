"""REST endpoints for usage: the events, and summaries of tokens and cost by group."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema

from billing import selectors
from billing.models import UsageEvent
from billing.schemas import UsageEventPage, UsageSummaryOut, UsageSummaryQuery
from billing.selectors import usage as usage_selectors
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
        principal=principal_of(request),
        kind=filters.kind,
        agent_id=filters.agent,
        since=filters.from_,
        until=filters.to,
    )
    rows, cursor = keyset_page(events, cursor=filters.cursor, limit=filters.limit)
    return {"items": rows, "next_cursor": cursor}


def _cost_as_text(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "cost": format(row["cost"], "f")}


@router.get("/usage/summary", response=UsageSummaryOut, summary="Tokens and cost per day, agent, model, member or key")
def usage_summary(request: HttpRequest, params: Query[UsageSummaryQuery]) -> dict[str, Any]:
    """Tokens (model input, output and their sum), cost (decimal string, every kind of event) and
    event counts per group over ``[start, end)`` (dates in the tenant's timezone; default the
    current month), plus the totals, which equal the sums over the events. Needs ``usage:read``;
    422 for malformed dates, an empty period or an unknown ``group_by``."""
    principal = principal_of(request)
    principal.require("usage:read")
    period = usage_selectors.usage_period(principal=principal, start=params.start, end=params.end)
    summary = usage_selectors.usage_summary(principal=principal, period=period, group_by=params.group_by)
    return {
        **summary,
        "groups": [_cost_as_text(g) for g in summary["groups"]],
        "totals": _cost_as_text(summary["totals"]),
    }
