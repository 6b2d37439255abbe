"""Every page and endpoint of the foundation, tried by people and programs who must not get in.

The outsider (owner of tenant B, signed in on A's host), tenant B's all-scopes API key on A's
host, staff who are not members, and anonymous visitors: each gets 401/403/404 (or the sign-in
redirect) and never a byte of tenant A's data.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django_tenants.utils import schema_context

from compliance.models import AuditEvent
from tenants.models import ApiKey, Invitation, Membership
from tenants.principal import Principal
from tenants.services.members import invitation_create
from tests.conftest import HOST_A, World, api_client, host_client

# Strings that only tenant A's data contains.
A_SECRETS = (b"acme.test", b"Acme Corp", b"viewer@", b"auditor@")


def _targets(world: World) -> dict[str, Any]:
    viewer = Membership.objects.get(user=world.user("viewer"), tenant=world.tenant_a)
    key = ApiKey.objects.filter(tenant=world.tenant_a).first()
    invitation = invitation_create(principal=Principal.system("t", tenant=world.tenant_a), tenant=world.tenant_a,
                                   email="pending@example.com", role="viewer").invitation
    with schema_context(world.tenant_a.schema_name):
        seq = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True).first()
    return {"member": viewer.pk, "key": key.key_id, "invitation": invitation.pk, "seq": seq}


PAGES = [
    ("get", "/"),
    ("get", "/members/"),
    ("post", "/members/"),
    ("post", "/members/{member}/role/"),
    ("post", "/members/{member}/remove/"),
    ("post", "/members/invitations/{invitation}/revoke/"),
    ("get", "/keys/"),
    ("post", "/keys/"),
    ("post", "/keys/{key}/revoke/"),
    ("get", "/audit/"),
    ("get", "/audit/{seq}/"),
    ("get", "/settings/"),
    ("post", "/settings/"),
    ("get", "/accounts/2fa/"),
]

ENDPOINTS = [
    ("get", "/api/v1/me"),
    ("get", "/api/v1/members"),
    ("get", "/api/v1/members/{member}"),
    ("patch", "/api/v1/members/{member}"),
    ("delete", "/api/v1/members/{member}"),
    ("get", "/api/v1/members/invitations"),
    ("post", "/api/v1/members/invitations"),
    ("delete", "/api/v1/members/invitations/{invitation}"),
    ("get", "/api/v1/api-keys"),
    ("post", "/api/v1/api-keys"),
    ("delete", "/api/v1/api-keys/{key}"),
    ("get", "/api/v1/audit/events"),
    ("get", "/api/v1/audit/events/{seq}"),
    ("get", "/api/v1/usage/events"),
]

BODIES = {
    "/members/": {"email": "intruder@example.com", "role": "owner"},
    "/members/{member}/role/": {"role": "owner"},
    "/keys/": {"name": "intruder", "scopes": ["members:write"]},
    "/settings/": {"require_2fa": "on"},
    "/api/v1/members/{member}": {"role": "owner"},
    "/api/v1/members/invitations": {"email": "intruder@example.com", "role": "owner"},
    "/api/v1/api-keys": {"name": "intruder", "scopes": ["members:write"]},
}


def _call(client: Client, method: str, template: str, targets: dict[str, Any]) -> Any:
    path = template.format(**targets)
    body = BODIES.get(template)
    if path.startswith("/api/"):
        return getattr(client, method)(path, body, content_type="application/json") if body else \
            getattr(client, method)(path)
    return getattr(client, method)(path, body or {})


def _state(world: World) -> tuple[Any, ...]:
    """A fingerprint of tenant A's control-plane rows, to prove nothing was written."""
    return (
        sorted(Membership.objects.filter(tenant=world.tenant_a).values_list("user__email", "role")),
        sorted(ApiKey.objects.filter(tenant=world.tenant_a).values_list("key_id", "revoked_at")),
        sorted(Invitation.objects.filter(tenant=world.tenant_a).values_list("email", "revoked_at")),
        world.tenant_a.__class__.objects.get(pk=world.tenant_a.pk).require_2fa,
    )


@pytest.mark.parametrize(("method", "template"), PAGES)
def test_the_outsider_is_refused_every_page(world: World, method: str, template: str) -> None:
    targets = _targets(world)
    before = _state(world)
    response = _call(host_client(HOST_A, world.user("outsider")), method, template, targets)
    assert response.status_code == 403, (template, response.status_code)
    assert not any(secret in response.content for secret in A_SECRETS)
    assert _state(world) == before


