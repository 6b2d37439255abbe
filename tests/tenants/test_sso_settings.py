"""The tenant's single sign-on settings, through the API (``GET/PUT /api/v1/sso``) and the
console (``/settings/sso/``): owners and admins only, the client secret write-only and
encrypted, the issuer URL through the egress guard, every bad input a 422 naming its field, and
changes audited without the secret."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client
from django_tenants.utils import schema_context

from compliance.models import AuditEvent
from config.crypto import secret_decrypt
from tenants.models import SsoConfig
from tests.conftest import HOST_A, World, api_client, host_client

pytestmark = pytest.mark.django_db

PATH = "/api/v1/sso"
SECRET = "the-client-secret-of-acme"
ISSUER_PORT = 9443


def _put(client: Client, body: Any) -> Any:
    return client.put(PATH, data=json.dumps(body), content_type="application/json")


def _full(**overrides: Any) -> dict[str, Any]:
    return {
        "enabled": True, "display_name": "Acme Okta", "issuer_url": f"http://127.0.0.1:{ISSUER_PORT}",
        "client_id": "portal-acme", "client_secret": SECRET, "scopes": ["email", "profile", "groups"],
        "groups_claim": "groups", "role_mapping": {"eng": "operator", "portal-admins": "admin"},
        "default_role": "viewer", "allowed_email_domains": ["Acme.test", "@corp.acme.test"], "enforce_sso": False,
        **overrides,
    }


@pytest.fixture
def issuer_allowed(settings: Any) -> None:
    settings.EGRESS_ALLOWLIST = [f"127.0.0.1:{ISSUER_PORT}"]


def _audit(world: World) -> list[AuditEvent]:
    with schema_context(world.tenant_a.schema_name):
        return list(AuditEvent.objects.filter(action="tenant.sso_settings_changed").order_by("seq"))


def test_the_settings_are_set_and_read_back_without_the_secret(world: World, api_a: Client,
                                                                issuer_allowed: None) -> None:
    assert api_a.get(PATH).json() == {
        "enabled": False, "display_name": "your identity provider", "issuer_url": "", "client_id": "",
        "client_secret_set": False, "scopes": ["openid", "email", "profile"], "groups_claim": "groups",
        "role_mapping": {}, "default_role": "viewer", "allowed_email_domains": [], "enforce_sso": False,
    }
    response = _put(api_a, _full())
    assert response.status_code == 200, response.content
    expected = {
        "enabled": True, "display_name": "Acme Okta", "issuer_url": f"http://127.0.0.1:{ISSUER_PORT}",
        "client_id": "portal-acme", "client_secret_set": True, "scopes": ["openid", "email", "profile", "groups"],
        "groups_claim": "groups", "role_mapping": {"eng": "operator", "portal-admins": "admin"},
        "default_role": "viewer", "allowed_email_domains": ["acme.test", "corp.acme.test"], "enforce_sso": False,
    }
    assert response.json() == expected
    got = api_a.get(PATH)
    assert got.json() == expected
    assert SECRET.encode() not in got.content and SECRET.encode() not in response.content
    config = SsoConfig.objects.get(tenant=world.tenant_a)
    assert SECRET not in config.client_secret_encrypted and secret_decrypt(config.client_secret_encrypted) == SECRET
    (event,) = _audit(world)
    assert event.payload["changed"]["client_auth"] == "set"
    assert SECRET not in json.dumps(event.payload)


def test_a_repeated_put_changes_nothing_and_a_blank_secret_keeps_the_current_one(
        world: World, api_a: Client, issuer_allowed: None) -> None:
    _put(api_a, _full())
    body = {**_full(), "client_secret": ""}
    assert _put(api_a, body).status_code == 200
    assert len(_audit(world)) == 1
    assert _put(api_a, {"enforce_sso": True}).json()["enforce_sso"] is True
    config = SsoConfig.objects.get(tenant=world.tenant_a)
    assert (secret_decrypt(config.client_secret_encrypted), config.enforce_sso) == (SECRET, True)
    assert _audit(world)[-1].payload == {"changed": {"enforce_sso": True}}


@pytest.mark.parametrize("persona", ["viewer", "operator", "auditor"])
def test_members_below_admin_are_refused(world: World, persona: str) -> None:
    client = host_client(HOST_A, world.user(persona))
    assert client.get(PATH).status_code == 403
    assert _put(client, {"enabled": False}).status_code == 403
    assert client.get("/settings/sso/").status_code == 403


def test_an_admin_may_read_them(world: World) -> None:
    assert host_client(HOST_A, world.user("admin")).get(PATH).status_code == 200


def test_the_outsider_is_refused(world: World) -> None:
    outsider = host_client(HOST_A, world.user("outsider"))
    assert outsider.get(PATH).status_code == 403
    assert outsider.get(PATH).json()["error"]["code"] == "not_a_member"
    # Tenant B's key on tenant A's host is no key at all here.
    assert api_client(HOST_A, world.key_b).get(PATH).status_code == 401


@pytest.mark.parametrize(("body", "code", "field"), [
    ({"issuer_url": "http://127.0.0.1:9/"}, "egress_denied", "issuer_url"),
    ({"issuer_url": "http://169.254.169.254/"}, "egress_denied", "issuer_url"),
    ({"issuer_url": "ftp://idp.example.com"}, "egress_denied", "issuer_url"),
    ({"issuer_url": "https://idp.example.com/?tenant=1"}, "validation_failed", "issuer_url"),
    ({"role_mapping": {"eng": "owner"}}, "invalid_role", "role_mapping"),
    ({"role_mapping": {"eng": "wizard"}}, "invalid_role", "role_mapping"),
    ({"default_role": "owner"}, "invalid_role", "default_role"),
    ({"allowed_email_domains": ["not a domain"]}, "validation_failed", "allowed_email_domains"),
    ({"allowed_email_domains": ["localhost"]}, "validation_failed", "allowed_email_domains"),
    ({"scopes": ["email", "bad scope"]}, "validation_failed", "scopes"),
    ({"groups_claim": "has space"}, "validation_failed", "groups_claim"),
    ({"enabled": True}, "validation_failed", "issuer_url"),
    ({"enforce_sso": True}, "validation_failed", "enforce_sso"),
    ({"client_id": "x" * 256}, "validation_failed", "client_id"),
])
def test_bad_inputs_are_422_naming_the_field(world: World, api_a: Client, body: dict[str, Any], code: str,
                                             field: str) -> None:
    response = _put(api_a, body)
    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert error["details"][0]["field"] == field
    assert not _audit(world)


@pytest.mark.parametrize("body", [[], 3, {"enabled": "yes"}, {"role_mapping": ["eng"]}, {"scopes": "openid"}])
def test_malformed_bodies_are_422(api_a: Client, body: Any) -> None:
    response = _put(api_a, body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_failed"


def test_the_console_page_saves_the_settings(world: World, issuer_allowed: None) -> None:
    client = host_client(HOST_A, world.user("owner"))
    page = client.get("/settings/sso/")
    assert page.status_code == 200
    assert b"http://acme.localhost/accounts/oidc/oidc-acme/login/callback/" in page.content
    form = {
        "enabled": "on", "display_name": "Acme Okta", "issuer_url": f"http://127.0.0.1:{ISSUER_PORT}",
        "client_id": "portal-acme", "client_secret": SECRET, "scopes": "openid email, groups",
        "groups_claim": "groups", "role_mapping": "eng = operator\nportal-admins=admin\n",
        "default_role": "", "allowed_email_domains": "acme.test, corp.acme.test",
    }
    response = client.post("/settings/sso/", form)
    assert response.status_code == 302 and response["Location"] == "/settings/sso/"
    config = SsoConfig.objects.get(tenant=world.tenant_a)
    assert (config.enabled, config.default_role, config.enforce_sso) == (True, "", False)
    assert config.role_mapping == {"eng": "operator", "portal-admins": "admin"}
    assert config.scopes == ["openid", "email", "groups"]
    again = client.get("/settings/sso/")
    assert b"A secret is set." in again.content and SECRET.encode() not in again.content


def test_the_console_page_shows_the_guards_reason_in_place(world: World) -> None:
    client = host_client(HOST_A, world.user("owner"))
    response = client.post("/settings/sso/", {"issuer_url": "http://10.0.0.5/", "groups_claim": "groups"},
                           HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert b"The issuer URL is refused" in response.content and b"private (RFC 1918)" in response.content
    assert not SsoConfig.objects.filter(tenant=world.tenant_a, issuer_url__startswith="http://10.").exists()
