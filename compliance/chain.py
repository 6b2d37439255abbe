"""Hash chain of audit events: canonical serialization, keyed hashing, checkpoints, verification.

Keyed events (the only kind written today), with ``K`` the key named by the event's ``key_id``
(``compliance.signing``)::

    hash(n) = HMAC-SHA256(K, canonical_json(fields of event n, key_id included) || prev_hash)
    prev_hash(1) = 64 zeros

Someone who holds the database's credentials but not ``AUDIT_SIGNING_KEYS`` cannot compute a
valid hash, so an edited, inserted or renumbered event breaks the chain. Events written before
the chain was keyed have ``key_id = ''`` and a plain ``SHA-256(canonical_json(fields) ||
prev_hash)``; they verify only as the chain's prefix: a plain event after a keyed one, or beyond
the number of legacy events a signed checkpoint recorded, is a break (anyone can compute a plain
hash, so a plain event is only trusted where no keyed writer could have been).

A *checkpoint* is a signed statement "chain ``schema`` had head ``seq``/``hash`` at ``created_at``,
with ``legacy_events`` plain events", stored in the public schema and exportable. Verification
checks that the chain still reaches the newest checkpoint's head, which catches truncation.

``canonical_json`` sorts keys and drops insignificant whitespace (the same rules as RFC 8785,
JSON Canonicalization Scheme, for the value types we allow). Payloads are normalized before
they are stored so that what PostgreSQL's jsonb returns serializes to the same bytes: floats,
decimals, dates and UUIDs become strings, NUL characters are dropped, keys become strings.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compliance.signing import Keyring

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


def plain_event_hash(*, schema: str, event: Any, prev_hash: str) -> str:
    """The legacy hash: hex SHA-256 of the event's canonical fields followed by ``prev_hash``.

    Only events written before the chain was keyed (``key_id = ''``) carry it.
    """
    digest = hashlib.sha256(canonical_json(hashed_fields(schema=schema, event=event)))
    digest.update(prev_hash.encode("ascii"))
    return digest.hexdigest()


def event_hash(*, schema: str, event: Any, prev_hash: str, key: bytes) -> str:
    """The keyed hash: hex HMAC-SHA256 under ``key`` of the event's canonical fields (its
    ``key_id`` included) followed by ``prev_hash`` (RFC 2104 HMAC with SHA-256)."""
    fields = hashed_fields(schema=schema, event=event)
    fields["key_id"] = event.key_id
    mac = hmac.new(key, canonical_json(fields), hashlib.sha256)
    mac.update(prev_hash.encode("ascii"))
    return mac.hexdigest()


def checkpoint_signature(*, checkpoint: Any, key: bytes) -> str:
    """Hex HMAC-SHA256 under ``key`` of a checkpoint's fields: ``schema_name``, ``seq``, ``hash``,
    ``legacy_events``, ``created_at`` and ``key_id``. The message carries ``kind`` so that it can
    never equal an event's."""
    message = {
        "kind": "audit-checkpoint",
        "schema": checkpoint.schema_name,
        "seq": checkpoint.seq,
        "hash": checkpoint.hash,
        "legacy_events": checkpoint.legacy_events,
        "created_at": _timestamp(checkpoint.created_at),
        "key_id": checkpoint.key_id,
    }
    return hmac.new(key, canonical_json(message), hashlib.sha256).hexdigest()


def checkpoint_problem(*, checkpoint: Any, keyring: Keyring) -> str | None:
    """Why ``checkpoint`` cannot be trusted (unknown key or bad signature), or ``None``."""
    key = keyring.get(checkpoint.key_id)
    if key is None:
        return f"signed with key id {checkpoint.key_id!r}, which is not in AUDIT_SIGNING_KEYS"
    if not hmac.compare_digest(checkpoint_signature(checkpoint=checkpoint, key=key), checkpoint.signature):
        return "bad signature (the checkpoint was forged or altered)"
    return None


@dataclass(frozen=True)
class Anchor:
    """What a trusted (signature-checked) checkpoint says about a chain: its head ``seq`` and
    ``hash`` then, and how many plain-hash legacy events open it. ``label`` names the source in
    reports, e.g. ``checkpoint 12 of 2026-05-01T10:00:00Z``."""

    seq: int
    hash: str
    legacy_events: int
    label: str


@dataclass(frozen=True)
class ChainBreak:
    """The first event at which a chain does not verify, and why. ``event_id`` is ``None`` when
    the event is missing (the chain ends before a checkpoint's head)."""

    schema: str
    seq: int
    event_id: int | None
    reason: str


