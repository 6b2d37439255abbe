"""Writing audit events (the single entry point every mutation goes through) and signing
checkpoints of each chain's head."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from django.db import connection, transaction
from django.utils import timezone
from django_tenants.utils import schema_context

from compliance.chain import (
    GENESIS_HASH,
    Anchor,
    checkpoint_problem,
    checkpoint_signature,
    event_hash,
    normalize_payload,
    verify_events,
)
from compliance.models import AuditEvent
from compliance.redaction import redact
from compliance.selectors import audit_checkpoint_latest, audit_events_streamed
from compliance.signing import keyring
from config.errors import Conflict
from tenants.models import AuditCheckpoint

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
    concurrent writers extend one chain and never fork it. The hash is keyed with the newest
    ``AUDIT_SIGNING_KEYS`` key (``compliance.signing``; ``ImproperlyConfigured`` in production
    without one). The chain's first keyed event also writes a checkpoint, which fixes how many
    plain-hash legacy events open the chain before anyone could rewrite them.
    """
    schema = schema or connection.schema_name  # type: ignore[attr-defined]  # django-tenants' backend
    context = structlog.contextvars.get_contextvars()
    with schema_context(schema):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_chain_lock_key(schema)])
        last = AuditEvent.objects.order_by("-seq").values_list("seq", "hash", "key_id").first()
        seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
        key_id, key = keyring().current
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
            key_id=key_id,
        )
        event.hash = event_hash(schema=schema, event=event, prev_hash=prev_hash, key=key)
        event.save(force_insert=True)
        if last is None or not last[2]:
            _checkpoint_write(schema=schema, seq=seq, head_hash=event.hash, legacy_events=seq - 1)
    logger.info("audit_event", action=action, seq=seq, schema=schema, target_type=target_type,
                target_id=str(target_id))
    return event


def _checkpoint_write(*, schema: str, seq: int, head_hash: str, legacy_events: int) -> AuditCheckpoint:
    """Sign and store a checkpoint of ``schema``'s head (in the public schema)."""
    key_id, key = keyring().current
    checkpoint = AuditCheckpoint(schema_name=schema, seq=seq, hash=head_hash, legacy_events=legacy_events,
                                 created_at=timezone.now(), key_id=key_id)
    checkpoint.signature = checkpoint_signature(checkpoint=checkpoint, key=key)
    checkpoint.save(force_insert=True)
    logger.info("audit_checkpoint", schema=schema, seq=seq, hash=head_hash, legacy_events=legacy_events,
                created_at=checkpoint.created_at.isoformat(), key_id=key_id, signature=checkpoint.signature)
    return checkpoint


@dataclass(frozen=True)
class CheckpointOutcome:
    """What ``audit_checkpoints_create`` did for one chain: ``checkpoint`` is the chain's newest
    trusted checkpoint afterwards (``None`` for an empty chain), ``created`` says whether this run
    wrote it, ``error`` why the chain was not signed (it does not verify)."""

    schema: str
    checkpoint: AuditCheckpoint | None
    created: bool
    error: str | None = None


@transaction.atomic
def audit_checkpoint_create(*, schema: str) -> tuple[AuditCheckpoint | None, bool]:
    """Sign a checkpoint of ``schema``'s chain head, in the public schema.

    Only the events since the chain's newest checkpoint are verified (so a run costs what
    was appended since the last one); a head that does not verify, or a newest checkpoint whose
    signature does not, is never signed over: raises ``Conflict`` (code ``audit_chain_broken``).
    Returns the chain's newest checkpoint and whether it was written now: a head unchanged since
    the last checkpoint gets no new row (idempotent, and the table grows with the chain, not with
    the clock); an empty chain returns ``(None, False)``.
    """
    ring = keyring()
    # Only the newest checkpoint matters here (audit_verify checks them all): its legacy count is
    # every later one's too, since no plain-hash event can follow a keyed one.
    newest = audit_checkpoint_latest(schema=schema)
    if newest is not None and (reason := checkpoint_problem(checkpoint=newest, keyring=ring)) is not None:
        raise Conflict(f"The newest checkpoint of {schema} (id {newest.pk}) does not verify ({reason}); run "
                       "audit_verify.", code="audit_chain_broken", details={"schema": schema, "seq": newest.seq})
    start = Anchor(newest.seq, newest.hash, newest.legacy_events, "checkpoint") if newest else None
    legacy_limit = newest.legacy_events if newest else None
    with schema_context(schema):
        if start is not None and not AuditEvent.objects.filter(seq=start.seq, hash=start.hash).exists():
            raise Conflict(f"The audit chain of {schema} no longer holds the head of its last checkpoint (seq "
                           f"{start.seq}); run audit_verify.", code="audit_chain_broken",
                           details={"schema": schema, "seq": start.seq})
        after = AuditEvent.objects.filter(seq__gt=start.seq if start else 0).order_by("seq")
        with audit_events_streamed(after) as events:
            report = verify_events(schema, events, keyring=ring, legacy_limit=legacy_limit, start=start)
    if report.broken is not None:
        raise Conflict(f"The audit chain of {schema} is broken at seq {report.broken.seq}: {report.broken.reason}",
                       code="audit_chain_broken", details={"schema": schema, "seq": report.broken.seq})
    if report.events == 0:
        return None, False
    if newest is not None and newest.seq == report.events:
        return newest, False
    checkpoint = _checkpoint_write(schema=schema, seq=report.events, head_hash=report.head_hash,
                                   legacy_events=report.legacy_events)
    return checkpoint, True


def audit_checkpoints_create(*, schemas: list[str]) -> list[CheckpointOutcome]:
    """Checkpoint each chain of ``schemas`` in its own transaction (``audit_checkpoint_create``);
    a broken chain is reported in its outcome and does not stop the others."""
    outcomes: list[CheckpointOutcome] = []
    for schema in schemas:
        try:
            checkpoint, created = audit_checkpoint_create(schema=schema)
        except Conflict as exc:
            logger.error("audit_chain_broken", schema=schema, reason=exc.message)
            outcomes.append(CheckpointOutcome(schema, None, False, exc.message))
        else:
            outcomes.append(CheckpointOutcome(schema, checkpoint, created))
    return outcomes
