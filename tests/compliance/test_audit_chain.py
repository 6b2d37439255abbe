"""The audit trail's hash chain: append-only storage, keyed verification against someone who holds
the database's credentials (not the signing key), checkpoints, concurrency, redaction.

The attacker is simulated in SQL with ``SET LOCAL session_replication_role = replica``, which
switches off the append-only triggers for the test's transaction (the rollback restores them)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import structlog
from django.core.management import CommandError, call_command
from django.db import DatabaseError, IntegrityError, connection, transaction
from django_tenants.utils import schema_context

from compliance.chain import GENESIS_HASH, canonical_json, event_hash, hashed_fields, verify_events
from compliance.models import AuditEvent
from compliance.selectors import audit_chain_verify
from compliance.services import audit_event_create
from compliance.signing import keyring
from tenants.principal import Principal
from tests.conftest import World

SYSTEM = Principal.system("tests")


def _events(schema: str, count: int) -> list[AuditEvent]:
    """Append ``count`` events to ``schema``'s chain; return them oldest first."""
    return [
        audit_event_create(actor=SYSTEM, action="test.appended", target_type="thing", target_id=i,
                           payload={"n": i}, schema=schema)
        for i in range(count)
    ]


def _key(event: AuditEvent) -> bytes:
    key = keyring().get(event.key_id)
    assert key is not None
    return key


def _verify(schema: str) -> str:
    """Run ``audit_verify --schema`` and return what it printed (it must exit normally)."""
    out = io.StringIO()
    call_command("audit_verify", "--schema", schema, stdout=out)
    return out.getvalue()


def _verify_fails(schema: str) -> str:
    """Run ``audit_verify --schema``, expecting exit status 1; return what it printed."""
    out = io.StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("audit_verify", "--schema", schema, stdout=out)
    assert exited.value.code == 1
    return out.getvalue()


def _sql(schema: str, sql: str, params: list[Any] | None = None) -> None:
    with schema_context(schema), connection.cursor() as cursor:
        cursor.execute(sql, params or [])


def _plain_hash(schema: str, event: Any, prev_hash: str) -> str:
    """What an attacker without the signing key can compute: SHA-256 over the canonical fields
    and the previous hash (the chain's hash before it was keyed)."""
    digest = hashlib.sha256(canonical_json(hashed_fields(schema=schema, event=event)))
    digest.update(prev_hash.encode("ascii"))
    return digest.hexdigest()


def _rehash_plain_from(schema: str, seq: int) -> None:
    """Recompute plain hashes and links from event ``seq`` to the head, as the attacker would."""
    with schema_context(schema):
        prev = AuditEvent.objects.filter(seq=seq - 1).values_list("hash", flat=True).first() or GENESIS_HASH
        for event in AuditEvent.objects.filter(seq__gte=seq).order_by("seq"):
            new_hash = _plain_hash(schema, event, prev)
            _sql(schema, "UPDATE compliance_auditevent SET prev_hash = %s, hash = %s WHERE id = %s",
                 [prev, new_hash, event.pk])
            prev = new_hash


def _head_seq(schema: str) -> int:
    with schema_context(schema):
        return AuditEvent.objects.order_by("-seq").values_list("seq", flat=True)[0]


@pytest.fixture
def tamperable(world: World) -> Iterator[str]:
    """Tenant A's schema, with triggers off for this test's transaction only (the attacker)."""
    schema = world.tenant_a.schema_name
    _events(schema, 5)
    # SET LOCAL ends with the transaction: the rollback after the test turns the triggers back on.
    _sql(schema, "SET LOCAL session_replication_role = replica")
    yield schema


# --- Append-only storage ------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE {table} SET action = 'forged.action'",
        "DELETE FROM {table}",
        "TRUNCATE {table}",
    ],
    ids=["update", "delete", "truncate"],
)
@pytest.mark.parametrize("where", ["tenant", "public"])
def test_it_refuses_to_change_or_remove_audit_events(world: World, statement: str, where: str) -> None:
    schema = world.tenant_a.schema_name if where == "tenant" else "public"
    _events(schema, 1)
    with schema_context(schema):
        before = list(AuditEvent.objects.order_by("seq").values_list("seq", "action"))
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(statement.format(table=f'"{schema}".compliance_auditevent'))
        assert list(AuditEvent.objects.order_by("seq").values_list("seq", "action")) == before


