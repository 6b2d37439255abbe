"""API shapes for usage."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from ninja import Field, Schema
from pydantic import BeforeValidator


class UsageEventOut(Schema):
    id: int
    kind: str
    quantity: int
    unit: str
    model: str
    agent_id: int | None
    session_id: int | None
    turn_id: int | None
    unit_price: Decimal
    cost: Decimal
    currency: str
    request_id: str
    metadata: dict[str, Any]
    created_at: dt.datetime


class UsageEventPage(Schema):
    items: list[UsageEventOut]
    next_cursor: str | None


def _iso_date_only(value: Any) -> Any:
    # pydantic alone also reads numbers as Unix times and date-times with a zero time as dates.
    if isinstance(value, dt.date) or (isinstance(value, str) and _ISO_DATE_RE.match(value.strip())):
        return value.strip() if isinstance(value, str) else value
    raise ValueError("expected an ISO 8601 date such as 2026-01-31")


_ISO_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# A date query parameter: YYYY-MM-DD and nothing else.
IsoDate = Annotated[dt.date, BeforeValidator(_iso_date_only)]
SummaryGroupBy = Literal["day", "agent", "model", "member", "api_key"]


class UsageSummaryQuery(Schema):
    start: IsoDate | None = Field(None, description="First day (inclusive), in the tenant's timezone; "
                                                    "default the first of the current month")
    end: IsoDate | None = Field(None, description="Day after the last (exclusive); default the first of next month")
    group_by: SummaryGroupBy = Field("day", description="day (in the tenant's timezone), agent, model, "
                                                        "member or api_key")


class UsageMeasuresOut(Schema):
    input_tokens: int = Field(description="Model input tokens")
    output_tokens: int = Field(description="Model output tokens")
    tokens: int = Field(description="input_tokens + output_tokens")
    cost: str = Field(description="Sum of the events' cost snapshots, every kind, as a decimal string")
    events: int = Field(description="Number of usage events")


class UsageAgentRef(Schema):
    id: int
    slug: str
    name: str


class UsageMemberRef(Schema):
    id: int
    email: str


class UsageApiKeyRef(Schema):
    id: str = Field(description="The key's public id")
    name: str


class UsageGroupOut(UsageMeasuresOut):
    key: str = Field(description="The group's id: the date, agent id, model, user id, key id, or 'unattributed'")
    label: str
    date: dt.date | None = None
    agent: UsageAgentRef | None = None
    model: str | None = None
    member: UsageMemberRef | None = None
    api_key: UsageApiKeyRef | None = None


class UsageSummaryOut(Schema):
    start: dt.date
    end: dt.date
    time_zone: str = Field(description="The tenant's IANA timezone, of start, end and days")
    currency: str
    group_by: str
    groups: list[UsageGroupOut]
    totals: UsageMeasuresOut