@dataclass(frozen=True)
class CheckpointProblem:
    """A checkpoint that cannot be trusted: its ``id`` (``None`` for one read from an export),
    the ``seq`` it claims and why."""

    schema: str
    checkpoint_id: int | None
    seq: int
    reason: str


@dataclass(frozen=True)
class ChainReport:
    """Outcome of verifying one schema's chain. ``events`` counts the events read (the head's
    seq when intact); ``anchor`` is the checkpoint the chain was held against, if any."""

    schema: str
    events: int
    head_hash: str
    broken: ChainBreak | None
    anchor: Anchor | None = None
    legacy_events: int = 0
    checkpoint_problems: tuple[CheckpointProblem, ...] = ()

    @property
    def ok(self) -> bool:
        return self.broken is None and not self.checkpoint_problems


def _link_problem(event: Any, *, schema: str, expected_seq: int, prev_hash: str, keyed_seen: bool,
                  legacy_limit: int | None, keyring: Keyring) -> str | None:
    """Why ``event`` is not the valid next link of the chain, or ``None``."""
    if event.seq != expected_seq:
        return f"sequence gap: expected seq {expected_seq}, found {event.seq}"
    if event.prev_hash != prev_hash:
        return f"prev_hash {event.prev_hash[:16]}... does not match the previous hash {prev_hash[:16]}..."
    if not event.key_id:
        if keyed_seen:
            return "plain SHA-256 event after keyed events (a keyed chain never returns to plain hashes)"
        if legacy_limit is not None and event.seq > legacy_limit:
            return (f"plain SHA-256 event beyond the {legacy_limit} legacy event(s) a signed checkpoint "
                    "recorded")
        recomputed = plain_event_hash(schema=schema, event=event, prev_hash=prev_hash)
    else:
        key = keyring.get(event.key_id)
        if key is None:
            return f"signed with key id {event.key_id!r}, which is not in AUDIT_SIGNING_KEYS"
        recomputed = event_hash(schema=schema, event=event, prev_hash=prev_hash, key=key)
    if not hmac.compare_digest(recomputed, event.hash):
        return f"content changed: stored hash {event.hash[:16]}..., recomputed {recomputed[:16]}..."
    return None


def verify_events(schema: str, events: Iterator[Any], *, keyring: Keyring, anchor: Anchor | None = None,
                  legacy_limit: int | None = None, start: Anchor | None = None) -> ChainReport:
    """Walk ``events`` (ordered by ``seq``) and report the first broken link, if any.

    A link is broken when ``seq`` skips or repeats (a deleted or inserted row), when
    ``prev_hash`` is not the previous event's ``hash`` (a reordered or forked chain), when the
    recomputed hash differs from the stored one (an edited row, or one rehashed without the key),
    when its key id is unknown, or when a plain-hash event appears where only keyed ones may
    (after a keyed event, or past ``legacy_limit``). With an ``anchor``, the chain must also
    hold event ``anchor.seq`` with ``anchor.hash``; a chain that ends before it breaks at the
    first missing seq. ``start`` resumes after an already-verified head (``events`` then begin
    at ``start.seq + 1``).
    """
    expected_seq = start.seq + 1 if start else 1
    prev_hash = start.hash if start else GENESIS_HASH
    keyed_seen = start is not None and start.seq > start.legacy_events
    count = start.seq if start else 0
    legacy = min(count, start.legacy_events) if start else 0
    for event in events:
        count += 1
        reason = _link_problem(event, schema=schema, expected_seq=expected_seq, prev_hash=prev_hash,
                               keyed_seen=keyed_seen, legacy_limit=legacy_limit, keyring=keyring)
        if reason is None and anchor is not None and event.seq == anchor.seq and event.hash != anchor.hash:
            reason = f"hash {event.hash[:16]}... differs from the head {anchor.hash[:16]}... that {anchor.label} signed"
        if reason is not None:
            broken = ChainBreak(schema, event.seq, event.pk, reason)
            return ChainReport(schema, count, prev_hash, broken, anchor, legacy)
        keyed_seen = keyed_seen or bool(event.key_id)
        legacy += 0 if event.key_id else 1
        prev_hash = event.hash
        expected_seq += 1
    if anchor is not None and count < anchor.seq:
        reason = (f"missing: the chain ends at seq {count} but {anchor.label} signed a head at seq {anchor.seq} "
                  "(events were deleted)")
        return ChainReport(schema, count, prev_hash, ChainBreak(schema, count + 1, None, reason), anchor, legacy)
    return ChainReport(schema, count, prev_hash, None, anchor, legacy)
