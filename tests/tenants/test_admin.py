"""Staff admin pages, password reset, and the production settings checks."""

from __future__ import annotations

import re

import pytest
from django.core import mail
from django.core.checks import run_checks
from django.test import Client, override_settings
from django_otp.plugins.otp_totp.models import TOTPDevice
from django_tenants.utils import schema_context

from compliance.models import AuditEvent
from tenants.models import Tenant, User
from tests.conftest import HOST_A, PASSWORD, World, host_client, verified_staff_client


@pytest.mark.parametrize("path", [
    "/admin/", "/admin/tenants/tenant/", "/admin/tenants/tenant/add/", "/admin/tenants/domain/",
    "/admin/tenants/user/", "/admin/tenants/membership/", "/admin/tenants/plan/", "/admin/tenants/apikey/",
    "/admin/compliance/auditevent/",
])
def test_verified_staff_open_every_admin_page(world: World, path: str) -> None:
    response = verified_staff_client(world).get(path)
    assert response.status_code == 200, path


@pytest.mark.parametrize("path", [
    "/admin/otp_totp/totpdevice/", "/admin/otp_static/staticdevice/", "/admin/account/emailaddress/",
    "/admin/auth/group/", "/admin/socialaccount/socialapp/", "/admin/socialaccount/socialtoken/",
])
def test_library_pages_that_change_rows_without_an_audit_event_are_not_served(world: World, path: str) -> None:
    client = verified_staff_client(world)
    assert client.get(path).status_code == 404, path
    assert f'href="{path}"' not in client.get("/admin/").content.decode()


def test_staff_without_a_verified_device_do_not_get_the_admin(world: World) -> None:
    client = host_client("localhost", world.user("staff"))
    response = client.get("/admin/tenants/tenant/")
    assert response.status_code == 302
    assert "/admin/tenants/tenant/" not in response["Location"] or "login" in response["Location"]


def test_members_who_are_not_staff_do_not_get_the_admin(world: World) -> None:
    response = host_client("localhost", world.user("owner")).get("/admin/")
    assert response.status_code == 302


def test_staff_suspend_and_resume_from_the_admin(world: World) -> None:
    client = verified_staff_client(world)
    client.post("/admin/tenants/tenant/", {"action": "suspend_selected", "_selected_action": [world.tenant_b.pk]})
    assert Tenant.objects.get(pk=world.tenant_b.pk).status == "suspended"
    client.post("/admin/tenants/tenant/", {"action": "resume_selected", "_selected_action": [world.tenant_b.pk]})
    assert Tenant.objects.get(pk=world.tenant_b.pk).status == "active"
    actions = set(AuditEvent.objects.filter(actor_type="staff").values_list("action", flat=True))
    assert {"tenant.suspended", "tenant.resumed"} <= actions


def test_staff_delete_a_tenant_only_after_typing_its_slug(world: World) -> None:
    client = verified_staff_client(world)
    url = f"/admin/tenants/tenant/{world.tenant_b.pk}/delete-tenant/"
    assert client.get(url).status_code == 200
    wrong = client.post(url, {"confirm": "GLOBEX"})
    assert wrong.status_code == 200 and Tenant.objects.filter(pk=world.tenant_b.pk).exists()
    assert client.post(url, {"confirm": "globex"}).status_code == 302
    assert not Tenant.objects.filter(pk=world.tenant_b.pk).exists()


def test_the_public_tenant_is_not_listed_and_cannot_be_deleted(world: World) -> None:
    client = verified_staff_client(world)
    public = Tenant.objects.get(schema_name="public")
    assert client.get(f"/admin/tenants/tenant/{public.pk}/delete-tenant/").status_code == 404
    assert b">public<" not in client.get("/admin/tenants/tenant/").content


def test_staff_reset_a_users_two_factor_and_it_is_audited(world: World) -> None:
    owner = world.user("owner")
    TOTPDevice.objects.create(user=owner, name="lost phone", confirmed=True)
    client = verified_staff_client(world)
    client.post("/admin/tenants/user/", {"action": "reset_two_factor", "_selected_action": [owner.pk]})
    assert not TOTPDevice.objects.filter(user=owner).exists()
    assert AuditEvent.objects.filter(action="user.2fa_reset_by_staff", target_id=str(owner.pk)).exists()


def test_password_reset_links_point_at_the_tenant_host_and_work(world: World) -> None:
    client = host_client(HOST_A)
    client.post("/accounts/password/reset/", {"email": "viewer@acme.test"})
    assert len(mail.outbox) == 1
    link = re.search(r"http://acme\.localhost\S*/accounts/password/reset/key/\S+", mail.outbox[0].body)
    assert link is not None, mail.outbox[0].body
    path = "/" + link.group(0).split("/", 3)[3]
    form = client.get(path, follow=True)
    assert form.status_code == 200
    response = client.post(form.redirect_chain[-1][0] if form.redirect_chain else path,
                           {"password1": "a brand new passphrase 7", "password2": "a brand new passphrase 7"})
    assert response.status_code == 302
    assert User.objects.get(email="viewer@acme.test").check_password("a brand new passphrase 7")


