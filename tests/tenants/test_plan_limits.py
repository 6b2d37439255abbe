"""Plan limits: ``max_members``, ``max_agents`` and ``max_storage_mb`` refuse the request that
would pass them with 409 ``plan_limit`` (API) or the same message (console), and concurrent
requests cannot both take the last slot (the tenant's row is locked while counting)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client
from django_tenants.utils import schema_context

from agents.models import Agent
from agents.services import agent_create, agent_status_set
from config.errors import Conflict
from knowledge.models import Collection, Document
from knowledge.services import collection_create, document_upload
from tenants.models import Invitation, Membership, Plan, Tenant
from tenants.principal import Principal
from tenants.services.members import invitation_accept, invitation_create
from tests.conftest import World
from tests.factories import PlanFactory, UserFactory

pytestmark = pytest.mark.django_db

MIB = 1024 * 1024


def _limit(world: World, **limits: int | None) -> Plan:
    plan = PlanFactory(**limits)
    Tenant.objects.filter(pk=world.tenant_a.pk).update(plan=plan)
    return plan


def _assert_plan_limit(response: Any, limit: str) -> None:
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "plan_limit" and error["details"]["limit"] == limit


def _text(size: int, seed: str) -> bytes:
    line = f"{seed} refunds take five days. ".encode()
    return (line * (size // len(line) + 1))[:size]


# --- Agents -----------------------------------------------------------------------------------

def test_the_agent_limit_refuses_the_next_agent_and_retired_ones_free_a_slot(world: World, api_a: Client) -> None:
    _limit(world, max_agents=2)
    for slug in ("one", "two"):
        created = api_a.post("/api/v1/agents", {"slug": slug, "name": slug}, content_type="application/json")
        assert created.status_code == 201
    refused = api_a.post("/api/v1/agents", {"slug": "three", "name": "Three"}, content_type="application/json")
    _assert_plan_limit(refused, "max_agents")
    assert refused.json()["error"]["details"] == {"limit": "max_agents", "allowed": 2, "used": 2}
    with schema_context(world.tenant_a.schema_name):
        assert not Agent.objects.filter(slug="three").exists()
        agent_status_set(principal=Principal.system("tests", tenant=world.tenant_a),
                         agent=Agent.objects.get(slug="one"), status=Agent.Status.RETIRED)
    again = api_a.post("/api/v1/agents", {"slug": "three", "name": "Three"}, content_type="application/json")
    assert again.status_code == 201, again.content


def test_the_console_shows_the_agent_limit(world: World, client_a: Any) -> None:
    _limit(world, max_agents=0)
    response = client_a("operator").post("/agents/new/", {
        "slug": "blocked", "name": "Blocked", "system_prompt": "Be brief.", "tier": "standard", "temperature": "0.2",
        "max_output_tokens": "400", "history_window": "10", "retrieval_top_k": "4", "retrieval_mode": "hybrid",
        "output_format": "text"})
    assert response.status_code == 422
    assert "The plan allows 0 agents" in response.content.decode()
    with schema_context(world.tenant_a.schema_name):
        assert not Agent.objects.filter(slug="blocked").exists()


def test_no_plan_or_no_limit_means_unlimited(world: World, api_a: Client) -> None:
    _limit(world, max_agents=None, max_storage_mb=None, max_members=None)
    for n in range(3):
        assert api_a.post("/api/v1/agents", {"slug": f"free-{n}", "name": "Free"},
                          content_type="application/json").status_code == 201


# --- Storage ----------------------------------------------------------------------------------

def test_the_storage_limit_refuses_the_upload_that_would_pass_it(world: World, api_a: Client) -> None:
    _limit(world, max_storage_mb=1)
    collection = api_a.post("/api/v1/knowledge/collections", {"name": "Docs"}, content_type="application/json").json()
    path = f"/api/v1/knowledge/collections/{collection['id']}/documents"
    first = api_a.post(path, {"files": [SimpleUploadedFile("a.txt", _text(600_000, "a"))]})
    assert first.status_code == 201, first.content
    same = api_a.post(path, {"files": [SimpleUploadedFile("again.txt", _text(600_000, "a"))]})
    assert same.status_code == 200 and same.json()["duplicates"]  # a duplicate stores nothing new
    refused = api_a.post(path, {"files": [SimpleUploadedFile("b.txt", _text(600_000, "b")),
                                          SimpleUploadedFile("c.txt", _text(1000, "c"))]})
    _assert_plan_limit(refused, "max_storage_mb")
    assert refused.json()["error"]["details"]["used"] == 600_000
    jsonl = b'{"_id": "r1", "text": "' + _text(500_000, "j") + b'"}\n'
    _assert_plan_limit(api_a.post(path, {"files": [SimpleUploadedFile("records.jsonl", jsonl)]}), "max_storage_mb")
    with schema_context(world.tenant_a.schema_name):
        assert Document.objects.count() == 1  # the refused upload stored none of its files
    assert api_a.post(path, {"files": [SimpleUploadedFile("d.txt", _text(400_000, "d"))]}).status_code == 201


def test_the_console_shows_the_storage_limit(world: World, client_a: Any) -> None:
    _limit(world, max_storage_mb=0)
    with schema_context(world.tenant_a.schema_name):
        collection = collection_create(principal=Principal.system("tests", tenant=world.tenant_a), name="Docs")
    response = client_a("operator").post(f"/kb/collections/{collection.pk}/upload/",
                                         {"files": [SimpleUploadedFile("a.txt", b"Refunds take five days.")]},
                                         follow=True)
    assert "The plan allows 0 MB of documents" in response.content.decode()
    with schema_context(world.tenant_a.schema_name):
        assert not Document.objects.exists()


# --- Members ----------------------------------------------------------------------------------

def test_the_member_limit_counts_members_and_open_invitations(world: World, api_a: Client) -> None:
    members = Membership.objects.filter(tenant=world.tenant_a).count()
    _limit(world, max_members=members + 1)
    invited = api_a.post("/api/v1/members/invitations", {"email": "new@acme.test", "role": "viewer"},
                         content_type="application/json")
    assert invited.status_code == 201, invited.content
    # Inviting the same address again replaces its invitation: it takes no second seat.
    again = api_a.post("/api/v1/members/invitations", {"email": "new@acme.test", "role": "operator"},
                       content_type="application/json")
    assert again.status_code == 201, again.content
    refused = api_a.post("/api/v1/members/invitations", {"email": "other@acme.test", "role": "viewer"},
                         content_type="application/json")
    _assert_plan_limit(refused, "max_members")
    assert not Invitation.objects.filter(email="other@acme.test").exists()


def test_the_console_shows_the_member_limit(world: World, client_a: Any) -> None:
    _limit(world, max_members=Membership.objects.filter(tenant=world.tenant_a).count())
    response = client_a("owner").post("/members/", {"email": "late@acme.test", "role": "viewer"})
    assert response.status_code == 422
    assert "The plan allows" in response.content.decode()
    assert not Invitation.objects.filter(email="late@acme.test").exists()


def test_an_invitation_cannot_be_accepted_once_the_plan_is_full(world: World) -> None:
    owner = Principal.for_member(Membership.objects.select_related("user", "tenant").get(
        tenant=world.tenant_a, user=world.user("owner")))
    issued = invitation_create(principal=owner, tenant=world.tenant_a, email="joiner@acme.test", role="viewer")
    _limit(world, max_members=Membership.objects.filter(tenant=world.tenant_a).count())  # lowered since
    joiner = UserFactory(email="joiner@acme.test")
    with pytest.raises(Conflict) as refused:
        invitation_accept(tenant=Tenant.objects.get(pk=world.tenant_a.pk), token=issued.token, user=joiner)
    assert refused.value.code == "plan_limit"
    assert not Membership.objects.filter(user=joiner).exists()


# --- Concurrency: committed rows in a tenant of its own ------------------------------------------

SYSTEM = Principal.system("tests")


@pytest.fixture(scope="module")
def tight_tenant(django_db_setup: World, django_db_blocker: Any) -> Iterator[tuple[Tenant, int]]:
    """A committed tenant on a plan of 2 agents, 1 MiB of documents and 3 members (1 used), with
    one collection (its id is the second item)."""
    from tenants.services.provisioning import tenant_create

    slug = f"tight-{uuid.uuid4().hex[:10]}"
    with django_db_blocker.unblock():
        plan = Plan.objects.create(code=slug, name="Tight", max_agents=2, max_storage_mb=1, max_members=3)
        tenant = tenant_create(actor=SYSTEM, slug=slug, name="Tight", owner_email=f"owner@{slug}.test",
                               plan=plan).tenant
        with schema_context(tenant.schema_name):
            collection_id = collection_create(principal=Principal.system("tests", tenant=tenant), name="Docs").pk
        connection.set_schema_to_public()
    yield tenant, collection_id


def _race(count: int, action: Callable[[int], object]) -> list[object]:
    """Run ``action(0..count-1)`` in ``count`` threads released together, each on its own database
    connection (so each commits on its own); return each one's result or exception."""
    barrier = threading.Barrier(count)
    outcomes: list[object] = [None] * count

    def run(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            outcomes[n] = action(n)
        except BaseException as exc:  # noqa: BLE001 - returned for the assertions
            outcomes[n] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return outcomes


def _split(outcomes: list[object]) -> tuple[int, int]:
    refused = [o for o in outcomes if isinstance(o, Conflict) and o.code == "plan_limit"]
    others = [o for o in outcomes if isinstance(o, BaseException) and o not in refused]
    assert others == []
    return len(outcomes) - len(refused), len(refused)


@pytest.mark.slow
def test_concurrent_creates_cannot_pass_the_agent_limit(tight_tenant: tuple[Tenant, int],
                                                         django_db_blocker: Any) -> None:
    tenant, _ = tight_tenant

    def create(n: int) -> object:
        with schema_context(tenant.schema_name):
            return agent_create(principal=Principal.system("tests", tenant=tenant), slug=f"racer-{n}", name="Racer")

    with django_db_blocker.unblock():
        assert _split(_race(6, create)) == (2, 4)
        with schema_context(tenant.schema_name):
            assert Agent.objects.count() == 2
        connection.set_schema_to_public()


@pytest.mark.slow
def test_concurrent_uploads_cannot_pass_the_storage_limit(tight_tenant: tuple[Tenant, int],
                                                           django_db_blocker: Any) -> None:
    tenant, collection_id = tight_tenant

    def upload(n: int) -> object:
        with schema_context(tenant.schema_name):
            return document_upload(principal=Principal.system("tests", tenant=tenant),
                                   collection=Collection.objects.get(pk=collection_id), filename=f"{n}.txt",
                                   data=_text(400_000, f"racer {n}"), queue=False)

    with django_db_blocker.unblock():
        assert _split(_race(5, upload)) == (2, 3)  # 2 x 400 kB fit in 1 MiB, a third does not
        with schema_context(tenant.schema_name):
            assert Document.objects.count() == 2
        connection.set_schema_to_public()


@pytest.mark.slow
def test_concurrent_invitations_cannot_pass_the_member_limit(tight_tenant: tuple[Tenant, int],
                                                              django_db_blocker: Any) -> None:
    tenant, _ = tight_tenant

    def invite(n: int) -> object:
        return invitation_create(principal=Principal.system("tests", tenant=tenant), tenant=tenant,
                                 email=f"racer{n}@{tenant.slug}.test", role="viewer")

    with django_db_blocker.unblock():
        assert _split(_race(5, invite)) == (2, 3)  # the owner holds 1 of 3 seats
        assert Invitation.objects.filter(tenant=tenant).count() == 2
