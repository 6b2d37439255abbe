"""Recording usage events."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Required, TypedDict, Unpack

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


class UsageFields(TypedDict, total=False):
    """What a usage event records (``kind`` and ``quantity`` required)."""

    kind: Required[str]
    quantity: Required[int]
    model: str
    agent_id: int | None
    session_id: int | None
    turn_id: int | None
    unit_price: Decimal
    currency: str
    metadata: dict[str, Any] | None
    user_id: int | None
    api_key_id: str


def usage_event_values(**fields: Unpack[UsageFields]) -> dict[str, Any]:
    """The column values of a usage event (field name -> value), validated, not saved: for
    ``usage_event_record`` and for statements that write the event together with other rows.

    ``quantity`` is a non-negative integer count of the kind's unit (tokens, queries, calls);
    ``unit_price`` (default 0) is the price of one unit in ``currency`` (default USD) at this
    moment (a snapshot). ``user_id`` / ``api_key_id`` (who caused it) default to the member or
    key bound in structlog's context (``user_id``, ``api_key``) by the request or the turn.
    Raises ``ValueError`` for an unknown kind or a negative quantity.
    """
    kind, quantity = fields["kind"], fields["quantity"]
    if kind not in UNITS:
        raise ValueError(f"unknown usage kind {kind!r}")
    if quantity < 0:
        raise ValueError("usage quantity cannot be negative")
    unit_price = fields.get("unit_price", Decimal(0))
    context = structlog.contextvars.get_contextvars()
    return {
        "kind": kind, "quantity": quantity, "unit": UNITS[kind], "model": fields.get("model", ""),
        "agent_id": fields.get("agent_id"), "session_id": fields.get("session_id"), "turn_id": fields.get("turn_id"),
        "unit_price": unit_price, "cost": unit_price * quantity, "currency": fields.get("currency", "USD"),
        "user_id": fields["user_id"] if "user_id" in fields else context.get("user_id"),
        "api_key_id": str((fields["api_key_id"] if "api_key_id" in fields else context.get("api_key")) or "")[:24],
        "request_id": str(context.get("request_id") or "")[:128], "metadata": fields.get("metadata") or {},
        "created_at": timezone.now(),
    }


def usage_event_record(**fields: Unpack[UsageFields]) -> UsageEvent:
    """Append a usage event to the current tenant schema and return it (fields, values and
    errors as ``usage_event_values``)."""
    return UsageEvent.objects.create(**usage_event_values(**fields))
