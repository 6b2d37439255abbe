"""Signing in through a tenant's OpenID Connect IdP: a real ``oidc-provider-mock`` process (and
the tamper proxy of ``tests.oidc_tamper_proxy`` for tokens it cannot make), allauth's
``openid_connect`` provider doing the code flow with PKCE and a nonce, the egress guard on every
call to the IdP, and ``tenants.services.sso`` deciding memberships and roles."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from allauth.socialaccount.models import SocialAccount
from django.test import Client
from django_tenants.utils import schema_context

from compliance.models import AuditEvent
from tenants.models import Membership, Tenant, User
from tenants.principal import Principal
from tenants.services.sso import sso_settings_update
from tests.conftest import HOST_A, HOST_B, PASSWORD, World, host_client
from tests.oidc import Idp, idp, idp_allowed, sso_sign_in

__all__ = ["idp", "idp_allowed"]

pytestmark = pytest.mark.django_db

MAPPING = {"eng": "operator", "portal-admins": "admin", "auditors": "auditor"}


def sso_configure(tenant: Tenant, issuer: str, **overrides: Any) -> None:
    values: dict[str, Any] = {
        "enabled": True, "display_name": f"{tenant.name} IdP", "issuer_url": issuer,
        "client_id": f"portal-{tenant.slug}", "client_secret": "a-client-secret", "scopes": ["email", "profile"],
        "groups_claim": "groups", "role_mapping": MAPPING, "default_role": "viewer",
        "allowed_email_domains": ["acme.test"], **overrides,
    }
    sso_settings_update(principal=Principal.system("tests", tenant=tenant), tenant=tenant, **values)


def _audit(tenant: Tenant, action: str) -> list[AuditEvent]:
    with schema_context(tenant.schema_name):
        return list(AuditEvent.objects.filter(action=action).order_by("seq"))


def _signed_in_as(client: Client) -> str | None:
    response = client.get("/")
    if response.status_code != 200:
        return None
    return str(getattr(response.wsgi_request.user, "email", ""))


def test_the_first_sign_in_makes_a_member_with_the_mapped_role(world: World, idp_allowed: Idp) -> None:
    sso_configure(world.tenant_a, idp_allowed.issuer)
    idp_allowed.user_set("dana-1", email="Dana@acme.test", groups=["eng", "unmapped"], name="Dana Scully")
    client = host_client(HOST_A)
    start = client.post("/accounts/oidc/oidc-acme/login/")
    query = parse_qs(urlsplit(start["Location"]).query)
    # The code flow with PKCE (S256) and a nonce, to the IdP the tenant configured.
    assert start["Location"].startswith(f"{idp_allowed.issuer}/oauth2/authorize?")
    assert query["code_challenge_method"] == ["S256"] and query["nonce"][0] and query["state"][0]
    assert query["client_id"] == ["portal-acme"]
    callback = urlsplit(idp_allowed.authorize(start["Location"], "dana-1"))
    assert callback.path == "/accounts/oidc/oidc-acme/login/callback/"
    response = client.get(f"{callback.path}?{callback.query}")
    assert response.status_code == 302 and response["Location"] == "/", response.content[:1000]

    assert _signed_in_as(client) == "dana@acme.test"
    user = User.objects.get(email="dana@acme.test")
    assert (user.name, user.has_usable_password()) == ("Dana Scully", False)
    assert Membership.objects.get(user=user, tenant=world.tenant_a).role == "operator"
    assert SocialAccount.objects.get(user=user).provider == "oidc-acme"
    (joined,) = _audit(world.tenant_a, "member.joined")
    assert joined.payload == {"email": "dana@acme.test", "role": "operator", "via": "sso"}
    (login,) = _audit(world.tenant_a, "sso.login")
    assert login.payload["subject"] == "dana-1" and login.payload["new_account"] is True


def test_a_later_sign_in_sets_the_role_from_the_claims(world: World, idp_allowed: Idp) -> None:
    sso_configure(world.tenant_a, idp_allowed.issuer)
    idp_allowed.user_set("dana-2", email="dana2@acme.test", groups=["eng"])
    sso_sign_in(host_client(HOST_A), idp_allowed, provider_id="oidc-acme", sub="dana-2")
    idp_allowed.user_set("dana-2", email="dana2@acme.test", groups=["eng", "portal-admins"])
    sso_sign_in(host_client(HOST_A), idp_allowed, provider_id="oidc-acme", sub="dana-2")
    membership = Membership.objects.get(user__email="dana2@acme.test", tenant=world.tenant_a)
    assert membership.role == "admin"  # the strongest mapped role wins
    idp_allowed.user_set("dana-2", email="dana2@acme.test", groups=[])
    client = host_client(HOST_A)
    sso_sign_in(client, idp_allowed, provider_id="oidc-acme", sub="dana-2")
    membership.refresh_from_db()
    assert membership.role == "viewer"  # no mapped group: the default role
    assert _signed_in_as(client) == "dana2@acme.test"
    changes = [(e.payload["from"], e.payload["to"]) for e in _audit(world.tenant_a, "member.role_changed")]
    assert changes == [("operator", "admin"), ("admin", "viewer")]
    assert len(_audit(world.tenant_a, "sso.login")) == 3


def test_an_existing_member_is_linked_and_an_owner_keeps_the_role(world: World, idp_allowed: Idp) -> None:
    sso_configure(world.tenant_a, idp_allowed.issuer)
    idp_allowed.user_set("op-1", email="operator@acme.test", groups=["portal-admins"])
    idp_allowed.user_set("owner-1", email="owner@acme.test", groups=["auditors"])
    sso_sign_in(host_client(HOST_A), idp_allowed, provider_id="oidc-acme", sub="op-1")
    client = host_client(HOST_A)
    sso_sign_in(client, idp_allowed, provider_id="oidc-acme", sub="owner-1")
    assert _signed_in_as(client) == "owner@acme.test"
    roles = dict(Membership.objects.filter(tenant=world.tenant_a).values_list("user__email", "role"))
    assert (roles["operator@acme.test"], roles["owner@acme.test"]) == ("admin", "owner")
    assert SocialAccount.objects.get(uid="owner-1").user == world.user("owner")
    assert User.objects.filter(email__iexact="operator@acme.test").count() == 1


def test_no_mapped_group_and_no_default_role_refuses(world: World, idp_allowed: Idp) -> None:
    sso_configure(world.tenant_a, idp_allowed.issuer, default_role="")
    idp_allowed.user_set("nobody-1", email="nobody@acme.test", groups=["unmapped"])
    client = host_client(HOST_A)
    response = sso_sign_in(client, idp_allowed, provider_id="oidc-acme", sub="nobody-1")
    assert response.status_code == 403
    assert b"no role in this workspace" in response.content
    assert not User.objects.filter(email="nobody@acme.test").exists()
    assert _signed_in_as(client) is None


def test_an_address_outside_the_allowed_domains_is_refused(world: World, idp_allowed: Idp) -> None:
    sso_configure(world.tenant_a, idp_allowed.issuer)
    idp_allowed.user_set("eve-1", email="eve@evil.test", groups=["portal-admins"])
    client = host_client(HOST_A)
    response = sso_sign_in(client, idp_allowed, provider_id="oidc-acme", sub="eve-1")
    assert response.status_code == 403
    assert b"evil.test may not sign in" in response.content
    assert not User.objects.filter(email="eve@evil.test").exists()
    assert _signed_in_as(client) is None
    (refused,) = _audit(world.tenant_a, "sso.login_refused")
    assert refused.payload["reason"] == "sso_domain_not_allowed"


def test_a_first_sign_in_past_the_plans_seats_is_refused(world: World, idp_allowed: Idp) -> None:
    from tenants.models import Plan

    sso_configure(world.tenant_a, idp_allowed.issuer)
    seats = Membership.objects.filter(tenant=world.tenant_a).count()
    plan = Plan.objects.create(code="sso-seats", name="Seats", max_members=seats)
    world.tenant_a.plan = plan
    world.tenant_a.save(update_fields=["plan"])
    idp_allowed.user_set("seat-1", email="seat@acme.test", groups=["eng"])
    client = host_client(HOST_A)
    response = sso_sign_in(client, idp_allowed, provider_id="oidc-acme", sub="seat-1")
    assert response.status_code == 409
    assert not User.objects.filter(email="seat@acme.test").exists()
    assert _signed_in_as(client) is None
    (refused,) = _audit(world.tenant_a, "sso.login_refused")
    assert refused.payload["reason"] == "plan_limit"


def test_an_account_of_another_tenant_is_never_signed_in_by_this_idp(world: World, idp_allowed: Idp) -> None:
    # Tenant A's admin allows globex.test and its IdP claims globex's owner: refused, since
    # signing in would let A's IdP act for an account that B trusts.
    sso_configure(world.tenant_a, idp_allowed.issuer, allowed_email_domains=["acme.test", "globex.test"])
    idp_allowed.user_set("mallory-1", email="outsider@globex.test", groups=["eng"])
    client = host_client(HOST_A)
    response = sso_sign_in(client, idp_allowed, provider_id="oidc-acme", sub="mallory-1")
    assert response.status_code == 403
    assert not Membership.objects.filter(user=world.user("outsider"), tenant=world.tenant_a).exists()
    assert not SocialAccount.objects.filter(uid="mallory-1").exists()
    assert _signed_in_as(client) is None


@pytest.mark.parametrize(("mode", "error"), [
    ("bad_signature", "InvalidSignatureError"),
    ("expired", "ExpiredSignatureError"),
    ("wrong_audience", "InvalidAudienceError"),
])
def test_an_id_token_that_fails_verification_signs_nobody_in(world: World, idp_allowed: Idp, mode: str,
                                                             error: str) -> None:
    sso_configure(world.tenant_a, idp_allowed.tampered_issuer(mode))
    idp_allowed.user_set(f"{mode}-1", email=f"{mode.replace('_', '')}@acme.test", groups=["eng"])
    client = host_client(HOST_A)
    response = sso_sign_in(client, idp_allowed, provider_id="oidc-acme", sub=f"{mode}-1")
    assert response.status_code == 401 and b"Third-Party Login Failure" in response.content
    assert _signed_in_as(client) is None
    assert not User.objects.filter(email__endswith="@acme.test", memberships__isnull=True).exists()
    assert not Membership.objects.filter(tenant=world.tenant_a, user__email__startswith=mode.replace("_", "")).exists()
    assert not Membership.objects.filter(tenant=world.tenant_a, user__email__startswith="mallory").exists()
    (refused,) = _audit(world.tenant_a, "sso.login_refused")
    assert error in refused.payload["detail"]


def test_the_tamper_proxy_alone_breaks_nothing(world: World, idp_allowed: Idp) -> None:
    # The control case of the three above: a token re-signed by the proxy with a valid
    # signature, audience and expiry is accepted.
    sso_configure(world.tenant_a, idp_allowed.tampered_issuer("resigned"))
    idp_allowed.user_set("resigned-1", email="resigned@acme.test", groups=["eng"])
    client = host_client(HOST_A)
    sso_sign_in(client, idp_allowed, provider_id="oidc-acme", sub="resigned-1")
    assert _signed_in_as(client) == "resigned@acme.test"


def test_the_idp_of_tenant_a_cannot_sign_anyone_into_tenant_b(world: World, idp_allowed: Idp) -> None:
    sso_configure(world.tenant_a, idp_allowed.issuer)
    client_b = host_client(HOST_B)
    assert client_b.post("/accounts/oidc/oidc-acme/login/").status_code == 404
    idp_allowed.user_set("dana-3", email="dana3@acme.test", groups=["portal-admins"])
    client_a = host_client(HOST_A)
    start = client_a.post("/accounts/oidc/oidc-acme/login/")
    callback = urlsplit(idp_allowed.authorize(start["Location"], "dana-3"))
    # A's callback delivered on B's host: B has no such IdP.
    assert client_b.get(f"{callback.path}?{callback.query}").status_code == 404
    # B with SSO through the same IdP: A's code and state still sign nobody into B.
    sso_configure(world.tenant_b, idp_allowed.issuer)
    replay = client_b.get(f"/accounts/oidc/oidc-globex/login/callback/?{callback.query}")
    assert replay.status_code == 401 and b"Third-Party Login Failure" in replay.content
    assert _signed_in_as(client_b) is None
    assert not Membership.objects.filter(tenant=world.tenant_b, user__email="dana3@acme.test").exists()
    assert not User.objects.filter(email="dana3@acme.test").exists()


def test_the_login_page_offers_the_tenants_idp_only_on_its_host(world: World, idp_allowed: Idp) -> None:
    sso_configure(world.tenant_a, idp_allowed.issuer, display_name="Acme Okta")
    page = host_client(HOST_A).get("/accounts/login/")
    assert b"Sign in with Acme Okta" in page.content
    assert b'action="/accounts/oidc/oidc-acme/login/?process=login"' in page.content
    assert b"Sign in with" not in host_client(HOST_B).get("/accounts/login/").content


def _password_login(email: str) -> tuple[Client, Any]:
    client = host_client(HOST_A)
    return client, client.post("/accounts/login/", {"login": email, "password": PASSWORD})


def test_enforce_sso_refuses_password_sign_in_to_members_but_not_owners(world: World, idp_allowed: Idp) -> None:
    sso_configure(world.tenant_a, idp_allowed.issuer, enforce_sso=True, display_name="Acme Okta")
    client, response = _password_login("operator@acme.test")
    assert response.status_code == 200
    assert "use “Sign in with Acme Okta”" in response.content.decode()
    assert _signed_in_as(client) is None
    (refused,) = _audit(world.tenant_a, "sso.password_login_refused")
    assert refused.payload == {"email": "operator@acme.test"}
    # The owner's break-glass account still signs in with its password.
    owner, response = _password_login("owner@acme.test")
    assert response.status_code == 302
    assert _signed_in_as(owner) == "owner@acme.test"
    # A wrong password says nothing about SSO.
    _, wrong = host_client(HOST_A), host_client(HOST_A).post(
        "/accounts/login/", {"login": "operator@acme.test", "password": "not the password"})
    assert "Sign in with" not in wrong.content.decode().split("<hr>")[0]
    # And the members sign in through the IdP.
    idp_allowed.user_set("op-2", email="operator@acme.test", groups=["eng"])
    sso_client = host_client(HOST_A)
    sso_sign_in(sso_client, idp_allowed, provider_id="oidc-acme", sub="op-2")
    assert _signed_in_as(sso_client) == "operator@acme.test"


def test_without_enforce_sso_members_keep_their_passwords(world: World, idp_allowed: Idp) -> None:
    sso_configure(world.tenant_a, idp_allowed.issuer)
    client, response = _password_login("operator@acme.test")
    assert response.status_code == 302
    assert _signed_in_as(client) == "operator@acme.test"


def test_an_idp_the_egress_guard_refuses_signs_nobody_in(world: World, idp_allowed: Idp, settings: Any) -> None:
    sso_configure(world.tenant_a, idp_allowed.issuer)
    settings.EGRESS_ALLOWLIST = []  # the staff rule is gone since the issuer was saved
    client = host_client(HOST_A)
    response = client.post("/accounts/oidc/oidc-acme/login/")
    assert response.status_code == 502 and b"could not be reached" in response.content
    (refused,) = _audit(world.tenant_a, "sso.login_refused")
    assert refused.payload["reason"] == "discovery_failed"
    assert "egress guard" in refused.payload["detail"]


def test_the_login_page_lets_its_form_lead_to_the_idp(world: World, idp_allowed: Idp) -> None:
    # The "Sign in with" form posts to the portal, which redirects to the IdP: CSP's form-action
    # governs that redirect too, so the page names the IdP's origin.
    sso_configure(world.tenant_a, idp_allowed.issuer)
    policy = host_client(HOST_A).get("/accounts/login/")["Content-Security-Policy"]
    form_action = next(d for d in policy.split(";") if d.strip().startswith("form-action"))
    assert form_action.split() == ["form-action", "'self'", idp_allowed.issuer]
    other = host_client(HOST_B).get("/accounts/login/")["Content-Security-Policy"]
    assert idp_allowed.issuer not in other
