"""Provisioning, suspending, resuming and deleting tenants."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django_tenants.utils import schema_context, schema_exists

from compliance.models import AuditEvent
from config.errors import Conflict, ValidationFailed
from tenants.admin import DomainForm, TenantAddForm
from tenants.models import Domain, Membership, Tenant, User
from tenants.principal import Principal
from tenants.roles import Role
from tenants.services.provisioning import tenant_create, tenant_delete, tenant_resume, tenant_suspend
from tests.conftest import HOST_A, World, api_client, host_client

SYSTEM = Principal.system("tests")


def _tables(schema: str) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = %s", [schema])
        return {row[0] for row in cursor.fetchall()}


def _columns(schema: str) -> set[tuple[str, str, str]]:
    """(table, column, full type with modifiers such as vector(384)) of every column."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped",
            [schema],
        )
        return set(cursor.fetchall())


def _triggers(schema: str) -> set[tuple[str, str]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND NOT t.tgisinternal",
            [schema],
        )
        return set(cursor.fetchall())


def _indexes(schema: str) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = %s", [schema])
        return {row[0].replace(f"{schema}.", "S.") for row in cursor.fetchall()}


def test_it_provisions_schema_domain_owner_and_audit(world: World) -> None:
    result = tenant_create(actor=SYSTEM, slug="initech", name="Initech", owner_email="Bill@Initech.example")
    tenant = result.tenant
    assert tenant.schema_name == "t_initech"
    assert schema_exists("t_initech")
    assert {"compliance_auditevent", "billing_usageevent", "django_migrations"} <= _tables("t_initech")
    assert ("compliance_auditevent", "compliance_auditevent_no_update_delete") in _triggers("t_initech")
    assert Domain.objects.get(tenant=tenant).domain == "initech.localhost"
    owner = User.objects.get(email="bill@initech.example")
    assert result.owner_created and not owner.has_usable_password()
    assert Membership.objects.get(tenant=tenant, user=owner).role == Role.OWNER
    with schema_context("t_initech"):
        first = AuditEvent.objects.get(seq=1)
        assert first.action == "tenant.created"
        assert first.payload["owner"] == "bill@initech.example"
    assert AuditEvent.objects.filter(action="tenant.created", target_id=str(tenant.pk)).exists()


def test_a_provisioned_schema_is_identical_to_a_migrated_one(world: World) -> None:
    tenant_create(actor=SYSTEM, slug="provisioned", name="Provisioned", owner_email="p@example.com")
    with connection.cursor() as cursor:
        cursor.execute('CREATE SCHEMA "t_migrated"')
    call_command("migrate_schemas", schema_name="t_migrated", tenant=True, interactive=False, verbosity=0)
    connection.set_schema_to_public()
    assert _tables("t_provisioned") == _tables("t_migrated")
    assert _columns("t_provisioned") == _columns("t_migrated")
    assert ("knowledge_chunk", "embedding", "vector(384)") in _columns("t_provisioned")
    assert _triggers("t_provisioned") == _triggers("t_migrated")
    assert _indexes("t_provisioned") == _indexes("t_migrated")
    assert any("hnsw" in index for index in _indexes("t_provisioned"))
    with connection.cursor() as cursor:
        cursor.execute("SELECT app, name FROM t_provisioned.django_migrations EXCEPT "
                       "SELECT app, name FROM t_migrated.django_migrations")
        assert cursor.fetchall() == []
    # migrate_schemas finds nothing to do in a provisioned schema.
    out = io.StringIO()
    call_command("migrate_schemas", schema_name="t_provisioned", tenant=True, interactive=False, stdout=out)
    connection.set_schema_to_public()
    assert "No migrations to apply" in out.getvalue()


@pytest.mark.parametrize(
    "slug",
    ["", "ab", "Acme", "-acme", "acme-", "ac--me", "1acme", "a" * 41, "acme_corp", "acmé", "acme corp", "acme.io"],
)
def test_it_rejects_invalid_slugs_and_writes_nothing(world: World, slug: str) -> None:
    before = (Tenant.objects.count(), Domain.objects.count(), User.objects.count())
    with pytest.raises(ValidationFailed) as excinfo:
        tenant_create(actor=SYSTEM, slug=slug, name="X", owner_email="x@example.com")
    assert excinfo.value.code == "invalid_slug"
    assert (Tenant.objects.count(), Domain.objects.count(), User.objects.count()) == before


@pytest.mark.parametrize("slug", ["www", "admin", "api", "public", "template", "static"])
def test_it_rejects_reserved_slugs(world: World, slug: str) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        tenant_create(actor=SYSTEM, slug=slug, name="X", owner_email="x@example.com")
    assert excinfo.value.code == "reserved_slug"
    assert not schema_exists(f"t_{slug}")


def test_it_rejects_a_taken_slug(world: World) -> None:
    with pytest.raises(Conflict) as excinfo:
        tenant_create(actor=SYSTEM, slug="acme", name="Another Acme", owner_email="x@example.com")
    assert excinfo.value.code == "slug_taken"
    assert Tenant.objects.filter(slug="acme").count() == 1


