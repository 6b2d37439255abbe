"""API shapes for the audit trail."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ninja import Field, Schema


class AuditEventOut(Schema):
    id: int
    seq: int
    created_at: dt.datetime
    actor_type: str
    actor_id: str
    actor_label: str
    action: str
    target_type: str
    target_id: str
    payload: dict[str, Any]
    request_id: str
    ip: str | None
    prev_hash: str
    hash: str
    key_id: str = Field("", description="Id of the AUDIT_SIGNING_KEYS key that signed the hash "
                                        "('' = legacy plain SHA-256)")


class AuditEventPage(Schema):
    items: list[AuditEventOut]
    next_cursor: str | None
