"""Hash chain of audit events: canonical serialization, hashing and verification.

hash(n) = SHA-256( canonical_json(fields of event n) || prev_hash ), prev_hash(1) = 64 zeros.

``canonical_json`` sorts keys and drops insignificant whitespace (the same rules as RFC 8785,
JSON Canonicalization Scheme, for the value types we allow). Payloads are normalized before
they are stored so that what PostgreSQL's jsonb returns serializes to the same bytes: floats,
decimals, dates and UUIDs become strings, NUL characters are dropped, keys become strings.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

GENESIS_HASH = "0" * 64


def normalize_payload(value: Any) -> Any:
    """Return ``value`` as JSON that survives a jsonb round trip unchanged.

    Raises ``TypeError`` for values that have no JSON form (e.g. arbitrary objects).
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, float | decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k).replace("\x00", ""): normalize_payload(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [normalize_payload(v) for v in items]
    raise TypeError(f"audit payload value of type {type(value).__name__} has no JSON form")


def canonical_json(value: Any) -> bytes:
    """Serialize ``value`` with sorted keys, no whitespace, UTF-8 (RFC 8785 style)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _timestamp(value: dt.datetime) -> str:
    """UTC ISO 8601 with microseconds, the precision PostgreSQL's timestamptz keeps."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def hashed_fields(*, schema: str, event: Any) -> dict[str, Any]:
    """The fields of ``event`` (an AuditEvent or anything with the same attributes) that the
    hash covers. The schema name is included so that an event copied into another tenant's
    chain does not verify there."""
    return {
        "schema": schema,
        "seq": event.seq,
        "created_at": _timestamp(event.created_at),
        "actor_type": event.actor_type,
        "actor_id": event.actor_id,
        "actor_label": event.actor_label,
        "action": event.action,
        "target_type": event.target_type,
        "target_id": event.target_id,
        "payload": event.payload,
        "request_id": event.request_id,
        "ip": event.ip or "",
    }


def event_hash(*, schema: str, event: Any, prev_hash: str) -> str:
    """Return the hex SHA-256 of the event's canonical fields followed by ``prev_hash``."""
    digest = hashlib.sha256(canonical_json(hashed_fields(schema=schema, event=event)))
    digest.update(prev_hash.encode("ascii"))
    return digest.hexdigest()


@dataclass(frozen=True)
class ChainBreak:
    """The first event at which a chain does not verify, and why."""

    schema: str
    seq: int
    event_id: int
    reason: str


@dataclass(frozen=True)
class ChainReport:
    """Outcome of verifying one schema's chain."""

    schema: str
    events: int
    head_hash: str
    broken: ChainBreak | None

    @property
    def ok(self) -> bool:
        return self.broken is None


def verify_events(schema: str, events: Iterator[Any]) -> ChainReport:
    """Walk ``events`` (ordered by ``seq``) and report the first broken link, if any.

    A link is broken when ``seq`` skips or repeats (a deleted or inserted row), when
    ``prev_hash`` is not the previous event's ``hash`` (a reordered or forked chain), or when
    the recomputed hash differs from the stored one (an edited row).
    """
    expected_seq = 1
    prev_hash = GENESIS_HASH
    count = 0
    for event in events:
        count += 1
        reason = None
        if event.seq != expected_seq:
            reason = f"sequence gap: expected seq {expected_seq}, found {event.seq}"
        elif event.prev_hash != prev_hash:
            reason = f"prev_hash {event.prev_hash[:16]}... does not match the previous hash {prev_hash[:16]}..."
        else:
            recomputed = event_hash(schema=schema, event=event, prev_hash=prev_hash)
            if recomputed != event.hash:
                reason = f"content changed: stored hash {event.hash[:16]}..., recomputed {recomputed[:16]}..."
        if reason is not None:
            return ChainReport(schema, count, prev_hash, ChainBreak(schema, event.seq, event.pk, reason))
        prev_hash = event.hash
        expected_seq += 1
    return ChainReport(schema, count, prev_hash, None)