def test_it_refuses_orm_updates_and_deletes_too(world: World) -> None:
    schema = world.tenant_a.schema_name
    event = _events(schema, 1)[0]
    with schema_context(schema):
        with pytest.raises(IntegrityError), transaction.atomic():
            AuditEvent.objects.filter(pk=event.pk).update(payload={"n": "forged"})
        with pytest.raises(IntegrityError), transaction.atomic():
            AuditEvent.objects.filter(pk=event.pk).delete()
        assert AuditEvent.objects.get(pk=event.pk).payload == {"n": 0}


# --- Verification -------------------------------------------------------------------------


def test_it_verifies_a_fresh_chain(world: World) -> None:
    schema = world.tenant_a.schema_name
    events = _events(schema, 3)
    report = audit_chain_verify(schema=schema)
    assert report.ok
    with schema_context(schema):
        assert report.events == AuditEvent.objects.count()
    assert report.head_hash == events[-1].hash
    assert events[1].prev_hash == events[0].hash and events[2].prev_hash == events[1].hash
    with schema_context(schema):
        first = AuditEvent.objects.get(seq=1)
    assert first.prev_hash == GENESIS_HASH


def test_it_verifies_the_public_chain_and_every_schema(world: World) -> None:
    _events("public", 2)
    assert audit_chain_verify(schema="public").ok
    out = io.StringIO()
    call_command("audit_verify", "--all", stdout=out)
    text = out.getvalue()
    assert "ok public:" in text and f"ok {world.tenant_a.schema_name}:" in text
    assert f"ok {world.tenant_b.schema_name}:" in text
    assert "intact" in text and "BROKEN" not in text


def test_audit_verify_prints_intact_for_an_untouched_schema(world: World) -> None:
    schema = world.tenant_a.schema_name
    events = _events(schema, 2)
    text = _verify(schema)
    assert "1 chain(s) intact" in text
    assert f"head {events[-1].hash}" in text


def test_audit_verify_refuses_an_unknown_schema(world: World) -> None:
    with pytest.raises(CommandError, match="No schema 't_no_such_tenant'"):
        call_command("audit_verify", "--schema", "t_no_such_tenant", stdout=io.StringIO())


def test_audit_verify_reports_the_first_edited_event(tamperable: str) -> None:
    with schema_context(tamperable):
        last = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True)[0]
    edited = last - 2
    _sql(tamperable, "UPDATE compliance_auditevent SET payload = %s WHERE seq = %s", ['{"n": "forged"}', edited])
    # A later edit must not hide the earlier one: the report names the first broken link.
    _sql(tamperable, "UPDATE compliance_auditevent SET action = 'forged' WHERE seq = %s", [last])
    text = _verify_fails(tamperable)
    assert f"BROKEN {tamperable}: event seq={edited} " in text
    assert "content changed" in text
    assert "intact" not in text
    report = audit_chain_verify(schema=tamperable)
    assert report.broken is not None and report.broken.seq == edited


def test_audit_verify_reports_a_deleted_event_as_a_sequence_gap(tamperable: str) -> None:
    with schema_context(tamperable):
        last = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True)[0]
    deleted = last - 2
    _sql(tamperable, "DELETE FROM compliance_auditevent WHERE seq = %s", [deleted])
    text = _verify_fails(tamperable)
    assert f"event seq={deleted + 1} " in text
    assert f"sequence gap: expected seq {deleted}, found {deleted + 1}" in text


def test_audit_verify_reports_reordered_events(tamperable: str) -> None:
    with schema_context(tamperable):
        last = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True)[0]
    a, b = last - 3, last - 2
    # Swap two events' places (through a free seq, as seq is unique).
    _sql(tamperable, "UPDATE compliance_auditevent SET seq = -1 WHERE seq = %s", [a])
    _sql(tamperable, "UPDATE compliance_auditevent SET seq = %s WHERE seq = %s", [a, b])
    _sql(tamperable, "UPDATE compliance_auditevent SET seq = %s WHERE seq = -1", [b])
    text = _verify_fails(tamperable)
    assert f"event seq={a} " in text
    assert "does not match the previous hash" in text


