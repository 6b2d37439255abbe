"""Writing audit events: the single entry point every mutation goes through."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import structlog
from django.db import connection, transaction
from django.utils import timezone
from django_tenants.utils import schema_context

from compliance.chain import GENESIS_HASH, event_hash, normalize_payload
from compliance.models import AuditEvent
from compliance.redaction import redact

if TYPE_CHECKING:
    from tenants.principal import Principal

logger = structlog.get_logger(__name__)


def _chain_lock_key(schema: str) -> int:
    """A signed 64-bit advisory-lock key for one schema's audit chain."""
    digest = hashlib.sha256(f"audit-chain:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@transaction.atomic
def audit_event_create(
    *,
    actor: Principal,
    action: str,
    target_type: str = "",
    target_id: str | int = "",
    payload: dict[str, Any] | None = None,
    schema: str | None = None,
) -> AuditEvent:
    """Append one event to the audit chain of ``schema`` (default: the connection's schema).

    ``action`` is ``<entity>.<verb>`` in the past tense, e.g. ``api_key.created``. The payload
    is redacted (``compliance.redaction``) and normalized before hashing. The request id and
    client IP are taken from the log context bound by the request middleware (or a worker).

    Runs inside the caller's transaction, so the event commits or rolls back with the change it
    records. Writers of one schema are serialized by a transaction-scoped advisory lock, so
    concurrent writers extend one chain and never fork it.
    """
    schema = schema or connection.schema_name  # type: ignore[attr-defined]  # django-tenants' backend
    context = structlog.contextvars.get_contextvars()
    with schema_context(schema):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_chain_lock_key(schema)])
        last = AuditEvent.objects.order_by("-seq").values_list("seq", "hash").first()
        seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
        event = AuditEvent(
            seq=seq,
            created_at=timezone.now(),
            actor_type=actor.kind,
            actor_id=actor.actor_id[:64],
            actor_label=actor.label[:254],
            action=action,
            target_type=target_type,
            target_id=str(target_id)[:64],
            payload=normalize_payload(redact(payload or {})),
            request_id=str(context.get("request_id") or "")[:128],
            # In the form the column stores (IPv6 lower-cased and compressed), so the hash
            # covers what audit_verify will read back.
            ip=AuditEvent._meta.get_field("ip").get_prep_value(context.get("ip") or None),
            prev_hash=prev_hash,
        )
        event.hash = event_hash(schema=schema, event=event, prev_hash=prev_hash)
        event.save(force_insert=True)
    logger.info("audit_event", action=action, seq=seq, schema=schema, target_type=target_type,
                target_id=str(target_id))
    return event
