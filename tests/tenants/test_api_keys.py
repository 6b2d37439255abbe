"""API keys: the secret shown once, hashing, scopes, expiry, revocation, bad headers."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import re

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from django_tenants.utils import schema_context

from compliance.models import AuditEvent
from config.errors import Forbidden, ValidationFailed
from tenants.models import ApiKey, Membership, User
from tenants.principal import Principal
from tenants.services.keys import api_key_create
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client


def _create(client, **body):  # type: ignore[no-untyped-def]
    body.setdefault("name", "ci")
    body.setdefault("scopes", ["tenant:read"])
    return client.post("/api/v1/api-keys", body, content_type="application/json")


def test_the_secret_is_returned_once_and_only_its_hash_is_stored(world: World, api_a) -> None:  # type: ignore[no-untyped-def]
    response = _create(api_a, name="deploy bot", scopes=["tenant:read", "audit:read"])
    assert response.status_code == 201, response.content
    body = response.json()
    secret = body["secret"]
    assert secret.startswith(f"{body['prefix']}_") and secret.startswith("aop_")
    key = ApiKey.objects.get(pk=body["id"])
    assert key.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in str(ApiKey.objects.filter(pk=key.pk).values().get())
    listing = api_a.get("/api/v1/api-keys").content.decode()
    assert secret not in listing and key.secret_hash not in listing and "secret" not in listing
    with schema_context(world.tenant_a.schema_name):
        event = AuditEvent.objects.get(action="api_key.created", target_id=key.key_id)
    assert secret not in str(event.payload)


def test_a_new_key_authenticates_and_records_last_use(world: World, api_a) -> None:  # type: ignore[no-untyped-def]
    secret = _create(api_a).json()["secret"]
    key = ApiKey.objects.get(key_id=secret.split("_")[1])
    assert key.last_used_at is None
    me = api_client(HOST_A, secret).get("/api/v1/me").json()
    assert me["permissions"] == ["tenant:read"]
    assert ApiKey.objects.get(pk=key.pk).last_used_at is not None


def test_a_key_only_reaches_what_its_scopes_allow(world: World, api_a) -> None:  # type: ignore[no-untyped-def]
    secret = _create(api_a, scopes=["tenant:read"]).json()["secret"]
    client = api_client(HOST_A, secret)
    assert client.get("/api/v1/me").status_code == 200
    for path in ("/api/v1/members", "/api/v1/api-keys", "/api/v1/audit/events", "/api/v1/usage/events"):
        response = client.get(path)
        assert response.status_code == 403, path
        assert response.json()["error"]["code"] == "permission_denied"


def test_a_revoked_key_stops_working_at_once(world: World, api_a) -> None:  # type: ignore[no-untyped-def]
    created = _create(api_a).json()
    assert api_client(HOST_A, created["secret"]).get("/api/v1/me").status_code == 200
    revoked = api_a.delete(f"/api/v1/api-keys/{created['key_id']}")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    response = api_client(HOST_A, created["secret"]).get("/api/v1/me")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "revoked_api_key"


def test_an_expired_key_is_refused(world: World) -> None:
    issued = api_key_create(principal=Principal.system("t", tenant=world.tenant_a), tenant=world.tenant_a,
                            name="short", scopes=["tenant:read"], expires_at=timezone.now() + dt.timedelta(hours=1))
    assert api_client(HOST_A, issued.secret).get("/api/v1/me").status_code == 200
    ApiKey.objects.filter(pk=issued.key.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    response = api_client(HOST_A, issued.secret).get("/api/v1/me")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "expired_api_key"


def test_a_key_works_only_on_its_own_tenants_host(world: World) -> None:
    foreign = api_client(HOST_A, world.key_b).get("/api/v1/me")
    garbage = api_client(HOST_A, world.key_b[:-4] + "AAAA").get("/api/v1/me")
    assert foreign.status_code == garbage.status_code == 401
    # Same answer as for a key that does not exist: nothing reveals that the key is valid elsewhere.
    assert foreign.json()["error"]["code"] == garbage.json()["error"]["code"] == "invalid_api_key"
    assert foreign.json()["error"]["message"] == garbage.json()["error"]["message"]
    assert api_client(HOST_B, world.key_b).get("/api/v1/me").status_code == 200


@pytest.mark.parametrize(("header", "code"), [
    ("Bearer", "malformed_authorization"),
    ("Bearer    ", "malformed_authorization"),
    ("Basic dXNlcjpwYXNz", "malformed_authorization"),
    ("Token aop_abc", "malformed_authorization"),
    ("Bearer aop_short_secret", "malformed_api_key"),
    ("Bearer sk-1234567890abcdef", "malformed_api_key"),
    ("Bearer xyz_abcdefghijkl_" + "A" * 43, "malformed_api_key"),
    ("Bearer aop_abcdefghijkl_" + "A" * 43, "invalid_api_key"),
])
def test_malformed_authorization_headers_get_a_clear_401(world: World, header: str, code: str) -> None:
    from django.test import Client

    response = Client(HTTP_HOST=HOST_A, HTTP_AUTHORIZATION=header).get("/api/v1/me")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code


def test_no_credentials_get_401_not_a_csrf_error(world: World) -> None:
    from django.test import Client

    response = Client(HTTP_HOST=HOST_A, enforce_csrf_checks=True).post(
        "/api/v1/api-keys", {"name": "x", "scopes": ["tenant:read"]}, content_type="application/json")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


def test_session_writes_need_the_csrf_token(world: World) -> None:
    client = host_client(HOST_A, world.user("owner"), enforce_csrf=True)
    response = _create(client)
    assert response.status_code == 403
    assert not ApiKey.objects.filter(tenant=world.tenant_a, name="ci").exists()
    client.get("/keys/")
    token = client.cookies["csrftoken"].value
    response = client.post("/api/v1/api-keys", {"name": "ci", "scopes": ["tenant:read"]},
                           content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 201


def test_an_operator_cannot_grant_scopes_they_do_not_hold(world: World) -> None:
    client = host_client(HOST_A, world.user("operator"))
    response = _create(client, scopes=["tenant:read", "members:write"])
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "scope_not_held"
    assert response.json()["error"]["details"] == {"scopes": ["members:write"]}
    assert _create(client, scopes=["tenant:read", "agents:write"]).status_code == 201


def test_a_key_cannot_mint_a_stronger_key(world: World, api_a) -> None:  # type: ignore[no-untyped-def]
    limited = _create(api_a, scopes=["keys:write", "tenant:read"]).json()["secret"]
    response = _create(api_client(HOST_A, limited), scopes=["members:write"])
    assert response.status_code == 403


@pytest.mark.parametrize("persona", ["viewer"])
def test_a_viewer_cannot_create_keys(world: World, persona: str) -> None:
    response = _create(host_client(HOST_A, world.user(persona)))
    assert response.status_code == 403
    page = host_client(HOST_A, world.user(persona)).post("/keys/", {"name": "x", "scopes": ["tenant:read"]})
    assert page.status_code == 403
    assert not ApiKey.objects.filter(tenant=world.tenant_a, name__in=["ci", "x"]).exists()


@pytest.mark.parametrize(("body", "code"), [
    ({"name": "", "scopes": ["tenant:read"]}, "invalid_name"),
    ({"name": "x" * 101, "scopes": ["tenant:read"]}, "validation_failed"),
    ({"name": "x", "scopes": []}, "validation_failed"),
    ({"name": "x", "scopes": ["root"]}, "invalid_scopes"),
    ({"name": "x", "scopes": ["tenant:read"], "expires_at": "2001-01-01T00:00:00Z"}, "invalid_expiry"),
    ({"name": "x", "scopes": ["tenant:read"], "expires_at": "2001-01-01T00:00:00"}, "invalid_expiry"),
    ({"name": "x", "scopes": ["tenant:read"], "expires_at": "2999-01-01T00:00:00Z"}, "invalid_expiry"),
    ({"name": "x", "scopes": "tenant:read"}, "validation_failed"),
])
def test_bad_key_requests_are_rejected_with_422(world: World, api_a, body: dict, code: str) -> None:  # type: ignore[no-untyped-def,type-arg]
    before = ApiKey.objects.count()
    response = api_a.post("/api/v1/api-keys", body, content_type="application/json")
    assert response.status_code == 422, response.content
    assert response.json()["error"]["code"] == code
    assert ApiKey.objects.count() == before


def test_an_operator_revokes_own_keys_but_not_others(world: World) -> None:
    operator = host_client(HOST_A, world.user("operator"))
    own = _create(operator).json()
    owners = api_key_create(principal=Principal.for_member(Membership.objects.get(user=world.user("owner"))),
                            tenant=world.tenant_a, name="owner's", scopes=["tenant:read"])
    refused = operator.delete(f"/api/v1/api-keys/{owners.key.key_id}")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_key_owner"
    assert operator.delete(f"/api/v1/api-keys/{own['key_id']}").status_code == 200
    assert ApiKey.objects.get(pk=owners.key.pk).revoked_at is None


def test_a_foreign_key_id_is_not_found(world: World, api_a) -> None:  # type: ignore[no-untyped-def]
    foreign = ApiKey.objects.filter(tenant=world.tenant_b).first()
    assert foreign is not None
    assert api_a.delete(f"/api/v1/api-keys/{foreign.key_id}").status_code == 404
    assert api_a.delete(f"/api/v1/api-keys/{foreign.pk}").status_code == 404
    assert ApiKey.objects.get(pk=foreign.pk).revoked_at is None


def test_the_console_shows_the_secret_once(world: World) -> None:
    client = host_client(HOST_A, world.user("owner"))
    created = client.post("/keys/", {"name": "console key", "scopes": ["tenant:read", "kb:read"],
                                     "expires_in_days": "30"})
    assert created.status_code == 201
    assert created["Cache-Control"] == "no-store"
    key = ApiKey.objects.get(name="console key")
    secrets = re.findall(r"aop_[a-z2-7]{12}_[A-Za-z0-9_-]{43}", created.content.decode())
    assert len(set(secrets)) == 1
    secret = secrets[0]
    assert hashlib.sha256(secret.encode()).hexdigest() == key.secret_hash
    assert key.expires_at is not None and key.scopes == ["kb:read", "tenant:read"]
    again = client.get("/keys/").content.decode()
    assert secret not in again and key.prefix in again


def test_the_console_revokes_with_htmx(world: World) -> None:
    client = host_client(HOST_A, world.user("owner"))
    issued = api_key_create(principal=Principal.system("t", tenant=world.tenant_a), tenant=world.tenant_a,
                            name="to revoke", scopes=["tenant:read"])
    response = client.post(f"/keys/{issued.key.key_id}/revoke/", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert b"<html" not in response.content and b"keys-section" in response.content
    assert "revoked" in response["HX-Trigger"]
    assert ApiKey.objects.get(pk=issued.key.pk).revoked_at is not None


def test_the_console_names_the_person_a_key_acts_for_and_lets_that_person_revoke_it(world: World) -> None:
    operator = world.user("operator")
    issued = api_key_create(principal=Principal.system("t", tenant=world.tenant_a), tenant=world.tenant_a,
                            name="operator's robot", scopes=["kb:read"], acting_user=operator)
    page = host_client(HOST_A, operator).get("/keys/").content.decode()
    row = page[page.index(f'id="key-{issued.key.key_id}"'):]
    row = row[:row.index("</tr>")]
    assert f'data-testid="acts-for">{operator.email}<' in row
    assert f"/keys/{issued.key.key_id}/revoke/" in row


def test_the_key_list_query_count_does_not_grow(world: World, api_a, django_assert_max_num_queries) -> None:  # type: ignore[no-untyped-def]
    with django_assert_max_num_queries(8) as few:
        api_a.get("/api/v1/api-keys")
    for n in range(20):
        api_key_create(principal=Principal.system("t", tenant=world.tenant_a), tenant=world.tenant_a,
                       name=f"bulk {n}", scopes=["tenant:read"])
    with django_assert_max_num_queries(len(few.captured_queries)):
        assert len(api_a.get("/api/v1/api-keys?limit=200").json()["items"]) >= 21
    page = host_client(HOST_A, world.user("owner"))
    with django_assert_max_num_queries(14):
        assert page.get("/keys/").status_code == 200


def test_the_command_prints_a_working_secret(world: World) -> None:
    out, err = io.StringIO(), io.StringIO()
    call_command("apikey_create", "--tenant", "acme", "--name", "cli", "--scopes", "tenant:read,audit:read",
                 stdout=out, stderr=err)
    secret = out.getvalue().strip()
    assert "shown once" in err.getvalue()
    me = api_client(HOST_A, secret).get("/api/v1/me").json()
    assert me["permissions"] == ["audit:read", "tenant:read"]
    # Without --user the key acts for the tenant's first owner.
    assert ApiKey.objects.get(key_id=secret.split("_")[1]).acting_user == world.user("owner")


def test_the_command_rejects_unknown_tenants_and_scopes(world: World) -> None:
    with pytest.raises(CommandError, match="No tenant"):
        call_command("apikey_create", "--tenant", "nope", "--name", "cli")
    with pytest.raises(CommandError, match="Unknown scopes"):
        call_command("apikey_create", "--tenant", "acme", "--name", "cli", "--scopes", "root")


# A key acts for a person: it never holds more than that person's role allows today, and it dies
# when the person leaves (issue #28, section 3).


def _member_principal(world: World, persona: str) -> Principal:
    return Principal.for_member(Membership.objects.get(user=world.user(persona), tenant=world.tenant_a))


def _new_collection(client, name: str = "Runbooks"):  # type: ignore[no-untyped-def]
    return client.post("/api/v1/knowledge/collections", {"name": name}, content_type="application/json")


def _key_events(world: World, key: ApiKey) -> list[AuditEvent]:
    with schema_context(world.tenant_a.schema_name):
        return list(AuditEvent.objects.filter(target_type="api_key", target_id=key.key_id).order_by("seq"))


def test_a_demoted_operators_kb_write_key_stops_writing(world: World) -> None:
    operator = Membership.objects.get(user=world.user("operator"), tenant=world.tenant_a)
    issued = api_key_create(principal=_member_principal(world, "operator"), tenant=world.tenant_a,
                            name="ingest bot", scopes=["kb:read", "kb:write", "tenant:read"])
    key_client = api_client(HOST_A, issued.secret)
    assert _new_collection(key_client, "Before").status_code == 201

    demoted = host_client(HOST_A, world.user("owner")).patch(
        f"/api/v1/members/{operator.pk}", {"role": "viewer"}, content_type="application/json")
    assert demoted.status_code == 200

    refused = _new_collection(key_client, "After")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    key = ApiKey.objects.get(pk=issued.key.pk)
    assert key.scopes == ["kb:read", "tenant:read"] and key.revoked_at is None
    assert key_client.get("/api/v1/me").json()["permissions"] == ["kb:read", "tenant:read"]
    clipped = [e for e in _key_events(world, key) if e.action == "api_key.scopes_clipped"]
    assert len(clipped) == 1
    assert clipped[0].payload["removed"] == ["kb:write"] and clipped[0].payload["reason"] == "role_changed"


def test_a_role_change_that_leaves_a_key_no_scope_revokes_it(world: World) -> None:
    operator = Membership.objects.get(user=world.user("operator"), tenant=world.tenant_a)
    issued = api_key_create(principal=_member_principal(world, "operator"), tenant=world.tenant_a,
                            name="writer", scopes=["agents:write", "kb:write"])
    keeps = api_key_create(principal=_member_principal(world, "operator"), tenant=world.tenant_a,
                           name="reader", scopes=["kb:read"])
    response = host_client(HOST_A, world.user("owner")).patch(
        f"/api/v1/members/{operator.pk}", {"role": "viewer"}, content_type="application/json")
    assert response.status_code == 200
    refused = api_client(HOST_A, issued.secret).get("/api/v1/knowledge/collections")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "revoked_api_key"
    assert ApiKey.objects.get(pk=keeps.key.pk).scopes == ["kb:read"]
    revoked = [e for e in _key_events(world, issued.key) if e.action == "api_key.revoked"]
    assert len(revoked) == 1 and revoked[0].payload["reason"] == "role_changed"
    assert not [e for e in _key_events(world, keeps.key) if e.action != "api_key.created"]


def test_a_key_minted_by_a_key_acts_for_the_same_human_and_dies_with_them(world: World) -> None:
    operator = Membership.objects.get(user=world.user("operator"), tenant=world.tenant_a)
    parent = api_key_create(principal=_member_principal(world, "operator"), tenant=world.tenant_a,
                            name="parent", scopes=["keys:write", "tenant:read"])
    minted = _create(api_client(HOST_A, parent.secret), name="child", scopes=["tenant:read"])
    assert minted.status_code == 201, minted.content
    child = ApiKey.objects.get(pk=minted.json()["id"])
    assert child.created_by is None
    assert api_client(HOST_A, minted.json()["secret"]).get("/api/v1/me").status_code == 200

    removed = host_client(HOST_A, world.user("owner")).delete(f"/api/v1/members/{operator.pk}")
    assert removed.status_code == 204
    for secret in (parent.secret, minted.json()["secret"]):
        response = api_client(HOST_A, secret).get("/api/v1/me")
        assert response.status_code == 401 and response.json()["error"]["code"] == "revoked_api_key"
    assert minted.json()["acting_user"] == "operator@acme.test"
    assert ApiKey.objects.get(pk=child.pk).acting_user == world.user("operator")
    for key in (parent.key, child):
        events = [e for e in _key_events(world, key) if e.action == "api_key.revoked"]
        assert len(events) == 1 and events[0].payload["reason"] == "member_removed"


def test_a_key_never_holds_more_than_its_humans_current_role(world: World) -> None:
    # Defense in depth: a role changed past the services (e.g. in SQL) still narrows the key at once.
    issued = api_key_create(principal=_member_principal(world, "operator"), tenant=world.tenant_a,
                            name="wide", scopes=["kb:read", "kb:write", "tenant:read"])
    Membership.objects.filter(user=world.user("operator"), tenant=world.tenant_a).update(role="viewer")
    client = api_client(HOST_A, issued.secret)
    assert client.get("/api/v1/me").json()["permissions"] == ["kb:read", "tenant:read"]
    assert _new_collection(client).status_code == 403


@pytest.mark.parametrize("how", ["membership_deleted", "user_deactivated"])
def test_a_key_whose_human_has_no_access_is_refused(world: World, how: str) -> None:
    issued = api_key_create(principal=_member_principal(world, "operator"), tenant=world.tenant_a,
                            name="orphan", scopes=["tenant:read"])
    if how == "membership_deleted":
        Membership.objects.filter(user=world.user("operator"), tenant=world.tenant_a).delete()
    else:
        User.objects.filter(pk=world.user("operator").pk).update(is_active=False)
    response = api_client(HOST_A, issued.secret).get("/api/v1/me")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "orphaned_api_key"


def test_every_key_records_the_human_it_acts_for(world: World, api_a) -> None:  # type: ignore[no-untyped-def]
    operator = host_client(HOST_A, world.user("operator"))
    assert _create(operator).json()["acting_user"] == "operator@acme.test"
    system = api_key_create(principal=Principal.system("t", tenant=world.tenant_a), tenant=world.tenant_a,
                            name="sys", scopes=["tenant:read"])
    # Without a named person, a system-minted key acts for the tenant's first owner.
    assert system.key.acting_user == world.user("owner")
    listed = {k["name"]: k["acting_user"] for k in api_a.get("/api/v1/api-keys?limit=200").json()["items"]}
    assert listed["sys"] == "owner@acme.test" and listed["ci"] == "operator@acme.test"


def test_the_system_cannot_mint_a_key_beyond_the_named_humans_role(world: World) -> None:
    with pytest.raises(Forbidden):
        api_key_create(principal=Principal.system("t", tenant=world.tenant_a), tenant=world.tenant_a,
                       name="x", scopes=["members:write"], acting_user=world.user("viewer"))
    with pytest.raises(ValidationFailed):
        api_key_create(principal=Principal.system("t", tenant=world.tenant_a), tenant=world.tenant_a,
                       name="x", scopes=["tenant:read"], acting_user=world.user("outsider"))


def test_the_command_names_the_human_the_key_acts_for(world: World) -> None:
    out = io.StringIO()
    call_command("apikey_create", "--tenant", "acme", "--name", "for op", "--scopes", "kb:read",
                 "--user", "OPERATOR@acme.test", stdout=out, stderr=io.StringIO())
    key = ApiKey.objects.get(key_id=out.getvalue().strip().split("_")[1])
    assert key.acting_user == world.user("operator")
    with pytest.raises(CommandError, match="cannot grant"):
        call_command("apikey_create", "--tenant", "acme", "--name", "x", "--scopes", "members:write",
                     "--user", "viewer@acme.test", stderr=io.StringIO())
    with pytest.raises(CommandError, match="not a member"):
        call_command("apikey_create", "--tenant", "acme", "--name", "x", "--user", "outsider@globex.test",
                     stderr=io.StringIO())


def test_the_migration_gives_existing_keys_their_creator_or_the_first_owner(world: World) -> None:
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before = [("tenants", "0004_egress_allow_rules")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old = executor.loader.project_state(before).apps.get_model("tenants", "ApiKey")
    made = {}
    for name, tenant, creator in (("by operator", world.tenant_a, world.user("operator")),
                                  ("by a key", world.tenant_a, None), ("globex", world.tenant_b, None)):
        made[name] = old.objects.create(tenant_id=tenant.pk, name=name, key_id=f"mig{len(made):09d}",
                                        secret_hash="0" * 64, scopes=["tenant:read"],
                                        created_by_id=creator.pk if creator else None).pk
    with connection.cursor() as cursor:  # as a real deployment would: no checks pending before migrating
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes("tenants"))
    acting = {name: ApiKey.objects.get(pk=pk).acting_user for name, pk in made.items()}
    assert acting == {"by operator": world.user("operator"), "by a key": world.user("owner"),
                      "globex": world.user("outsider")}