def test_audit_verify_reports_a_forged_prev_hash(tamperable: str) -> None:
    with schema_context(tamperable):
        last = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True)[0]
    forged = last - 1
    _sql(tamperable, "UPDATE compliance_auditevent SET prev_hash = %s WHERE seq = %s", ["f" * 64, forged])
    text = _verify_fails(tamperable)
    assert f"event seq={forged} " in text
    assert "prev_hash ffffffffffffffff... does not match" in text


def test_audit_verify_reports_an_event_edited_and_rehashed_without_the_key(tamperable: str) -> None:
    """(a) The attacker edits an event and recomputes plain SHA-256 hashes and links from there to
    the head, so every link matches: without the signing key the edited event still fails."""
    edited = _head_seq(tamperable) - 2
    _sql(tamperable, "UPDATE compliance_auditevent SET payload = %s WHERE seq = %s", ['{"n": "forged"}', edited])
    _rehash_plain_from(tamperable, edited)
    text = _verify_fails(tamperable)
    assert f"BROKEN {tamperable}: event seq={edited} " in text
    assert "intact" not in text


def test_audit_verify_reports_a_deleted_event_with_the_rest_renumbered_and_rehashed(tamperable: str) -> None:
    """(b) The attacker deletes an event, renumbers the later ones to close the gap and
    recomputes plain hashes: the chain breaks where the deleted event was."""
    head = _head_seq(tamperable)
    deleted = head - 2
    _sql(tamperable, "DELETE FROM compliance_auditevent WHERE seq = %s", [deleted])
    for seq in range(deleted + 1, head + 1):
        _sql(tamperable, "UPDATE compliance_auditevent SET seq = %s WHERE seq = %s", [seq - 1, seq])
    _rehash_plain_from(tamperable, deleted)
    text = _verify_fails(tamperable)
    assert f"BROKEN {tamperable}: event seq={deleted} " in text


def test_audit_verify_reports_a_whole_chain_rewritten_as_legacy_plain_hashes(tamperable: str) -> None:
    """Rewriting every event as a pre-keyed (plain) one fails too: the chain's first keyed event
    signed a checkpoint saying how many plain events open it (none, for this chain)."""
    _sql(tamperable, "UPDATE compliance_auditevent SET key_id = ''")
    _rehash_plain_from(tamperable, 1)
    text = _verify_fails(tamperable)
    assert f"BROKEN {tamperable}: event seq=1 " in text
    assert "beyond the 0 legacy event(s)" in text


def test_audit_verify_reports_a_plain_event_appended_after_keyed_ones(tamperable: str) -> None:
    head = _head_seq(tamperable)
    with schema_context(tamperable):
        last = AuditEvent.objects.get(seq=head)
    forged = AuditEvent(seq=head + 1, created_at=last.created_at, actor_type="system", actor_label="forger",
                        action="test.forged", payload={}, prev_hash=last.hash, key_id="")
    forged.hash = _plain_hash(tamperable, forged, last.hash)
    with schema_context(tamperable):
        forged.save(force_insert=True)
    text = _verify_fails(tamperable)
    assert f"event seq={head + 1} " in text
    assert "plain SHA-256 event after keyed events" in text


def test_audit_verify_reports_deleted_newest_events_after_a_checkpoint(tamperable: str) -> None:
    """(c) Events deleted from the end leave a shorter chain whose links all verify; the signed
    checkpoint of the head, stored outside the tenant's schema, names the first missing seq."""
    head = _head_seq(tamperable)
    call_command("audit_checkpoint", "--schema", tamperable, stdout=io.StringIO(), stderr=io.StringIO())
    _sql(tamperable, "DELETE FROM compliance_auditevent WHERE seq >= %s", [head - 1])
    text = _verify_fails(tamperable)
    assert f"BROKEN {tamperable}: event seq={head - 1} " in text
    assert f"signed a head at seq {head}" in text


