"""SCIM 2.0 provisioning (``tenants.scim``): users are members, groups are roles, a tenant's
SCIM token is an API key with ``scim:provision``; deprovisioning locks the person out."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django_tenants.utils import schema_context

from compliance.models import AuditEvent
from config import ratelimit
from config.errors import Forbidden
from config.redis import redis_client
from tenants.models import ApiKey, Membership, Plan, Tenant, User
from tenants.principal import Principal
from tenants.roles import Role
from tenants.scim.errors import ERROR_SCHEMA
from tenants.services.keys import api_key_create
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client
from tests.factories import MembershipFactory, PlanFactory, member_add

pytestmark = pytest.mark.django_db

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SCIM_JSON = "application/scim+json"


class Scim:
    """A client of one tenant host's ``/scim/v2`` with a bearer token."""

    def __init__(self, host: str, token: str | None) -> None:
        self.client = api_client(host, token)

    def _send(self, method: str, path: str, body: Any = None, content_type: str = SCIM_JSON) -> Any:
        data = body if isinstance(body, str | bytes) or body is None else json.dumps(body)
        response = getattr(self.client, method)(f"/scim/v2{path}", data=data, content_type=content_type) \
            if method != "get" else self.client.get(f"/scim/v2{path}")
        connection.set_schema_to_public()
        return response

    def get(self, path: str) -> Any:
        return self._send("get", path)

    def post(self, path: str, body: Any, content_type: str = SCIM_JSON) -> Any:
        return self._send("post", path, body, content_type)

    def put(self, path: str, body: Any) -> Any:
        return self._send("put", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self._send("patch", path, body)

    def delete(self, path: str) -> Any:
        return self._send("delete", path)


@pytest.fixture
def scim(world: World) -> Scim:
    """Tenant A's SCIM client, with the all-scopes key of A's owner (it holds scim:provision)."""
    return Scim(HOST_A, world.key_a)


def _new_user(email: str = "new.person@acme.test", external_id: str | None = "okta-001", **extra: Any) -> dict:
    body: dict[str, Any] = {"schemas": [USER], "userName": email, "active": True,
                            "name": {"givenName": "New", "familyName": "Person"},
                            "emails": [{"value": email, "type": "work", "primary": True}], **extra}
    if external_id is not None:
        body["externalId"] = external_id
    return body


def _scim_id(world: World, persona: str, tenant: Tenant | None = None) -> str:
    return str(Membership.objects.get(user=world.user(persona), tenant=tenant or world.tenant_a).scim_id)


def _error(response: Any, status: int, scim_type: str | None = None) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == SCIM_JSON
    body = response.json()
    assert body["schemas"] == [ERROR_SCHEMA]
    assert body["status"] == str(status)
    assert body.get("scimType") == scim_type
    assert body["detail"]
    return body


def _actions(tenant: Tenant) -> list[str]:
    with schema_context(tenant.schema_name):
        return list(AuditEvent.objects.order_by("seq").values_list("action", flat=True))


def _patch(*operations: dict) -> dict:
    return {"schemas": [PATCH], "Operations": list(operations)}


# ---- create ---------------------------------------------------------------------------------

def test_it_creates_an_account_and_a_membership(world: World, scim: Scim) -> None:
    response = scim.post("/Users", _new_user())
    assert response.status_code == 201, response.content
    assert response["Content-Type"] == SCIM_JSON
    body = response.json()
    membership = Membership.objects.select_related("user").get(scim_id=body["id"])
    assert membership.tenant_id == world.tenant_a.pk
    assert membership.role == Role.VIEWER
    assert membership.scim_external_id == "okta-001"
    assert membership.user.name == "New Person"
    assert not membership.user.has_usable_password()
    assert response["Location"] == f"http://{HOST_A}/scim/v2/Users/{body['id']}"
    assert body["userName"] == "new.person@acme.test"
    assert body["externalId"] == "okta-001"
    assert body["active"] is True
    assert body["groups"][0]["value"] == "viewer"
    assert "member.provisioned" in _actions(world.tenant_a)


def test_it_adds_an_existing_account_without_renaming_it(world: World, scim: Scim) -> None:
    outsider = world.user("outsider")
    response = scim.post("/Users", _new_user("Outsider@Globex.test", external_id="ext-9", displayName="Renamed"))
    assert response.status_code == 201, response.content
    outsider.refresh_from_db()
    assert outsider.name == "Outsider"
    assert Membership.objects.get(user=outsider, tenant=world.tenant_a).role == Role.VIEWER
    # Their membership in their own tenant is untouched.
    assert Membership.objects.get(user=outsider, tenant=world.tenant_b).role == Role.OWNER
    assert User.objects.filter(email__iexact="outsider@globex.test").count() == 1


def test_a_duplicate_user_name_is_409_uniqueness(world: World, scim: Scim) -> None:
    _error(scim.post("/Users", _new_user("Viewer@ACME.test")), 409, "uniqueness")
    assert Membership.objects.filter(tenant=world.tenant_a, user__email="viewer@acme.test").count() == 1


def test_a_duplicate_external_id_is_409_uniqueness(world: World, scim: Scim) -> None:
    assert scim.post("/Users", _new_user("a@acme.test", external_id="dup")).status_code == 201
    _error(scim.post("/Users", _new_user("b@acme.test", external_id="dup")), 409, "uniqueness")
    assert not User.objects.filter(email="b@acme.test").exists()


@pytest.mark.parametrize(("body", "content_type", "status", "scim_type"), [
    ("{not json", SCIM_JSON, 400, "invalidSyntax"),
    ("[1, 2]", SCIM_JSON, 400, "invalidSyntax"),
    (json.dumps({"userName": "x@acme.test"}), SCIM_JSON, 400, "invalidSyntax"),  # no schemas
    (json.dumps({"schemas": [USER], "userName": "not an address"}), SCIM_JSON, 400, "invalidValue"),
    (json.dumps({"schemas": [USER]}), SCIM_JSON, 400, "invalidValue"),
    (json.dumps({"schemas": [USER], "userName": "x@acme.test", "externalId": 5}), SCIM_JSON, 400, "invalidValue"),
    (json.dumps({"schemas": [USER], "userName": "x@acme.test", "active": "maybe"}), SCIM_JSON, 400, "invalidValue"),
    (json.dumps({"schemas": [USER], "userName": "x@acme.test"}), "text/plain", 415, None),
])
def test_a_malformed_create_is_refused_with_a_scim_error(world: World, scim: Scim, body: str, content_type: str,
                                                         status: int, scim_type: str | None) -> None:
    _error(scim.post("/Users", body, content_type=content_type), status, scim_type)
    assert not User.objects.filter(email="x@acme.test").exists()


def test_plan_seats_bound_provisioning(world: World, scim: Scim) -> None:
    plan = PlanFactory(max_members=5)  # acme has five members already
    Tenant.objects.filter(pk=world.tenant_a.pk).update(plan=plan)
    body = _error(scim.post("/Users", _new_user()), 409)
    assert "member" in body["detail"].lower()


# ---- read -----------------------------------------------------------------------------------

def test_it_gets_a_member_by_id(world: World, scim: Scim) -> None:
    scim_id = _scim_id(world, "operator")
    response = scim.get(f"/Users/{scim_id}")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == scim_id
    assert body["userName"] == "operator@acme.test"
    assert body["emails"] == [{"value": "operator@acme.test", "type": "work", "primary": True}]
    assert body["groups"][0]["value"] == "operator"
    assert body["meta"]["resourceType"] == "User"


def test_another_tenants_member_is_404(world: World, scim: Scim) -> None:
    other = _scim_id(world, "outsider", world.tenant_b)
    _error(scim.get(f"/Users/{other}"), 404)
    _error(scim.delete(f"/Users/{other}"), 404)
    _error(scim.patch(f"/Users/{other}", _patch({"op": "replace", "value": {"active": False}})), 404)
    _error(scim.get("/Users/not-a-uuid"), 404)
    assert Membership.objects.filter(user=world.user("outsider"), tenant=world.tenant_b).exists()


def _list(scim: Scim, query: str) -> dict:
    response = scim.get(f"/Users?{query}")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:ListResponse"]
    return body


def _names(body: dict) -> list[str]:
    return [r["userName"] for r in body["Resources"]]


def test_it_lists_members_of_this_tenant_only(world: World, scim: Scim) -> None:
    body = _list(scim, "")
    assert body["totalResults"] == 5
    assert set(_names(body)) == {f"{p}@acme.test" for p in ("owner", "admin", "operator", "viewer", "auditor")}


@pytest.mark.parametrize(("filter_", "expected"), [
    ('userName eq "VIEWER@acme.test"', ["viewer@acme.test"]),
    ('userName eq "outsider@globex.test"', []),
    ('externalId eq "ext-Op"', ["operator@acme.test"]),
    ('externalId eq "ext-op"', []),  # externalId is case-exact
    ('emails[type eq "work"].value eq "admin@acme.test"', ["admin@acme.test"]),
    ('emails[type eq "home"].value eq "admin@acme.test"', []),
    ('userName eq "admin@acme.test" or userName eq "auditor@acme.test"', ["admin@acme.test", "auditor@acme.test"]),
    ('userName sw "o" and not (userName eq "owner@acme.test")', ["operator@acme.test"]),
    ('externalId pr', ["operator@acme.test"]),
    ('urn:ietf:params:scim:schemas:core:2.0:User:userName eq "viewer@acme.test"', ["viewer@acme.test"]),
    ('active eq true and userName co "audit"', ["auditor@acme.test"]),
    ('active eq false', []),
])
def test_it_filters_members(world: World, scim: Scim, filter_: str, expected: list[str]) -> None:
    Membership.objects.filter(user=world.user("operator"), tenant=world.tenant_a).update(scim_external_id="ext-Op")
    Membership.objects.filter(user=world.user("outsider"), tenant=world.tenant_b).update(scim_external_id="ext-Op")
    body = _list(scim, f"filter={filter_}")
    assert sorted(_names(body)) == sorted(expected)
    assert body["totalResults"] == len(expected)


@pytest.mark.parametrize(("filter_", "scim_type"), [
    ('userName eq', "invalidFilter"),
    ('userName xx "a"', "invalidFilter"),
    ('((userName eq "a"', "invalidFilter"),
    ('password eq "x"', "invalidFilter"),
    ('userName gt "a"', "invalidFilter"),
    ('urn:example:other:userName eq "a"', "invalidFilter"),
])
def test_a_malformed_filter_is_400_invalid_filter(world: World, scim: Scim, filter_: str, scim_type: str) -> None:
    _error(scim.get(f"/Users?filter={filter_}"), 400, scim_type)


def test_it_pages_with_start_index_and_count(world: World, scim: Scim) -> None:
    first = _list(scim, "startIndex=1&count=2")
    second = _list(scim, "startIndex=3&count=2")
    third = _list(scim, "startIndex=5&count=2")
    assert [b["itemsPerPage"] for b in (first, second, third)] == [2, 2, 1]
    assert all(b["totalResults"] == 5 for b in (first, second, third))
    assert second["startIndex"] == 3
    names = _names(first) + _names(second) + _names(third)
    assert len(set(names)) == 5
    empty = _list(scim, "count=0")
    assert empty["totalResults"] == 5 and empty["Resources"] == []
    assert _list(scim, "startIndex=0&count=1")["startIndex"] == 1
    _error(scim.get("/Users?count=many"), 400, "invalidValue")


def _list_queries(scim: Scim, query: str) -> int:
    scim.get("/Users?count=1")  # the key's last_used_at is written on its first use only
    with CaptureQueriesContext(connection) as queries:
        response = scim.get(f"/Users?{query}")
    assert response.status_code == 200
    return len(queries)


def test_the_user_list_costs_the_same_queries_for_any_page_size(world: World, scim: Scim) -> None:
    for n in range(20):
        member_add(tenant=world.tenant_a, email=f"bulk{n}@acme.test", role=Role.VIEWER)
    small = _list_queries(scim, "count=1")
    large = _list_queries(scim, "count=25")
    filtered = _list_queries(scim, 'count=25&filter=userName sw "bulk"')
    # Two search_path switches, the host's domain (with tenant and plan), the key with its
    # person's role, the count and the page.
    assert small == large == filtered == 6


# ---- update and deprovision -----------------------------------------------------------------

def _viewer_logged_in(world: World, host: str = HOST_A) -> Client:
    client = host_client(host, world.user("viewer"))
    session = client.session
    session["tenant_schema"] = {HOST_A: world.tenant_a, HOST_B: world.tenant_b}[host].schema_name
    session.save()
    return client


def _viewer_key(world: World) -> str:
    return api_key_create(principal=Principal.system("tests", tenant=world.tenant_a), tenant=world.tenant_a,
                          name="viewer's", scopes=["tenant:read"], acting_user=world.user("viewer")).secret


@pytest.mark.parametrize("operation", [
    {"op": "replace", "value": {"active": False}},  # Okta
    {"op": "Replace", "path": "active", "value": "False"},  # Entra ID
])
def test_deactivation_locks_the_person_out(world: World, scim: Scim, operation: dict) -> None:
    viewer = world.user("viewer")
    MembershipFactory(user=viewer, tenant=world.tenant_b, role=Role.VIEWER)
    key = _viewer_key(world)
    console = _viewer_logged_in(world)
    elsewhere = _viewer_logged_in(world, HOST_B)
    assert console.get("/").status_code == 200
    assert api_client(HOST_A, key).get("/api/v1/me").status_code == 200

    response = scim.patch(f"/Users/{_scim_id(world, 'viewer')}", _patch(operation))
    assert response.status_code == 200, response.content
    assert response.json()["active"] is False

    assert not Membership.objects.filter(user=viewer, tenant=world.tenant_a).exists()
    connection.set_schema_to_public()
    assert api_client(HOST_A, key).get("/api/v1/me").status_code == 401
    assert ApiKey.objects.get(key_id=key.split("_")[1]).revoked_at is not None
    assert not Session.objects.filter(session_key=console.session.session_key).exists()
    answer = console.get("/")
    assert answer.status_code == 302 and "/accounts/login/" in answer["Location"]
    # Their membership and session in the other tenant are not SCIM's business.
    assert Session.objects.filter(session_key=elsewhere.session.session_key).exists()
    assert Membership.objects.filter(user=viewer, tenant=world.tenant_b).exists()
    actions = _actions(world.tenant_a)
    for action in ("member.removed", "api_key.revoked", "member.deprovisioned"):
        assert action in actions
    with schema_context(world.tenant_a.schema_name):
        event = AuditEvent.objects.filter(action="member.deprovisioned").latest("seq")
    assert event.payload["sessions_ended"] == 1
    assert event.payload["reason"] == "deactivated"


def test_delete_deprovisions_and_the_id_is_gone(world: World, scim: Scim) -> None:
    key = _viewer_key(world)
    scim_id = _scim_id(world, "viewer")
    response = scim.delete(f"/Users/{scim_id}")
    assert response.status_code == 204
    _error(scim.get(f"/Users/{scim_id}"), 404)
    assert api_client(HOST_A, key).get("/api/v1/me").status_code == 401
    assert User.objects.filter(pk=world.user("viewer").pk).exists()  # the account stays


def test_scim_never_deprovisions_an_owner(world: World, scim: Scim) -> None:
    scim_id = _scim_id(world, "owner")
    body = _error(scim.delete(f"/Users/{scim_id}"), 403)
    assert "owner" in body["detail"]
    _error(scim.patch(f"/Users/{scim_id}", _patch({"op": "replace", "path": "active", "value": False})), 403)
    assert Membership.objects.filter(user=world.user("owner"), tenant=world.tenant_a, role=Role.OWNER).exists()


def test_patch_changes_external_id_and_refuses_a_new_user_name(world: World, scim: Scim) -> None:
    scim_id = _scim_id(world, "operator")
    response = scim.patch(f"/Users/{scim_id}", _patch(
        {"op": "replace", "path": "externalId", "value": "entra-7"},
        {"op": "add", "value": {"displayName": "Ignored, the account has a name", "title": "Engineer"}},
    ))
    assert response.status_code == 200, response.content
    assert response.json()["externalId"] == "entra-7"
    assert world.user("operator").name == User.objects.get(pk=world.user("operator").pk).name
    assert scim.patch(f"/Users/{scim_id}", _patch({"op": "remove", "path": "externalId"})).status_code == 200
    assert Membership.objects.get(scim_id=scim_id).scim_external_id is None
    _error(scim.patch(f"/Users/{scim_id}", _patch({"op": "replace", "path": "userName", "value": "x@acme.test"})),
           400, "mutability")
    _error(scim.patch(f"/Users/{scim_id}", _patch({"op": "remove"})), 400, "noTarget")
    _error(scim.patch(f"/Users/{scim_id}", _patch({"op": "move", "path": "active"})), 400, "invalidSyntax")
    _error(scim.patch(f"/Users/{scim_id}", {"schemas": [PATCH]}), 400, "invalidSyntax")
    _error(scim.patch(f"/Users/{scim_id}", {"Operations": [{"op": "remove", "path": "externalId"}]}),
           400, "invalidSyntax")


def test_put_replaces_the_user(world: World, scim: Scim) -> None:
    created = scim.post("/Users", _new_user(external_id=None)).json()
    response = scim.put(f"/Users/{created['id']}", _new_user(external_id="put-1"))
    assert response.status_code == 200, response.content
    assert response.json()["externalId"] == "put-1"
    response = scim.put(f"/Users/{created['id']}", _new_user(external_id="put-1", active=False))
    assert response.status_code == 200
    assert not Membership.objects.filter(scim_id=created["id"]).exists()


# ---- groups ---------------------------------------------------------------------------------

def test_groups_are_the_roles(world: World, scim: Scim) -> None:
    response = scim.get("/Groups?excludedAttributes=members")
    assert response.status_code == 200, response.content
    body = response.json()
    assert [g["id"] for g in body["Resources"]] == list(Role.values)
    assert all("members" not in g for g in body["Resources"])
    admin = scim.get("/Groups/admin").json()
    assert [m["display"] for m in admin["members"]] == ["admin@acme.test"]
    found = scim.get('/Groups?filter=displayName eq "Operator"').json()
    assert [g["id"] for g in found["Resources"]] == ["operator"]
    member_of = scim.get(f'/Groups?filter=members[value eq "{_scim_id(world, "auditor")}"]').json()
    assert [g["id"] for g in member_of["Resources"]] == ["auditor"]
    _error(scim.get("/Groups/nope"), 404)
    _error(scim.get('/Groups?filter=title eq "x"'), 400, "invalidFilter")


def test_adding_to_a_group_gives_the_role_and_removing_takes_it(world: World, scim: Scim) -> None:
    viewer_id = _scim_id(world, "viewer")
    response = scim.patch("/Groups/operator", _patch({"op": "add", "path": "members", "value": [{"value": viewer_id}]}))
    assert response.status_code == 204, response.content
    assert Membership.objects.get(scim_id=viewer_id).role == Role.OPERATOR
    assert "member.role_changed" in _actions(world.tenant_a)
    response = scim.patch("/Groups/operator", _patch({"op": "remove", "path": f'members[value eq "{viewer_id}"]'}))
    assert response.status_code == 204, response.content
    assert Membership.objects.get(scim_id=viewer_id).role == Role.VIEWER


def test_replacing_a_groups_members_moves_the_others_out(world: World, scim: Scim) -> None:
    viewer_id = _scim_id(world, "viewer")
    response = scim.put("/Groups/admin", {"schemas": [GROUP], "displayName": "admin",
                                          "members": [{"value": viewer_id}]})
    assert response.status_code == 200, response.content
    assert [m["value"] for m in response.json()["members"]] == [viewer_id]
    assert Membership.objects.get(user=world.user("admin"), tenant=world.tenant_a).role == Role.VIEWER
    # Okta's form: replace without a path.
    admin_id = _scim_id(world, "admin")
    response = scim.patch("/Groups/admin", _patch({"op": "replace", "value": {
        "id": "admin", "displayName": "admin", "members": [{"value": admin_id}]}}))
    assert response.status_code == 204, response.content
    roles = dict(Membership.objects.filter(tenant=world.tenant_a).values_list("user__email", "role"))
    assert roles["admin@acme.test"] == Role.ADMIN and roles["viewer@acme.test"] == Role.VIEWER


def test_a_role_change_clips_the_members_keys(world: World, scim: Scim) -> None:
    admin = Membership.objects.select_related("user").get(user=world.user("admin"), tenant=world.tenant_a)
    key = api_key_create(principal=Principal.for_member(admin), tenant=world.tenant_a, name="admin's",
                         scopes=["members:write", "tenant:read"])
    response = scim.patch("/Groups/viewer", _patch({"op": "add", "path": "members",
                                                    "value": [{"value": str(admin.scim_id)}]}))
    assert response.status_code == 204, response.content
    assert ApiKey.objects.get(pk=key.key.pk).scopes == ["tenant:read"]


def test_groups_refuse_owner_changes_renames_and_foreign_members(world: World, scim: Scim) -> None:
    viewer_id = _scim_id(world, "viewer")
    _error(scim.patch("/Groups/owner", _patch({"op": "add", "path": "members", "value": [{"value": viewer_id}]})), 403)
    _error(scim.patch("/Groups/admin", _patch({"op": "add", "path": "members",
                                               "value": [{"value": _scim_id(world, "owner")}]})), 403)
    _error(scim.patch("/Groups/admin", _patch({"op": "replace", "path": "displayName", "value": "Admins"})),
           400, "mutability")
    other = _scim_id(world, "outsider", world.tenant_b)
    _error(scim.patch("/Groups/admin", _patch({"op": "add", "path": "members", "value": [{"value": other}]})),
           400, "invalidValue")
    _error(scim.delete("/Groups/admin"), 400, "mutability")
    _error(scim.post("/Groups", {"schemas": [GROUP], "displayName": "Admin"}), 409, "uniqueness")
    _error(scim.post("/Groups", {"schemas": [GROUP], "displayName": "Finance"}), 400, "invalidValue")
    assert Membership.objects.get(scim_id=viewer_id).role == Role.VIEWER
    assert Membership.objects.get(user=world.user("outsider"), tenant=world.tenant_b).role == Role.OWNER


# ---- authentication, scope, rate limits, discovery ------------------------------------------

def test_a_missing_or_bad_token_is_401(world: World) -> None:
    response = Scim(HOST_A, None).get("/Users")
    _error(response, 401)
    assert response["WWW-Authenticate"].startswith("Bearer")
    _error(Scim(HOST_A, "aop_aaaaaaaaaaaa_" + "x" * 43).get("/Users"), 401)
    _error(Scim(HOST_A, "not-a-key").get("/Users"), 401)


def test_another_tenants_token_is_401_on_this_host(world: World) -> None:
    _error(Scim(HOST_A, world.key_b).get("/Users"), 401)
    _error(Scim(HOST_A, world.key_b).delete(f"/Users/{_scim_id(world, 'viewer')}"), 401)
    assert Membership.objects.filter(user=world.user("viewer"), tenant=world.tenant_a).exists()


def test_a_session_alone_does_not_reach_scim(world: World) -> None:
    client = host_client(HOST_A, world.user("owner"))
    response = client.get("/scim/v2/Users")
    assert response.status_code == 401


def test_a_key_without_the_scope_is_403(world: World) -> None:
    key = api_key_create(principal=Principal.system("tests", tenant=world.tenant_a), tenant=world.tenant_a,
                         name="members only", scopes=["members:read", "members:write"]).secret
    body = _error(Scim(HOST_A, key).get("/Users"), 403)
    assert "scim:provision" in body["detail"]


def test_only_owners_and_admins_can_mint_a_scim_key(world: World) -> None:
    operator = Membership.objects.select_related("user", "tenant").get(user=world.user("operator"),
                                                                        tenant=world.tenant_a)
    with pytest.raises(Forbidden):
        api_key_create(principal=Principal.for_member(operator), tenant=world.tenant_a, name="scim",
                       scopes=["scim:provision"])


def test_a_scim_key_stops_when_its_person_is_demoted(world: World) -> None:
    admin = Membership.objects.select_related("user", "tenant").get(user=world.user("admin"), tenant=world.tenant_a)
    key = api_key_create(principal=Principal.for_member(admin), tenant=world.tenant_a, name="scim",
                         scopes=["scim:provision"]).secret
    assert Scim(HOST_A, key).get("/Users").status_code == 200
    # Demoted behind the services' back: the key's scope is read against the role at each call.
    Membership.objects.filter(pk=admin.pk).update(role=Role.OPERATOR)
    _error(Scim(HOST_A, key).get("/Users"), 403)


@pytest.fixture
def _own_rate_limit_prefix(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    prefix = f"ratelimit-test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setattr(ratelimit, "KEY_PREFIX", prefix)
    ratelimit._limiter.cache_clear()
    yield
    ratelimit._limiter.cache_clear()
    keys = list(redis_client().scan_iter(f"{prefix}:*"))
    if keys:
        redis_client().delete(*keys)


@pytest.mark.usefixtures("_own_rate_limit_prefix")
def test_the_plans_rate_limit_applies(world: World, scim: Scim) -> None:
    plan = PlanFactory(api_requests_per_minute=2)
    Tenant.objects.filter(pk=world.tenant_a.pk).update(plan=plan)
    assert scim.get("/Users").status_code == 200
    assert scim.get("/Groups").status_code == 200
    response = scim.post("/Users", _new_user())
    _error(response, 429)
    assert int(response["Retry-After"]) >= 1
    assert not User.objects.filter(email="new.person@acme.test").exists()


def test_discovery_documents(world: World, scim: Scim) -> None:
    config = scim.get("/ServiceProviderConfig")
    assert config.status_code == 200 and config["Content-Type"] == SCIM_JSON
    assert config.json()["patch"]["supported"] is True
    assert config.json()["filter"] == {"supported": True, "maxResults": 200}
    types = scim.get("/ResourceTypes").json()
    assert {t["id"] for t in types["Resources"]} == {"User", "Group"}
    assert scim.get("/ResourceTypes/User").json()["endpoint"] == "/Users"
    schema_list = scim.get("/Schemas").json()
    assert {s["id"] for s in schema_list["Resources"]} == {USER, GROUP}
    assert scim.get(f"/Schemas/{USER}").json()["name"] == "User"
    _error(scim.get("/Schemas/urn:nope"), 404)
    _error(scim.get("/Nope"), 404)
    _error(scim.post("/ServiceProviderConfig", {}), 405)
    _error(Scim(HOST_A, None).get("/ServiceProviderConfig"), 401)


def test_a_sign_in_marks_its_session_with_the_host_and_deprovisioning_ends_it(world: World, scim: Scim) -> None:
    from tests.conftest import PASSWORD

    client = host_client(HOST_A)
    response = client.post("/accounts/login/", {"login": "viewer@acme.test", "password": PASSWORD})
    connection.set_schema_to_public()
    assert response.status_code == 302, response.content
    session = Session.objects.get(session_key=client.cookies["sessionid"].value)
    assert session.get_decoded()["tenant_schema"] == world.tenant_a.schema_name
    assert scim.delete(f"/Users/{_scim_id(world, 'viewer')}").status_code == 204
    assert not Session.objects.filter(pk=session.pk).exists()


def test_a_suspended_tenant_refuses_scim(world: World, scim: Scim) -> None:
    Tenant.objects.filter(pk=world.tenant_a.pk).update(status=Tenant.Status.SUSPENDED)
    assert scim.get("/Users").status_code == 403
    assert scim.delete(f"/Users/{_scim_id(world, 'viewer')}").status_code == 403
    assert Membership.objects.filter(user=world.user("viewer"), tenant=world.tenant_a).exists()


# ---- concurrency (committed rows, a connection per thread, as the web's worker threads have) ---

def _committed_tenant(django_db_blocker: Any, *, max_members: int | None) -> Tenant:
    from tenants.services.provisioning import tenant_create

    slug = f"scimrace{uuid.uuid4().hex[:8]}"
    with django_db_blocker.unblock():
        plan = Plan.objects.create(code=slug, name="SCIM race", max_members=max_members)
        tenant = tenant_create(actor=Principal.system("tests"), slug=slug, name="SCIM race",
                               owner_email=f"owner@{slug}.test", plan=plan).tenant
        connection.set_schema_to_public()  # type: ignore[attr-defined]  # django-tenants' wrapper
    return tenant


@pytest.fixture(scope="module")
def race_tenant(django_db_setup: World, django_db_blocker: Any) -> Tenant:
    """A tenant of its own, committed, on a plan with seats (so a create takes the seat lock): the
    rows these tests commit stay out of tenant A's counts."""
    return _committed_tenant(django_db_blocker, max_members=1000)


@pytest.fixture(scope="module")
def unlimited_tenant(django_db_setup: World, django_db_blocker: Any) -> Tenant:
    """As ``race_tenant``, on a plan without a seat limit: creates take no seat lock, so nothing
    but the database's unique constraints orders two creates of one person."""
    return _committed_tenant(django_db_blocker, max_members=None)


def _two_threads(first: Any, second: Any) -> list[Any]:
    """``first()`` and ``second()`` in threads of their own, each with its own connection."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    def run(function: Any) -> Any:
        try:
            return function()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(run, first), pool.submit(run, second)]
        return [f.result(timeout=60) for f in futures]


def _lock_waiters() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                       " WHERE NOT l.granted AND d.datname = current_database()")
        return int(cursor.fetchone()[0])


def test_two_provisionings_of_the_same_new_person_at_once_give_one_member_and_a_409(unlimited_tenant: Tenant) -> None:
    """The bench (tests/bench/bench_identity.py) found 20 concurrent POST /Users of one new
    address answering 500s: each saw no account and created one; all but the first failed on the
    unique e-mail (on a plan without a seat limit; the seat lock serialises the others). The
    second must wait for the first and answer 409 ``uniqueness``."""
    import threading

    from tenants.scim.errors import ScimError
    from tenants.scim.services import scim_user_create

    email = f"same.person@{unlimited_tenant.slug}.test"
    created, second_done = threading.Event(), threading.Event()
    principal = Principal.system("tests", tenant=unlimited_tenant)

    def first() -> str:
        from django.db import transaction

        with transaction.atomic():
            scim_user_create(principal=principal, tenant=unlimited_tenant, user_name=email)
            created.set()
            # Commit only once the second is blocked on the uncommitted account (or has finished).
            for _ in range(400):
                if second_done.is_set() or _lock_waiters():
                    break
                second_done.wait(0.05)
        return "201"

    def second() -> str:
        assert created.wait(30)
        try:
            scim_user_create(principal=principal, tenant=unlimited_tenant, user_name=email.upper())
            return "201"
        except ScimError as exc:
            return f"{exc.status} {exc.scim_type}"
        finally:
            second_done.set()

    assert _two_threads(first, second) == ["201", "409 uniqueness"]
    assert committed_count(lambda: Membership.objects.filter(tenant=unlimited_tenant, user__email=email).count()) == 1
    assert committed_count(lambda: User.objects.filter(email__iexact=email).count()) == 1


@pytest.mark.parametrize("change", ["deprovision", "role_change"])
def test_member_changes_do_not_lock_the_tenant_row(race_tenant: Tenant, change: str) -> None:
    """The bench found concurrent POST /Users and PATCH active=false deadlocking (500s): the
    removal locked the tenant's row FOR UPDATE (through ``select_related``), which waits for
    every create holding the seat lock or a foreign-key lock on it, while such a create waited
    for the audit-chain lock a third request held behind the removal. Deprovisioning and role
    changes now lock only the membership: they go ahead while a create holds the seat lock."""
    import threading

    from django.db import transaction

    from tenants.scim.services import scim_user_create, scim_user_deprovision
    from tenants.services.limits import plan_limit_check
    from tenants.services.members import membership_role_change

    principal = Principal.system("tests", tenant=race_tenant)
    email = f"{change}.{uuid.uuid4().hex[:6]}@{race_tenant.slug}.test"

    def provision() -> int:
        with transaction.atomic():
            return scim_user_create(principal=principal, tenant=race_tenant, user_name=email).pk

    membership_id = committed_count(provision)
    seat_held, changed = threading.Event(), threading.Event()

    def create_in_progress() -> str:
        with transaction.atomic():
            # A create between its seat check and its commit holds the tenant row FOR NO KEY UPDATE.
            plan_limit_check(tenant=race_tenant, limit="max_members", used=lambda: 0)
            seat_held.set()
            assert changed.wait(30)
        return "created"

    def member_change() -> str:
        assert seat_held.wait(30)
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '5s'")  # a lock on the tenant row would time out
        try:
            membership = Membership.objects.get(pk=membership_id)
            if change == "deprovision":
                scim_user_deprovision(principal=principal, membership=membership, reason="deactivated")
            else:
                membership_role_change(principal=principal, membership=membership, role=Role.OPERATOR)
            return "changed"
        finally:
            changed.set()

    assert _two_threads(create_in_progress, member_change) == ["created", "changed"]
    rows = committed_count(lambda: list(Membership.objects.filter(pk=membership_id).values_list("role", flat=True)))
    assert rows == ([] if change == "deprovision" else [Role.OPERATOR])


def committed_count(function: Any) -> Any:
    """``function()`` on a connection of its own (autocommit): it sees what other threads committed."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    def run() -> Any:
        try:
            return function()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()