def test_it_rejects_a_host_already_routed_elsewhere(world: World) -> None:
    Domain.objects.create(domain="hooli.localhost", tenant=world.tenant_a, is_primary=False)
    with pytest.raises(Conflict) as excinfo:
        tenant_create(actor=SYSTEM, slug="hooli", name="Hooli", owner_email="x@example.com")
    assert excinfo.value.code == "domain_taken"
    assert not schema_exists("t_hooli")


@pytest.mark.parametrize("email", ["", "not-an-address", "a@b", "two@@example.com"])
def test_it_rejects_bad_owner_addresses(world: World, email: str) -> None:
    with pytest.raises(ValidationFailed):
        tenant_create(actor=SYSTEM, slug="badowner", name="X", owner_email=email)
    assert not Tenant.objects.filter(slug="badowner").exists()


def test_the_command_provisions_and_reports(world: World) -> None:
    out = io.StringIO()
    call_command("tenant_create", "umbrella", "--name", "Umbrella", "--owner-email", "ceo@umbrella.example",
                 stdout=out)
    assert "umbrella.localhost" in out.getvalue()
    assert Tenant.objects.get(slug="umbrella").schema_name == "t_umbrella"


def test_the_command_fails_clearly_on_a_bad_slug(world: World) -> None:
    with pytest.raises(CommandError, match="lower-case"):
        call_command("tenant_create", "Bad_Slug", "--name", "X", "--owner-email", "x@example.com")


def test_a_suspended_tenant_answers_403_on_console_and_api_until_resumed(world: World) -> None:
    tenant_suspend(actor=SYSTEM, tenant=world.tenant_a, reason="unpaid invoice")
    page = host_client(HOST_A, world.user("owner")).get("/members/")
    assert page.status_code == 403
    assert b"suspended" in page.content
    api = api_client(HOST_A, world.key_a).get("/api/v1/me")
    assert api.status_code == 403
    assert api.json()["error"]["code"] == "tenant_suspended"

    tenant_resume(actor=SYSTEM, tenant=world.tenant_a)
    assert api_client(HOST_A, world.key_a).get("/api/v1/me").status_code == 200
    connection.set_schema_to_public()
    actions = list(AuditEvent.objects.filter(target_type="tenant", target_id=str(world.tenant_a.pk))
                   .values_list("action", flat=True))
    assert "tenant.suspended" in actions and "tenant.resumed" in actions


def test_suspending_twice_records_one_event(world: World) -> None:
    tenant_suspend(actor=SYSTEM, tenant=world.tenant_b)
    tenant_suspend(actor=SYSTEM, tenant=world.tenant_b)
    assert AuditEvent.objects.filter(action="tenant.suspended", target_id=str(world.tenant_b.pk)).count() == 1


def test_delete_needs_the_slug_typed_and_then_drops_the_schema(world: World) -> None:
    tenant = tenant_create(actor=SYSTEM, slug="doomed", name="Doomed", owner_email="d@example.com").tenant
    with pytest.raises(ValidationFailed):
        tenant_delete(actor=SYSTEM, tenant=tenant, confirm="yes")
    assert schema_exists("t_doomed")
    tenant_delete(actor=SYSTEM, tenant=tenant, confirm="doomed")
    assert not schema_exists("t_doomed")
    assert not Tenant.objects.filter(slug="doomed").exists()
    assert not Domain.objects.filter(domain="doomed.localhost").exists()
    assert AuditEvent.objects.filter(action="tenant.deleted", payload__slug="doomed").exists()


def test_the_public_schema_cannot_be_deleted(world: World) -> None:
    public = Tenant.objects.get(schema_name="public")
    with pytest.raises(ValidationFailed):
        tenant_delete(actor=SYSTEM, tenant=public, confirm=public.slug)


def test_the_admin_forms_reject_duplicate_and_malformed_domains(world: World) -> None:
    duplicate = DomainForm(data={"domain": "acme.localhost", "tenant": world.tenant_b.pk, "is_primary": False})
    assert not duplicate.is_valid()
    assert "domain" in duplicate.errors
    malformed = DomainForm(data={"domain": "bad host!", "tenant": world.tenant_b.pk})
    assert not malformed.is_valid()
    public = DomainForm(data={"domain": "localhost", "tenant": world.tenant_b.pk})
    assert not public.is_valid()
    add = TenantAddForm(data={"slug": "www", "name": "W", "region": "local", "owner_email": "w@example.com"})
    assert not add.is_valid()
    assert "slug" in add.errors


def test_staff_provision_through_the_admin(world: World) -> None:
    from django_otp.plugins.otp_totp.models import TOTPDevice

    staff = world.user("staff")
    device = TOTPDevice.objects.create(user=staff, name="t", confirmed=True)
    client = host_client("localhost")
    client.force_login(staff)
    session = client.session
    session["otp_device_id"] = device.persistent_id
    session.save()
    response = client.post("/admin/tenants/tenant/add/", {
        "slug": "vandelay", "name": "Vandelay Industries", "region": "local", "owner_email": "art@vandelay.example",
    })
    assert response.status_code == 302, response.content[:2000]
    assert schema_exists("t_vandelay")
    event = AuditEvent.objects.filter(action="tenant.created", payload__slug="vandelay").get()
    assert event.actor_type == "staff" and event.actor_label == staff.email