def test_audit_verify_reports_a_replaced_head_after_a_checkpoint(tamperable: str) -> None:
    """The newest event swapped for another with the same seq: its hash is not the one signed."""
    head = _head_seq(tamperable)
    call_command("audit_checkpoint", "--schema", tamperable, stdout=io.StringIO(), stderr=io.StringIO())
    with schema_context(tamperable):
        original = AuditEvent.objects.get(seq=head)
    _sql(tamperable, "DELETE FROM compliance_auditevent WHERE seq = %s", [head])
    # Re-appended through the service with the key (as a compromised writer would): still not
    # the head the checkpoint signed.
    audit_event_create(actor=SYSTEM, action="test.replaced", payload={"n": "other"}, schema=tamperable)
    text = _verify_fails(tamperable)
    assert f"event seq={head} " in text
    assert f"differs from the head {original.hash[:16]}" in text


def test_audit_verify_reports_a_forged_checkpoint(tamperable: str) -> None:
    """A checkpoint row inserted or altered without the key has a bad signature: reported, exit 1."""
    from tenants.models import AuditCheckpoint

    call_command("audit_checkpoint", "--schema", tamperable, stdout=io.StringIO(), stderr=io.StringIO())
    checkpoint = AuditCheckpoint.objects.filter(schema_name=tamperable).order_by("-seq").first()
    assert checkpoint is not None
    # Lower the signed head, as if to hide deleted events.
    _sql("public", "UPDATE tenants_auditcheckpoint SET seq = 1 WHERE id = %s", [checkpoint.pk])
    text = _verify_fails(tamperable)
    assert f"BROKEN {tamperable}: checkpoint id={checkpoint.pk} (seq=1): bad signature" in text
    forged = AuditCheckpoint.objects.create(schema_name=tamperable, seq=1, hash="0" * 64, legacy_events=0,
                                            created_at=checkpoint.created_at, key_id=checkpoint.key_id,
                                            signature="f" * 64)
    assert f"checkpoint id={forged.pk} (seq=1): bad signature" in _verify_fails(tamperable)


def test_audit_verify_reports_truncation_against_exported_checkpoints(tamperable: str, tmp_path: Any) -> None:
    """Deleting the stored checkpoints too does not hide a truncation from a kept export."""
    export = tmp_path / "checkpoints.jsonl"
    head = _head_seq(tamperable)
    call_command("audit_checkpoint", "--schema", tamperable, "--export", str(export), stdout=io.StringIO(),
                 stderr=io.StringIO())
    _sql("public", "DELETE FROM tenants_auditcheckpoint WHERE schema_name = %s", [tamperable])
    _sql(tamperable, "DELETE FROM compliance_auditevent WHERE seq = %s", [head])
    assert "intact" in _verify(tamperable)  # nothing in the database tells
    out = io.StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("audit_verify", "--schema", tamperable, "--checkpoints", str(export), stdout=out)
    assert exited.value.code == 1
    assert f"BROKEN {tamperable}: event seq={head} id=-: missing" in out.getvalue()


# --- Keys and the transition from plain hashes --------------------------------------------


@pytest.fixture
def empty_chain(tamperable: str) -> str:
    """Tenant A's schema with its chain and checkpoints gone, to build chains from scratch."""
    _sql(tamperable, "DELETE FROM compliance_auditevent")
    _sql("public", "DELETE FROM tenants_auditcheckpoint WHERE schema_name = %s", [tamperable])
    return tamperable


def _legacy_events(schema: str, count: int) -> None:
    """Events as the code before keyed hashing wrote them: plain SHA-256, no key id."""
    prev = GENESIS_HASH
    with schema_context(schema):
        for seq in range(1, count + 1):
            event = AuditEvent(seq=seq, created_at=dt.datetime(2025, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=seq),
                               actor_type="system", actor_label="old", action="test.legacy", payload={"n": seq},
                               prev_hash=prev, key_id="")
            event.hash = _plain_hash(schema, event, prev)
            event.save(force_insert=True)
            prev = event.hash