def test_production_refuses_development_defaults(world: World) -> None:
    with override_settings(DEVELOPMENT=False, DEBUG=True, SECRET_KEY="short", SESSION_COOKIE_SECURE=False):
        ids = {message.id for message in run_checks()}
    assert {"portal.E002", "portal.E004", "portal.E005"} <= ids


def test_the_litellm_price_map_must_stay_local(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "False")
    assert "portal.E001" in {message.id for message in run_checks()}


def test_staff_sign_in_with_password_and_totp_then_reach_the_admin(world: World) -> None:
    from django_otp.oath import totp

    staff = world.user("staff")
    device = TOTPDevice.objects.create(user=staff, name="phone", confirmed=True)
    client = Client(HTTP_HOST="localhost")
    to_login = client.get("/admin/", follow=True)
    assert to_login.redirect_chain[-1][0].startswith("/accounts/login/?next=/admin/")
    signed_in = client.post("/accounts/login/?next=/admin/", {"login": staff.email, "password": PASSWORD})
    assert signed_in.status_code == 302
    blocked = client.get("/admin/")
    assert blocked.status_code == 302 and blocked["Location"].startswith("/accounts/2fa/verify/")
    code = f"{totp(device.bin_key, step=device.step, t0=device.t0, digits=device.digits):06d}"
    verified = client.post(blocked["Location"], {"token": code})
    assert verified.status_code == 302 and verified["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200


def test_a_signed_in_member_gets_403_not_a_loop_from_the_admin_login(world: World) -> None:
    client = host_client("localhost", world.user("viewer"))
    assert client.get("/admin/login/").status_code == 403


def _operator_key(world: World, scopes: list[str]):  # type: ignore[no-untyped-def]
    from tenants.models import Membership
    from tenants.principal import Principal
    from tenants.services.keys import api_key_create

    operator = Membership.objects.get(user=world.user("operator"), tenant=world.tenant_a)
    return api_key_create(principal=Principal.for_member(operator), tenant=world.tenant_a, name="op",
                          scopes=scopes).key


def test_staff_role_changes_and_removals_follow_through_to_the_members_keys(world: World) -> None:
    from tenants.models import ApiKey, Membership

    key = _operator_key(world, ["kb:read", "kb:write"])
    client = verified_staff_client(world)
    membership = Membership.objects.get(user=world.user("operator"), tenant=world.tenant_a)
    url = f"/admin/tenants/membership/{membership.pk}/change/"
    form = client.get(url).context["adminform"].form
    data = {name: form[name].value() for name in form.fields}
    data.update({"role": "viewer", "created_at_0": membership.created_at.date().isoformat(),
                 "created_at_1": membership.created_at.time().strftime("%H:%M:%S"), "invited_by": ""})
    data.pop("created_at", None)
    assert client.post(url, data).status_code == 302
    assert Membership.objects.get(pk=membership.pk).role == "viewer"
    assert ApiKey.objects.get(pk=key.pk).scopes == ["kb:read"]

    assert client.post(f"/admin/tenants/membership/{membership.pk}/delete/", {"post": "yes"}).status_code == 302
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None
    with schema_context(world.tenant_a.schema_name):
        reasons = list(AuditEvent.objects.filter(target_id=key.key_id).values_list("action", "payload__reason"))
    assert ("api_key.scopes_clipped", "role_changed") in reasons and ("api_key.revoked", "member_removed") in reasons


def test_staff_deactivating_an_account_revokes_its_keys(world: World) -> None:
    from tenants.models import ApiKey

    key = _operator_key(world, ["tenant:read"])
    operator = world.user("operator")
    client = verified_staff_client(world)
    url = f"/admin/tenants/user/{operator.pk}/change/"
    form = client.get(url).context["adminform"].form
    data = {name: form[name].value() for name in form.fields if name not in ("password", "last_login", "date_joined")}
    data.update({"is_active": "", "is_staff": "", "is_superuser": "", "name": operator.name,
                 "memberships-TOTAL_FORMS": "1", "memberships-INITIAL_FORMS": "1",
                 "memberships-MIN_NUM_FORMS": "0", "memberships-MAX_NUM_FORMS": "1000",
                 "memberships-0-id": str(operator.memberships.get().pk), "memberships-0-user": str(operator.pk)})
    response = client.post(url, data)
    assert response.status_code == 302
    assert not User.objects.get(pk=operator.pk).is_active
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None
