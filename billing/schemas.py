"""API shapes for usage."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from ninja import Schema


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