@pytest.mark.parametrize(("method", "template"), ENDPOINTS)
def test_the_outsider_session_is_refused_every_endpoint(world: World, method: str, template: str) -> None:
    targets = _targets(world)
    before = _state(world)
    response = _call(host_client(HOST_A, world.user("outsider")), method, template, targets)
    assert response.status_code == 403, (template, response.status_code)
    assert response.json()["error"]["code"] == "not_a_member"
    assert not any(secret in response.content for secret in A_SECRETS)
    assert _state(world) == before


@pytest.mark.parametrize(("method", "template"), ENDPOINTS)
def test_tenant_b_key_is_refused_every_endpoint_on_a(world: World, method: str, template: str) -> None:
    targets = _targets(world)
    before = _state(world)
    response = _call(api_client(HOST_A, world.key_b), method, template, targets)
    assert response.status_code == 401, (template, response.status_code)
    assert not any(secret in response.content for secret in A_SECRETS)
    assert _state(world) == before


@pytest.mark.parametrize(("method", "template"), ENDPOINTS)
def test_anonymous_callers_get_401_from_every_endpoint(world: World, method: str, template: str) -> None:
    response = _call(Client(HTTP_HOST=HOST_A), method, template, _targets(world))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


@pytest.mark.parametrize(("method", "template"), PAGES)
def test_anonymous_visitors_are_sent_to_sign_in(world: World, method: str, template: str) -> None:
    response = _call(Client(HTTP_HOST=HOST_A), method, template, _targets(world))
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=")


def test_staff_who_are_not_members_are_refused(world: World) -> None:
    response = host_client(HOST_A, world.user("staff")).get("/members/")
    assert response.status_code in (302, 403)
    if response.status_code == 302:
        # Staff must finish two-factor sign-in first; after it they are still not members.
        assert "/accounts/2fa/" in response["Location"]
    assert not any(secret in response.content for secret in A_SECRETS)


def test_b_sees_only_its_own_data_through_its_key(world: World) -> None:
    client = api_client("globex.localhost", world.key_b)
    members = client.get("/api/v1/members").json()["items"]
    assert [m["email"] for m in members] == ["outsider@globex.test"]
    keys = client.get("/api/v1/api-keys").json()["items"]
    assert all(k["name"].startswith("globex") for k in keys)
    events = client.get("/api/v1/audit/events?limit=200").content
    assert not any(secret in events for secret in A_SECRETS)


@pytest.mark.parametrize(("persona", "path", "allowed"), [
    ("viewer", "/keys/", False), ("viewer", "/audit/", False), ("viewer", "/settings/", False),
    ("viewer", "/members/", True), ("auditor", "/audit/", True), ("auditor", "/keys/", True),
    ("operator", "/keys/", True), ("operator", "/audit/", False), ("admin", "/settings/", False),
    ("admin", "/audit/", True), ("owner", "/settings/", True),
])
def test_roles_open_the_pages_their_permissions_allow(world: World, persona: str, path: str, allowed: bool) -> None:
    response = host_client(HOST_A, world.user(persona)).get(path)
    assert response.status_code == (200 if allowed else 403)


@pytest.mark.parametrize(("persona", "visible", "hidden"), [
    ("viewer", ["Members"], ["API keys", "Audit", "Settings"]),
    ("auditor", ["Members", "Audit", "API keys"], ["Settings"]),
    ("owner", ["Members", "API keys", "Audit", "Settings"], []),
])
def test_navigation_shows_only_permitted_sections(world: World, persona: str, visible: list[str],
                                                   hidden: list[str]) -> None:
    html = host_client(HOST_A, world.user(persona)).get("/").content.decode()
    nav = html.split('aria-label="Console"', 1)[1].split("</nav>", 1)[0]
    for label in visible:
        assert f">{label}</a>" in nav
    for label in hidden:
        assert f">{label}</a>" not in nav


def test_an_unknown_tenant_host_is_not_found(world: World) -> None:
    assert Client(HTTP_HOST="nobody.localhost").get("/").status_code == 404
    api = Client(HTTP_HOST="nobody.localhost").get("/api/v1/me")
    assert api.status_code == 404 and api.json()["error"]["code"] == "not_found"


def test_a_host_outside_allowed_hosts_is_refused(world: World) -> None:
    assert Client(HTTP_HOST="evil.example.com").get("/").status_code in (400, 404)


def test_the_public_host_serves_staff_pages_not_tenant_pages(world: World) -> None:
    client = Client(HTTP_HOST="localhost")
    assert client.get("/").status_code == 200
    assert client.get("/admin/").status_code == 302
    assert client.get("/members/").status_code == 404
