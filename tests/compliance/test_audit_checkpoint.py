"""Signed checkpoints of the audit chains' heads: ``manage.py audit_checkpoint``, its export, the
beat task, and the production check on ``AUDIT_SIGNING_KEYS``."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection
from django_tenants.utils import schema_context

from compliance.chain import checkpoint_problem
from compliance.checks import audit_signing_keys
from compliance.models import AuditEvent
from compliance.selectors import audited_schemas, checkpoints_from_json_lines
from compliance.services import audit_event_create
from compliance.signing import keyring
from compliance.tasks import audit_checkpoint
from tenants.models import AuditCheckpoint
from tenants.principal import Principal
from tests.conftest import World

SYSTEM = Principal.system("tests")


def _checkpoint(*args: str) -> tuple[str, str]:
    """Run ``audit_checkpoint`` (it must exit normally); return (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    call_command("audit_checkpoint", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def _head(schema: str) -> tuple[int, str]:
    with schema_context(schema):
        event = AuditEvent.objects.order_by("-seq").first()
    assert event is not None
    return event.seq, event.hash


def test_it_signs_one_checkpoint_per_chain_in_the_public_schema(world: World) -> None:
    audit_event_create(actor=SYSTEM, action="test.public", schema="public")
    schemas = audited_schemas()
    assert {"public", world.tenant_a.schema_name, world.tenant_b.schema_name} <= set(schemas)
    before = AuditCheckpoint.objects.count()
    # Chains whose head moved since their last checkpoint (tenants that other tests committed
    # and checkpointed already keep theirs: an unchanged head is not signed again).
    moved = [s for s in schemas if (last := AuditCheckpoint.objects.filter(schema_name=s).order_by("-id").first())
             is None or (last.seq, last.hash) != _head(s)]
    assert {"public"} <= set(moved)
    _out, err = _checkpoint()
    assert AuditCheckpoint.objects.count() == before + len(moved)
    for schema in schemas:
        latest = AuditCheckpoint.objects.filter(schema_name=schema).order_by("-id").first()
        assert latest is not None
        assert (latest.seq, latest.hash) == _head(schema)
        assert checkpoint_problem(checkpoint=latest, keyring=keyring()) is None
        assert f"{'checkpoint' if schema in moved else 'unchanged'} {schema}: seq {latest.seq}" in err
    # The table lives in the public schema only, outside every tenant's.
    with connection.cursor() as cursor:
        cursor.execute("SELECT table_schema FROM information_schema.tables "
                       "WHERE table_name = 'tenants_auditcheckpoint'")
        assert [row[0] for row in cursor.fetchall()] == ["public"]


def test_a_second_run_with_unchanged_heads_writes_nothing(world: World) -> None:
    _checkpoint()
    count = AuditCheckpoint.objects.count()
    _out, err = _checkpoint()
    assert AuditCheckpoint.objects.count() == count
    assert f"unchanged {world.tenant_a.schema_name}:" in err
    audit_event_create(actor=SYSTEM, action="test.more", schema=world.tenant_a.schema_name)
    _out, err = _checkpoint()
    assert AuditCheckpoint.objects.count() == count + 1
    assert f"checkpoint {world.tenant_a.schema_name}: seq {_head(world.tenant_a.schema_name)[0]}" in err


def test_it_exports_the_newest_checkpoint_of_each_chain_as_json_lines(world: World, tmp_path: Path) -> None:
    export = tmp_path / "checkpoints.jsonl"
    _checkpoint("--export", str(export))
    _checkpoint("--export", str(export))  # appends: the file keeps a history
    lines = export.read_text(encoding="utf-8").splitlines()
    schemas = audited_schemas()
    assert len(lines) == 2 * len([s for s in schemas if AuditCheckpoint.objects.filter(schema_name=s).exists()])
    row = json.loads(lines[0])
    assert set(row) == {"id", "schema_name", "seq", "hash", "legacy_events", "created_at", "key_id", "signature"}
    parsed = checkpoints_from_json_lines(lines)
    assert all(checkpoint_problem(checkpoint=c, keyring=keyring()) is None for c in parsed)
    stdout, _err = _checkpoint("--schema", world.tenant_a.schema_name, "--export", "-")
    [only] = checkpoints_from_json_lines(stdout.splitlines())
    assert (only.schema_name, only.seq, only.hash) == (world.tenant_a.schema_name, *_head(world.tenant_a.schema_name))


def test_it_refuses_to_sign_a_chain_that_does_not_verify(world: World) -> None:
    schema = world.tenant_a.schema_name
    _checkpoint("--schema", schema)
    audit_event_create(actor=SYSTEM, action="test.more", schema=schema)
    with schema_context(schema), connection.cursor() as cursor:
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute("UPDATE compliance_auditevent SET action = 'forged' WHERE seq = %s", [_head(schema)[0]])
    count = AuditCheckpoint.objects.filter(schema_name=schema).count()
    err = io.StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("audit_checkpoint", stdout=io.StringIO(), stderr=err)
    assert exited.value.code == 1
    assert f"BROKEN {schema}: The audit chain of {schema} is broken at seq {_head(schema)[0]}" in err.getvalue()
    assert AuditCheckpoint.objects.filter(schema_name=schema).count() == count
    # The other chains were still checkpointed.
    assert AuditCheckpoint.objects.filter(schema_name=world.tenant_b.schema_name).exists()


def test_the_beat_task_checkpoints_every_chain_once_from_the_public_schema(world: World, settings: Any) -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["audit-checkpoint"]
    assert entry["task"] == "compliance.audit_checkpoint"
    assert entry["tenant_schemas"] == ["public"]  # tenant-schemas-celery: one run, not one per tenant
    audit_event_create(actor=SYSTEM, action="test.more", schema=world.tenant_b.schema_name)
    counts = audit_checkpoint()
    assert counts["broken"] == 0 and counts["created"] >= 1
    latest = AuditCheckpoint.objects.filter(schema_name=world.tenant_b.schema_name).order_by("-seq").first()
    assert latest is not None and (latest.seq, latest.hash) == _head(world.tenant_b.schema_name)


def test_production_requires_audit_signing_keys(settings: Any) -> None:
    settings.DEVELOPMENT = False
    settings.AUDIT_SIGNING_KEYS = []
    assert [issue.id for issue in audit_signing_keys(None)] == ["compliance.E001"]
    with pytest.raises(ImproperlyConfigured, match="AUDIT_SIGNING_KEYS"):
        keyring()
    settings.AUDIT_SIGNING_KEYS = ["too-short", "k" * 40, "k" * 40]
    issues = audit_signing_keys(None)
    assert [issue.id for issue in issues] == ["compliance.E002", "compliance.W001"]
    assert "too-short" not in str(issues)  # a key is never echoed
    settings.AUDIT_SIGNING_KEYS = ["k" * 40]
    assert audit_signing_keys(None) == []
    key_id, secret = keyring().current
    assert re.fullmatch("[0-9a-f]{16}", key_id) and secret == b"k" * 40
