"""Recording usage events."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import structlog
from django.utils import timezone

from billing.models import UsageEvent

UNITS: dict[str, str] = {
    UsageEvent.Kind.LLM_INPUT_TOKENS: "token",
    UsageEvent.Kind.LLM_OUTPUT_TOKENS: "token",
    UsageEvent.Kind.EMBEDDING_TOKENS: "token",
    UsageEvent.Kind.KB_QUERY: "query",
    UsageEvent.Kind.TOOL_CALL: "call",
}


def usage_event_values(
    *,
    kind: str,
    quantity: int,
    model: str = "",
    agent_id: int | None = None,
    session_id: int | None = None,
    turn_id: int | None = None,
    unit_price: Decimal = Decimal(0),
    currency: str = "USD",
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The column values of a usage event (field name -> value), validated, not saved: for
    ``usage_event_record`` and for statements that write the event together with other rows.

    ``quantity`` is a non-negative integer count of the kind's unit (tokens, queries, calls);
    ``unit_price`` is the price of one unit in ``currency`` at this moment (a snapshot).
    Raises ``ValueError`` for an unknown kind or a negative quantity.
    """
    if kind not in UNITS:
        raise ValueError(f"unknown usage kind {kind!r}")
    if quantity < 0:
        raise ValueError("usage quantity cannot be negative")
    context = structlog.contextvars.get_contextvars()
    return {
        "kind": kind, "quantity": quantity, "unit": UNITS[kind], "model": model, "agent_id": agent_id,
        "session_id": session_id, "turn_id": turn_id, "unit_price": unit_price, "cost": unit_price * quantity,
        "currency": currency, "request_id": str(context.get("request_id") or "")[:128], "metadata": metadata or {},
        "created_at": timezone.now(),
    }


def usage_event_record(
    *,
    kind: str,
    quantity: int,
    model: str = "",
    agent_id: int | None = None,
    session_id: int | None = None,
    turn_id: int | None = None,
    unit_price: Decimal = Decimal(0),
    currency: str = "USD",
    metadata: dict[str, Any] | None = None,
) -> UsageEvent:
    """Append a usage event to the current tenant schema and return it (values and errors as
    ``usage_event_values``)."""
    return UsageEvent.objects.create(**usage_event_values(
        kind=kind, quantity=quantity, model=model, agent_id=agent_id, session_id=session_id, turn_id=turn_id,
        unit_price=unit_price, currency=currency, metadata=metadata,
    ))
