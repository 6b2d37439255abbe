"""REST endpoints for the audit trail."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema

from compliance import selectors
from compliance.models import AuditEvent
from compliance.schemas import AuditEventOut, AuditEventPage
from config.api import IsoDateTime, keyset_page, principal_of
from config.errors import NotFound

router = Router(tags=["audit"])


class AuditFilters(Schema):
    actor: str | None = Field(None, description="Substring of the actor's e-mail or key prefix")
    action: str | None = Field(None, description="Exact action, or a prefix ending in '.'")
    target_type: str | None = None
    from_: IsoDateTime | None = Field(None, alias="from", description="Inclusive lower bound of created_at")
    to: IsoDateTime | None = Field(None, description="Exclusive upper bound of created_at")
    limit: int = 50
    cursor: str | None = None


@router.get("/audit/events", response=AuditEventPage, summary="Audit events, newest first")
def audit_event_list(request: HttpRequest, filters: Query[AuditFilters]) -> dict[str, Any]:
    events = selectors.audit_event_list(
        principal=principal_of(request), actor=filters.actor, action=filters.action,
        target_type=filters.target_type, since=filters.from_, until=filters.to,
    )
    rows, cursor = keyset_page(events, cursor=filters.cursor, limit=filters.limit, key="seq")
    return {"items": rows, "next_cursor": cursor}


@router.get("/audit/events/{seq}", response=AuditEventOut, summary="One audit event by its sequence number")
def audit_event_get(request: HttpRequest, seq: int) -> AuditEvent:
    event = selectors.audit_event_list(principal=principal_of(request)).filter(seq=seq).first()
    if event is None:
        raise NotFound("No such audit event.")
    return event