def test_legacy_plain_events_verify_before_the_first_keyed_one(empty_chain: str) -> None:
    from tenants.models import AuditCheckpoint

    _legacy_events(empty_chain, 3)
    assert audit_chain_verify(schema=empty_chain).ok  # an upgraded, not yet checkpointed chain
    _events(empty_chain, 2)
    report = audit_chain_verify(schema=empty_chain)
    assert report.ok and report.events == 5 and report.legacy_events == 3
    # The first keyed event signed a checkpoint that fixes the legacy prefix at 3 events.
    genesis = AuditCheckpoint.objects.get(schema_name=empty_chain)
    assert (genesis.seq, genesis.legacy_events) == (4, 3)
    assert "3 legacy plain-hash event(s)" in _verify(empty_chain)


def test_keyed_events_rewritten_as_plain_after_a_legacy_prefix_are_reported(empty_chain: str) -> None:
    _legacy_events(empty_chain, 3)
    _events(empty_chain, 2)
    _sql(empty_chain, "UPDATE compliance_auditevent SET key_id = '', payload = '{\"n\": \"forged\"}' WHERE seq = 5")
    _rehash_plain_from(empty_chain, 5)
    assert "event seq=5 " in _verify_fails(empty_chain)
    _sql(empty_chain, "UPDATE compliance_auditevent SET key_id = '' WHERE seq = 4")
    _rehash_plain_from(empty_chain, 4)
    text = _verify_fails(empty_chain)
    assert "event seq=4 " in text and "beyond the 3 legacy event(s)" in text


def test_a_key_rotation_keeps_old_events_verifiable(empty_chain: str, settings: Any) -> None:
    from compliance.signing import key_id_of

    old, new = "old-audit-key-" + "o" * 32, "new-audit-key-" + "n" * 32
    settings.AUDIT_SIGNING_KEYS = [old]
    first = _events(empty_chain, 2)
    settings.AUDIT_SIGNING_KEYS = [new, old]
    second = _events(empty_chain, 2)
    assert {e.key_id for e in first} == {key_id_of(old.encode())}
    assert {e.key_id for e in second} == {key_id_of(new.encode())}
    assert old not in str(first[0].__dict__) and new not in str(second[0].__dict__)
    assert audit_chain_verify(schema=empty_chain).ok
    # Dropping the old key makes its events (and the checkpoint it signed) unverifiable.
    settings.AUDIT_SIGNING_KEYS = [new]
    text = _verify_fails(empty_chain)
    assert f"event seq=1 id={first[0].pk}: signed with key id {first[0].key_id!r}" in text
    assert "checkpoint id=" in text


def test_events_signed_with_another_key_do_not_verify(world: World, settings: Any) -> None:
    """Someone with the database but another key (e.g. a development copy) cannot extend it."""
    schema = world.tenant_a.schema_name
    settings.AUDIT_SIGNING_KEYS = ["attacker-key-" + "a" * 32]
    _events(schema, 1)
    settings.AUDIT_SIGNING_KEYS = []
    assert "not in AUDIT_SIGNING_KEYS" in _verify_fails(schema)


# --- Concurrency --------------------------------------------------------------------------


@pytest.mark.slow
def test_it_keeps_one_unbroken_chain_under_concurrent_writers(django_db_setup: World, django_db_blocker: Any) -> None:
    """20 threads, each on its own connection and transaction, append to one tenant's chain.

    Writes are committed (the advisory lock only serializes real transactions), so the test
    provisions its own tenant rather than touching the shared personas.
    """
    from tenants.services.provisioning import tenant_create

    writers = 20
    slug = f"chain-{uuid.uuid4().hex[:10]}"
    with django_db_blocker.unblock():
        tenant = tenant_create(actor=SYSTEM, slug=slug, name="Chain", owner_email=f"owner@{slug}.test").tenant
        schema = tenant.schema_name
        barrier = threading.Barrier(writers)
        errors: list[BaseException] = []

        def write(n: int) -> None:
            try:
                barrier.wait(timeout=30)
                audit_event_create(actor=Principal.system(f"writer-{n}"), action="test.concurrent",
                                   target_type="writer", target_id=n, payload={"writer": n}, schema=schema)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

        assert not any(t.is_alive() for t in threads)
        assert errors == []
        with schema_context(schema):
            rows = list(AuditEvent.objects.order_by("seq").values_list("seq", "prev_hash", "hash", "actor_label"))
        report = audit_chain_verify(schema=schema)
        connection.set_schema_to_public()

    # tenant.created is event 1; each writer appended exactly one event after it.
    assert [seq for seq, *_ in rows] == list(range(1, writers + 2))
    assert sorted(label for *_, label in rows[1:]) == sorted(f"writer-{n}" for n in range(writers))
    assert len({prev for _, prev, _, _ in rows}) == len(rows)  # no fork: no two events share a parent
    for (_, _, parent, _), (_, prev, _, _) in zip(rows, rows[1:], strict=False):
        assert prev == parent
    assert report.ok and report.events == writers + 1


