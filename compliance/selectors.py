"""Reading the audit trail."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Generator, Iterable, Iterator
from contextlib import closing, contextmanager
from typing import Any, cast

from django.db.models import QuerySet
from django_tenants.utils import get_tenant_model, schema_context

from compliance.chain import Anchor, ChainReport, CheckpointProblem, checkpoint_problem, verify_events
from compliance.models import AuditEvent
from compliance.signing import Keyring, keyring
from tenants.models import AuditCheckpoint
from tenants.principal import Principal


def audit_event_list(
    *,
    principal: Principal,
    actor: str | None = None,
    action: str | None = None,
    target_type: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> QuerySet[AuditEvent]:
    """Events of the principal's tenant, newest first, filtered.

    ``actor`` matches the actor label (e-mail or key prefix) case-insensitively as a substring;
    ``action`` matches exactly or, ending in ``.``, as a prefix (``member.`` = every member
    action); ``since``/``until`` bound ``created_at`` (inclusive/exclusive).
    Raises ``Forbidden`` without ``audit:read``.
    """
    principal.require("audit:read")
    events = AuditEvent.objects.all()
    if actor:
        events = events.filter(actor_label__icontains=actor)
    if action:
        events = events.filter(action__startswith=action) if action.endswith(".") else events.filter(action=action)
    if target_type:
        events = events.filter(target_type=target_type)
    if since:
        events = events.filter(created_at__gte=since)
    if until:
        events = events.filter(created_at__lt=until)
    return events.order_by("-seq")


@contextmanager
def audit_events_streamed(events: QuerySet[AuditEvent]) -> Iterator[Iterator[AuditEvent]]:
    """Iterate ``events`` through a server-side cursor, 2,000 rows a fetch, closed when the block
    ends: a verification that stops at a break would otherwise leave the cursor open until garbage
    collection, and closing it after the transaction rolled back fails."""
    # QuerySet.iterator() is a generator; its stub only promises an Iterator.
    stream = cast(Generator[AuditEvent, None, None], events.iterator(chunk_size=2000))
    with closing(stream):
        yield stream


def audit_checkpoints_trusted(
    *, schema: str, keyring: Keyring, extra: Iterable[AuditCheckpoint] = ()
) -> tuple[list[AuditCheckpoint], list[CheckpointProblem]]:
    """The checkpoints of ``schema``'s chain (stored ones, plus ``extra`` ones of any schema, e.g.
    read from an export), split into those whose signature verifies and the problems of the rest.
    Stored checkpoints come oldest first."""
    stored = AuditCheckpoint.objects.filter(schema_name=schema).order_by("seq", "id")
    trusted: list[AuditCheckpoint] = []
    problems: list[CheckpointProblem] = []
    for checkpoint in [*stored, *(c for c in extra if c.schema_name == schema)]:
        reason = checkpoint_problem(checkpoint=checkpoint, keyring=keyring)
        if reason is None:
            trusted.append(checkpoint)
        else:
            problems.append(CheckpointProblem(schema, checkpoint.pk, checkpoint.seq, reason))
    return trusted, problems


def _anchor_label(checkpoint: AuditCheckpoint) -> str:
    source = f"checkpoint {checkpoint.pk}" if checkpoint.pk else "the exported checkpoint"
    return f"{source} of {checkpoint.created_at.isoformat()}"


def audit_chain_verify(*, schema: str, exported: Iterable[AuditCheckpoint] = ()) -> ChainReport:
    """Verify the whole chain of ``schema``, streaming events in ``seq`` order, against its
    checkpoints (stored ones and ``exported``): every checkpoint's signature must verify, the chain
    must still hold the head of the highest one, and no plain-hash event may follow the number of
    legacy events they recorded. Raises ``ImproperlyConfigured`` in production without keys."""
    ring = keyring()
    trusted, problems = audit_checkpoints_trusted(schema=schema, keyring=ring, extra=exported)
    highest = max(trusted, key=lambda c: (c.seq, c.created_at), default=None)
    anchor = Anchor(highest.seq, highest.hash, highest.legacy_events, _anchor_label(highest)) if highest else None
    legacy_limit = min((c.legacy_events for c in trusted), default=None)
    with schema_context(schema), audit_events_streamed(AuditEvent.objects.order_by("seq")) as events:
        report = verify_events(schema, events, keyring=ring, anchor=anchor, legacy_limit=legacy_limit)
    if problems:
        return ChainReport(report.schema, report.events, report.head_hash, report.broken, report.anchor,
                           report.legacy_events, tuple(problems))
    return report


def audit_checkpoint_latest(*, schema: str) -> AuditCheckpoint | None:
    """The stored checkpoint of ``schema`` with the highest seq (newest first among equals)."""
    return AuditCheckpoint.objects.filter(schema_name=schema).order_by("-seq", "-created_at", "-id").first()


def checkpoint_as_json(checkpoint: AuditCheckpoint) -> str:
    """One line of an export: the checkpoint's fields as JSON (``created_at`` in ISO 8601 UTC)."""
    return json.dumps({
        "id": checkpoint.pk,
        "schema_name": checkpoint.schema_name,
        "seq": checkpoint.seq,
        "hash": checkpoint.hash,
        "legacy_events": checkpoint.legacy_events,
        "created_at": checkpoint.created_at.astimezone(dt.UTC).isoformat(),
        "key_id": checkpoint.key_id,
        "signature": checkpoint.signature,
    }, sort_keys=True)


def checkpoints_from_json_lines(lines: Iterable[str]) -> list[AuditCheckpoint]:
    """Parse an export (``checkpoint_as_json`` lines; blank lines skipped) into unsaved
    checkpoints, so that they are checked like stored ones. Raises ``ValueError`` (with the line
    number) for a line that is not such a checkpoint."""
    checkpoints: list[AuditCheckpoint] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data: dict[str, Any] = json.loads(line)
            checkpoints.append(AuditCheckpoint(
                schema_name=str(data["schema_name"]), seq=int(data["seq"]), hash=str(data["hash"]),
                legacy_events=int(data["legacy_events"]), created_at=dt.datetime.fromisoformat(data["created_at"]),
                key_id=str(data["key_id"]), signature=str(data["signature"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"line {number} is not an audit checkpoint: {exc}") from exc
    return checkpoints


def audited_schemas() -> list[str]:
    """Every schema that holds an audit chain: public first, then each tenant's."""
    tenants = get_tenant_model().objects.exclude(schema_name="public").order_by("schema_name")
    return ["public", *tenants.values_list("schema_name", flat=True)]
