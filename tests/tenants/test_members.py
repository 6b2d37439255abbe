"""Members and invitations: role rules, the last owner, invitation links."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest
from django.core import mail
from django.utils import timezone
from django_tenants.utils import schema_context

from compliance.models import AuditEvent
from tenants.models import ApiKey, Invitation, Membership, User
from tenants.principal import Principal
from tenants.roles import Role
from tenants.services.keys import api_key_create
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client


def _membership(world: World, persona: str) -> Membership:
    return Membership.objects.get(user=world.user(persona), tenant=world.tenant_a)


def _invite(client, email: str, role: str = "viewer"):  # type: ignore[no-untyped-def]
    return client.post("/api/v1/members/invitations", {"email": email, "role": role}, content_type="application/json")


def _invite_path(client, capture, email: str, role: str = "viewer") -> tuple[dict, str]:  # type: ignore[no-untyped-def,type-arg]
    """Invite through the API and return the answer and the accept link's path, read from the
    e-mail: the only place the link goes."""
    mail.outbox.clear()
    with capture(execute=True):
        response = _invite(client, email, role)
    assert response.status_code == 201, response.content
    [message] = [m for m in mail.outbox if m.to == [email.lower()]]
    link = re.search(r"http://\S+", message.body).group(0)  # type: ignore[union-attr]
    return response.json(), "/" + link.split("/", 3)[3]


def test_it_lists_members_with_roles(world: World, api_a) -> None:  # type: ignore[no-untyped-def]
    body = api_a.get("/api/v1/members").json()
    roles = {m["email"]: m["role"] for m in body["items"]}
    assert roles == {
        "owner@acme.test": "owner",
        "admin@acme.test": "admin",
        "operator@acme.test": "operator",
        "viewer@acme.test": "viewer",
        "auditor@acme.test": "auditor",
    }
    assert body["next_cursor"] is None


def test_member_list_pages_with_a_cursor(world: World, api_a) -> None:  # type: ignore[no-untyped-def]
    first = api_a.get("/api/v1/members?limit=2").json()
    second = api_a.get(f"/api/v1/members?limit=2&cursor={first['next_cursor']}").json()
    third = api_a.get(f"/api/v1/members?limit=2&cursor={second['next_cursor']}").json()
    emails = [m["email"] for page in (first, second, third) for m in page["items"]]
    assert len(emails) == 5 == len(set(emails))
    assert third["next_cursor"] is None


@pytest.mark.parametrize("persona", ["viewer", "operator", "auditor"])
def test_members_without_members_write_cannot_invite(world: World, persona: str) -> None:
    response = _invite(host_client(HOST_A, world.user(persona)), "new@example.com")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
    assert not Invitation.objects.filter(email="new@example.com").exists()


def test_viewer_cannot_invite_from_the_console(world: World) -> None:
    client = host_client(HOST_A, world.user("viewer"))
    response = client.post("/members/", {"email": "new@example.com", "role": "viewer"})
    assert response.status_code in (403, 422)
    assert not Invitation.objects.filter(email="new@example.com").exists()


def test_an_admin_invites_and_the_invitee_joins_with_a_new_account(
    world: World, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    with django_capture_on_commit_callbacks(execute=True):
        response = _invite(host_client(HOST_A, world.user("admin")), "New.Person@Example.com", "operator")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["email"] == "new.person@example.com" and body["state"] == "pending"
    assert len(mail.outbox) == 1
    link = re.search(r"http://\S+", mail.outbox[0].body).group(0)  # type: ignore[union-attr]
    path = link.split("acme.localhost", 1)[1].split(":", 1)[-1]
    path = path[path.index("/") :]

    anonymous = host_client(HOST_A)
    page = anonymous.get(path)
    assert page.status_code == 200 and b"Create your account" in page.content
    joined = anonymous.post(
        path, {"name": "New Person", "password1": "a sturdy passphrase 42", "password2": "a sturdy passphrase 42"}
    )
    assert joined.status_code == 302
    member = Membership.objects.get(user__email="new.person@example.com", tenant=world.tenant_a)
    assert member.role == Role.OPERATOR
    assert anonymous.get("/").status_code == 200
    # The link works once.
    assert host_client(HOST_A).get(path).status_code == 404
    with schema_context(world.tenant_a.schema_name):
        actions = list(AuditEvent.objects.values_list("action", flat=True))
    assert "member.invited" in actions and "member.joined" in actions


def test_an_existing_user_accepts_after_signing_in(world: World, django_capture_on_commit_callbacks) -> None:  # type: ignore[no-untyped-def]
    _, path = _invite_path(api_client(HOST_A, world.key_a), django_capture_on_commit_callbacks,
                           "outsider@globex.test", "viewer")
    outsider = host_client(HOST_A, world.user("outsider"))
    assert outsider.get("/members/").status_code == 403
    page = outsider.get(path)
    assert b"Accept" in page.content
    assert outsider.post(path).status_code == 302
    assert outsider.get("/").status_code == 200


def test_accepting_as_another_account_is_refused(world: World, django_capture_on_commit_callbacks) -> None:  # type: ignore[no-untyped-def]
    _, path = _invite_path(api_client(HOST_A, world.key_a), django_capture_on_commit_callbacks,
                           "someone.else@example.com")
    response = host_client(HOST_A, world.user("outsider")).post(path)
    assert response.status_code == 403
    assert not Membership.objects.filter(user=world.user("outsider"), tenant=world.tenant_a).exists()


def test_an_invitation_link_does_not_work_on_another_tenants_host(
    world: World, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    _, path = _invite_path(api_client(HOST_A, world.key_a), django_capture_on_commit_callbacks, "cross@example.com")
    assert host_client(HOST_B).get(path).status_code == 404


def test_an_expired_invitation_is_refused(world: World, django_capture_on_commit_callbacks) -> None:  # type: ignore[no-untyped-def]
    issued, path = _invite_path(api_client(HOST_A, world.key_a), django_capture_on_commit_callbacks,
                                "late@example.com")
    Invitation.objects.filter(pk=issued["id"]).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    assert host_client(HOST_A).get(path).status_code == 404


def test_reinviting_replaces_the_open_invitation(world: World, django_capture_on_commit_callbacks) -> None:  # type: ignore[no-untyped-def]
    client = api_client(HOST_A, world.key_a)
    first, path = _invite_path(client, django_capture_on_commit_callbacks, "twice@example.com")
    second = _invite(client, "twice@example.com", "operator").json()
    assert Invitation.objects.get(pk=first["id"]).revoked_at is not None
    open_ = client.get("/api/v1/members/invitations").json()["items"]
    assert [i["id"] for i in open_ if i["email"] == "twice@example.com"] == [second["id"]]
    assert host_client(HOST_A).get(path).status_code == 404


def test_inviting_an_existing_member_conflicts(world: World) -> None:
    response = _invite(api_client(HOST_A, world.key_a), "VIEWER@acme.test")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "already_member"


@pytest.mark.parametrize(
    ("email", "role", "status"),
    [
        ("not-an-email", "viewer", 422),
        ("x@example.com", "superuser", 422),
        ("", "viewer", 422),
    ],
)
def test_bad_invitations_are_rejected(world: World, email: str, role: str, status: int) -> None:
    response = _invite(api_client(HOST_A, world.key_a), email, role)
    assert response.status_code == status
    assert "error" in response.json()
    assert not Invitation.objects.filter(tenant=world.tenant_a).exists()


def test_an_admin_cannot_invite_an_owner_but_an_owner_can(world: World) -> None:
    assert _invite(host_client(HOST_A, world.user("admin")), "boss@example.com", "owner").status_code == 403
    assert _invite(host_client(HOST_A, world.user("owner")), "boss@example.com", "owner").status_code == 201


def test_an_api_key_acts_as_admin_and_cannot_grant_ownership(world: World) -> None:
    assert _invite(api_client(HOST_A, world.key_a), "boss@example.com", "owner").status_code == 403


def test_an_api_caller_never_receives_the_invitation_secret(
    world: World, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    # A key with members:write must not be able to turn an invitation into a human login it
    # controls: the link goes only to the invitee's mailbox.
    admin_key = api_key_create(principal=Principal.for_member(_membership(world, "admin")), tenant=world.tenant_a,
                               name="hr sync", scopes=["members:read", "members:write"])
    for n, client in enumerate((api_client(HOST_A, admin_key.secret), host_client(HOST_A, world.user("admin")))):
        email = f"new{n}@example.com"
        body, path = _invite_path(client, django_capture_on_commit_callbacks, email, "admin")
        token = path.rstrip("/").rsplit("/", 1)[-1]
        assert "accept_url" not in body and "token" not in body
        assert token not in json.dumps(body)
        listing = client.get("/api/v1/members/invitations").content.decode()
        assert token not in listing and path not in listing
    # The key's person is the inviter of record.
    assert Invitation.objects.get(email="new0@example.com").invited_by == world.user("admin")


def test_revoking_an_invitation_kills_its_link(world: World, django_capture_on_commit_callbacks) -> None:  # type: ignore[no-untyped-def]
    client = api_client(HOST_A, world.key_a)
    issued, path = _invite_path(client, django_capture_on_commit_callbacks, "revoked@example.com")
    response = client.delete(f"/api/v1/members/invitations/{issued['id']}")
    assert response.status_code == 200 and response.json()["state"] == "revoked"
    assert host_client(HOST_A).get(path).status_code == 404


def test_an_owner_changes_roles_and_it_is_audited(world: World) -> None:
    viewer = _membership(world, "viewer")
    response = host_client(HOST_A, world.user("owner")).patch(
        f"/api/v1/members/{viewer.pk}", {"role": "operator"}, content_type="application/json"
    )
    assert response.status_code == 200 and response.json()["role"] == "operator"
    with schema_context(world.tenant_a.schema_name):
        event = AuditEvent.objects.get(action="member.role_changed")
    assert event.payload == {"email": "viewer@acme.test", "from": "viewer", "to": "operator"}


def test_an_admin_cannot_touch_an_owner(world: World) -> None:
    owner = _membership(world, "owner")
    admin = host_client(HOST_A, world.user("admin"))
    assert (
        admin.patch(f"/api/v1/members/{owner.pk}", {"role": "viewer"}, content_type="application/json").status_code
        == 403
    )
    assert admin.delete(f"/api/v1/members/{owner.pk}").status_code == 403
    assert (
        admin.patch(
            f"/api/v1/members/{_membership(world, 'viewer').pk}", {"role": "owner"}, content_type="application/json"
        ).status_code
        == 403
    )
    assert _membership(world, "owner").role == Role.OWNER


def test_the_last_owner_cannot_be_demoted_or_removed(world: World) -> None:
    owner = _membership(world, "owner")
    client = host_client(HOST_A, world.user("owner"))
    demote = client.patch(f"/api/v1/members/{owner.pk}", {"role": "admin"}, content_type="application/json")
    assert demote.status_code == 409 and demote.json()["error"]["code"] == "last_owner"
    remove = client.delete(f"/api/v1/members/{owner.pk}")
    assert remove.status_code == 409 and remove.json()["error"]["code"] == "last_owner"
    assert _membership(world, "owner").role == Role.OWNER


def test_with_two_owners_one_may_step_down(world: World) -> None:
    admin = _membership(world, "admin")
    client = host_client(HOST_A, world.user("owner"))
    assert (
        client.patch(f"/api/v1/members/{admin.pk}", {"role": "owner"}, content_type="application/json").status_code
        == 200
    )
    owner = _membership(world, "owner")
    assert (
        client.patch(f"/api/v1/members/{owner.pk}", {"role": "viewer"}, content_type="application/json").status_code
        == 200
    )


def test_the_last_owner_cannot_be_removed_from_the_console(world: World) -> None:
    owner = _membership(world, "owner")
    client = host_client(HOST_A, world.user("owner"))
    response = client.post(f"/members/{owner.pk}/remove/", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert "last owner" in response["HX-Trigger"].lower()
    assert Membership.objects.filter(pk=owner.pk).exists()


def test_removing_a_member_revokes_the_keys_they_made(world: World) -> None:
    operator = _membership(world, "operator")
    issued = api_key_create(
        principal=Principal.for_member(operator), tenant=world.tenant_a, name="op key", scopes=["tenant:read"]
    )
    assert api_client(HOST_A, issued.secret).get("/api/v1/me").status_code == 200
    response = host_client(HOST_A, world.user("owner")).delete(f"/api/v1/members/{operator.pk}")
    assert response.status_code == 204
    assert ApiKey.objects.get(pk=issued.key.pk).revoked_at is not None
    assert api_client(HOST_A, issued.secret).get("/api/v1/me").status_code == 401
    assert User.objects.filter(pk=world.user("operator").pk).exists()


def test_a_foreign_member_id_is_not_found(world: World) -> None:
    foreign = Membership.objects.get(user=world.user("outsider"), tenant=world.tenant_b)
    client = api_client(HOST_A, world.key_a)
    assert client.get(f"/api/v1/members/{foreign.pk}").status_code == 404
    assert (
        client.patch(f"/api/v1/members/{foreign.pk}", {"role": "viewer"}, content_type="application/json").status_code
        == 404
    )
    assert client.delete(f"/api/v1/members/{foreign.pk}").status_code == 404
    assert Membership.objects.get(pk=foreign.pk).role == Role.OWNER


def test_an_invalid_role_is_rejected(world: World) -> None:
    viewer = _membership(world, "viewer")
    response = api_client(HOST_A, world.key_a).patch(
        f"/api/v1/members/{viewer.pk}", {"role": "god"}, content_type="application/json"
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_role"


def test_the_members_page_query_count_does_not_grow_with_members(world: World, django_assert_max_num_queries) -> None:  # type: ignore[no-untyped-def]
    from tests.factories import member_add

    client = host_client(HOST_A, world.user("owner"))
    with django_assert_max_num_queries(12) as few:
        assert client.get("/members/").status_code == 200
    for n in range(25):
        member_add(tenant=world.tenant_a, email=f"bulk{n}@acme.test", role="viewer")
    with django_assert_max_num_queries(len(few.captured_queries)):
        response = client.get("/members/")
    assert response.content.count(b"bulk") >= 25


def test_the_members_endpoint_query_count_does_not_grow_with_members(
    world: World, django_assert_max_num_queries
) -> None:  # type: ignore[no-untyped-def]
    from tests.factories import member_add

    client = api_client(HOST_A, world.key_a)
    with django_assert_max_num_queries(8) as few:
        client.get("/api/v1/members")
    for n in range(25):
        member_add(tenant=world.tenant_a, email=f"bulk{n}@acme.test", role="viewer")
    with django_assert_max_num_queries(len(few.captured_queries)):
        body = client.get("/api/v1/members?limit=100").json()
    assert len(body["items"]) == 30