# --- What is stored -----------------------------------------------------------------------


def test_it_redacts_secrets_from_payloads(world: World) -> None:
    schema = world.tenant_a.schema_name
    payload = {
        "email": "someone@acme.test",
        "role": "viewer",
        "count": 3,
        "password": "hunter2hunter2",
        "api_key": "sk-live-123",
        "Token": "abc",
        "Authorization": "Basic dXNlcjpwYXNz",
        "settings": {"client_secret": "s3cr3t", "private_key": "-----BEGIN", "region": "eu"},
        "webhooks": [{"url": "https://hooks.example/x", "signature": "deadbeef"}],
        "header": "Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig",
        "note": f"the key {world.key_a} leaked",
        "empty_password": "",
    }
    event = audit_event_create(actor=SYSTEM, action="test.redacted", payload=payload, schema=schema)
    with schema_context(schema):
        stored = AuditEvent.objects.get(pk=event.pk).payload
    assert stored == {
        "email": "someone@acme.test",
        "role": "viewer",
        "count": 3,
        "password": "[REDACTED]",
        "api_key": "[REDACTED]",
        "Token": "[REDACTED]",
        "Authorization": "[REDACTED]",
        "settings": {"client_secret": "[REDACTED]", "private_key": "[REDACTED]", "region": "eu"},
        "webhooks": [{"url": "https://hooks.example/x", "signature": "[REDACTED]"}],
        "header": "[REDACTED]",
        "note": "the key [REDACTED] leaked",
        "empty_password": "",
    }
    assert world.key_a not in str(stored)
    # The hash covers the redacted payload, so the chain still verifies.
    assert audit_chain_verify(schema=schema).ok


def test_it_redacts_secrets_inside_sets(world: World) -> None:
    schema = world.tenant_a.schema_name
    payload = {"headers": {"Bearer abcdef123456", "Accept: */*"}, "keys": frozenset({f"x {world.key_a}"})}
    event = audit_event_create(actor=SYSTEM, action="test.redacted", payload=payload, schema=schema)
    with schema_context(schema):
        stored = AuditEvent.objects.get(pk=event.pk).payload
    assert stored == {"headers": ["Accept: */*", "[REDACTED]"], "keys": ["x [REDACTED]"]}
    assert audit_chain_verify(schema=schema).ok


@pytest.mark.parametrize("ip", ["2001:DB8:0:0:0:0:0:1", "2001:0db8::0001", "::FFFF:10.0.0.1", "10.0.0.1"])
def test_an_event_with_a_client_ip_in_any_notation_verifies(world: World, ip: str) -> None:
    """The ip is hashed in the form the column stores, not as the caller spelled it."""
    schema = world.tenant_a.schema_name
    with structlog.contextvars.bound_contextvars(ip=ip, request_id="req-ip-1"):
        event = audit_event_create(actor=SYSTEM, action="test.ip", schema=schema)
    with schema_context(schema):
        stored = AuditEvent.objects.get(pk=event.pk)
    assert stored.request_id == "req-ip-1"
    assert stored.ip == event.ip and stored.ip is not None and stored.ip == stored.ip.lower()
    assert audit_chain_verify(schema=schema).ok


