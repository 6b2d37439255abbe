"""Single sign-on in a real browser: Chromium on tenant A's login page, "Sign in with" the
tenant's IdP (a real ``oidc-provider-mock`` process), the IdP's own sign-in page, and back to the
console as a member with the role the IdP's groups map to.

What it commits (the SSO settings, an egress allow rule for the IdP's port, the new member) is
removed afterwards; its audit events stay, as the chain is append-only.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.agents.conftest import committed
from tests.browser.conftest import Portal
from tests.oidc import Idp, idp

__all__ = ["idp"]

pytestmark = [pytest.mark.browser, pytest.mark.django_db]


@pytest.fixture
def acme_sso(django_db_setup: Any, idp: Idp) -> Iterator[Idp]:
    """Tenant A's SSO through the mock IdP, and the staff allow rule for its port (committed)."""
    from tenants.models import EgressAllowRule, SsoConfig
    from tenants.principal import Principal
    from tenants.services.sso import sso_settings_update

    tenant = django_db_setup.tenant_a

    def setup() -> None:
        EgressAllowRule.objects.create(target="127.0.0.1", port=idp.port, description="tests: mock IdP")
        sso_settings_update(
            principal=Principal.system("tests", tenant=tenant), tenant=tenant, enabled=True,
            display_name="Acme IdP", issuer_url=idp.issuer, client_id="portal-acme", client_secret="browser-secret",
            scopes=["email", "profile"], groups_claim="groups", role_mapping={"eng": "operator"},
            default_role="viewer", allowed_email_domains=["acme.test"],
        )

    def teardown() -> None:
        SsoConfig.objects.filter(tenant=tenant).delete()
        EgressAllowRule.objects.filter(target="127.0.0.1", port=idp.port).delete()

    committed(setup)
    try:
        yield idp
    finally:
        committed(teardown)


def test_a_person_signs_in_through_the_idp_and_lands_on_the_console_with_the_mapped_role(
        page: Any, portal: Portal, acme_sso: Idp) -> None:
    from tenants.models import Membership, User

    email = f"sso-{uuid.uuid4().hex[:8]}@acme.test"
    sub = f"sub-{email}"
    acme_sso.user_set(sub, email=email, groups=["eng"], name="Sso Person")
    try:
        page.goto(portal.url(path="/accounts/login/"))
        with page.expect_navigation():
            page.get_by_role("button", name="Sign in with Acme IdP").click()
        # The IdP's own page: type the subject and sign in there.
        assert page.url.startswith(f"{acme_sso.issuer}/oauth2/authorize?")
        page.locator("input[name=sub]").fill(sub)
        with page.expect_navigation(url=portal.url(path="/")):
            page.locator("form:has(input[name=sub]) [type=submit]").first.click()
        expect(page).to_have_url(portal.url(path="/"))
        page.goto(portal.url(path="/members/"))
        row = page.locator("tr", has_text=email)
        expect(row).to_contain_text("Operator")
        roles = committed(lambda: list(Membership.objects.filter(user__email=email).values_list("role", flat=True)))
        assert roles == ["operator"]
    finally:
        committed(lambda: User.objects.filter(email=email).delete())