def test_it_normalizes_payload_values_so_the_chain_still_verifies(world: World) -> None:
    schema = world.tenant_a.schema_name
    when = dt.datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=dt.UTC)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    payload = {
        "ratio": 0.1,
        "price": Decimal("12.500"),
        "when": when,
        "day": dt.date(2024, 3, 1),
        "id": ident,
        "tags": {"b", "a", "c"},
        "pair": (1, 2),
        "nul": "a\x00b",
        7: "int key",
        "big": 2**62,
        "flag": True,
        "nothing": None,
    }
    event = audit_event_create(actor=SYSTEM, action="test.normalized", payload=payload, schema=schema)
    with schema_context(schema):
        stored = AuditEvent.objects.get(pk=event.pk)
    assert stored.payload == {
        "ratio": "0.1",
        "price": "12.500",
        "when": "2024-02-29T12:30:15.123456+00:00",
        "day": "2024-03-01",
        "id": "12345678-1234-5678-1234-567812345678",
        "tags": ["a", "b", "c"],
        "pair": [1, 2],
        "nul": "ab",
        "7": "int key",
        "big": 2**62,
        "flag": True,
        "nothing": None,
    }
    assert stored.payload == event.payload
    assert event_hash(schema=schema, event=stored, prev_hash=stored.prev_hash, key=_key(stored)) == stored.hash
    assert audit_chain_verify(schema=schema).ok


def test_it_refuses_payload_values_with_no_json_form(world: World) -> None:
    schema = world.tenant_a.schema_name
    with schema_context(schema):
        before = AuditEvent.objects.count()
    with pytest.raises(TypeError, match="object"):
        audit_event_create(actor=SYSTEM, action="test.bad", payload={"thing": object()}, schema=schema)
    with schema_context(schema):
        assert AuditEvent.objects.count() == before


def test_an_events_schema_is_part_of_its_hash(world: World) -> None:
    a, b = world.tenant_a.schema_name, world.tenant_b.schema_name
    with schema_context(a):
        first = AuditEvent.objects.get(seq=1)
    assert event_hash(schema=a, event=first, prev_hash=GENESIS_HASH, key=_key(first)) == first.hash
    assert event_hash(schema=b, event=first, prev_hash=GENESIS_HASH, key=_key(first)) != first.hash
    # The same row, offered as the first event of tenant B's chain, does not verify there.
    assert verify_events(a, iter([first]), keyring=keyring()).ok
    copied = verify_events(b, iter([first]), keyring=keyring())
    assert copied.broken is not None and "content changed" in copied.broken.reason


def test_an_event_copied_into_another_tenants_table_does_not_verify(world: World) -> None:
    a, b = world.tenant_a.schema_name, world.tenant_b.schema_name
    _events(b, 1)
    with schema_context(b):
        head = AuditEvent.objects.order_by("-seq").first()
    assert head is not None
    # A forger builds the next event of B's chain with A's hash function input but B's link.
    source = _events(a, 1)[0]
    fields = {f.attname: getattr(source, f.attname) for f in AuditEvent._meta.concrete_fields if f.attname != "id"}
    fields.update(seq=head.seq + 1, prev_hash=head.hash)
    fields["hash"] = event_hash(schema=a, event=AuditEvent(**fields), prev_hash=head.hash, key=_key(source))
    with schema_context(b):
        AuditEvent.objects.create(**fields)
    report = audit_chain_verify(schema=b)
    assert report.broken is not None and report.broken.seq == head.seq + 1
    assert "content changed" in report.broken.reason


@pytest.mark.parametrize(("key", "secret"), [
    ("password", True), ("api_key", True), ("apiKey", True), ("csrfToken", True), ("access_token", True),
    ("Authorization", True), ("client_secret", True), ("private-key", True), ("SENTRY_DSN", True),
    ("otp", True), ("max_tokens", False), ("input_tokens", False), ("token_count", False),
    ("footprint", False), ("bypass", False), ("model", False),
])
def test_secret_keys_are_recognised_by_whole_words(key: str, secret: bool) -> None:
    from compliance.redaction import is_secret_key

    assert is_secret_key(key) is secret
