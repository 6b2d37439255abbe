"""The approvals REST API and services: list, read, approve, reject, a decision once (also under
two approvers at once), separation of duties, the permission matrix, other tenants, expiry."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
from django.db import connection, connections
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_tenants.utils import schema_context

from agents import approval_services
from agents.models import Agent, ApprovalRequest, ChatSession, Tool, ToolCall, Turn
from agents.tasks import turn_resume_task
from compliance.models import AuditEvent
from tenants.principal import Principal
from tenants.roles import Role
from tenants.services.keys import api_key_create
from tests.agents.approval_rows import key_id_of, key_principal, member_principal, park, published_agent
from tests.conftest import HOST_A, HOST_B, PASSWORD, World, api_client, host_client
from tests.factories import member_add

pytestmark = pytest.mark.django_db


@pytest.fixture
def approver(world: World) -> Any:
    """An ``approver`` member of tenant A (this test only)."""
    return member_add(tenant=world.tenant_a, email="approver@acme.test", role=Role.APPROVER, password=PASSWORD).user


@pytest.fixture
def resumes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[Any], str]]:
    """The resume tasks sent (args, queue), captured at the broker boundary."""
    sent: list[tuple[list[Any], str]] = []
    lock = threading.Lock()

    def apply_async(args: list[Any], queue: str, **kwargs: Any) -> None:
        with lock:
            sent.append((list(args), queue))

    monkeypatch.setattr(turn_resume_task, "apply_async", apply_async)
    return sent


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Events published to session groups."""
    out: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(approval_services.events, "publish", lambda group, event, **kw: out.append((group, event)))
    return out


def _parked(world: World, persona: str = "operator", **kwargs: Any) -> ApprovalRequest:
    approval = park(tenant=world.tenant_a, requester=member_principal(world.tenant_a, world.user(persona)), **kwargs)
    connection.set_schema_to_public()
    return approval


def _post(client: Client, path: str, body: dict[str, Any] | None = None) -> Any:
    return client.post(path, body if body is not None else {}, content_type="application/json")


def _member(world: World, user: Any) -> Client:
    return host_client(HOST_A, user)


def test_a_pending_request_is_listed_read_and_approved(
    world: World, approver: Any, resumes: Any, django_capture_on_commit_callbacks: Any, published: Any
) -> None:
    approval = _parked(world)
    client = _member(world, approver)
    listed = client.get("/api/v1/approvals?status=pending").json()
    assert [a["id"] for a in listed["items"]] == [approval.pk]
    item = listed["items"][0]
    assert item["tool"] == "create_ticket" and item["side_effect"] == "write" and item["status"] == "pending"
    assert item["arguments"] == {"title": "Laptop screen broken", "priority": "high"}
    assert item["parameters"]["properties"]["title"]["description"] == "One line saying what is wrong"
    assert item["requested_by"] == "operator@acme.test"
    assert item["requested_by_user_id"] == world.user("operator").pk and item["requested_by_api_key_id"] is None
    assert item["excerpt"] == [{"role": "user", "content": "My screen is broken"}]
    assert client.get(f"/api/v1/approvals/{approval.pk}").json() == item

    with django_capture_on_commit_callbacks(execute=True):
        response = _post(client, f"/api/v1/approvals/{approval.pk}/approve", {"reason": "Looks right"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "approved" and body["decided_by"] == "approver@acme.test"
    assert body["reason"] == "Looks right" and body["decided_at"] is not None
    with schema_context(world.tenant_a.schema_name):
        call = ToolCall.objects.get(pk=approval.tool_call_id)
        turn = Turn.objects.get(pk=approval.turn_id)
        audit = AuditEvent.objects.filter(action="approval.approved").get()
    assert call.status == ToolCall.Status.APPROVED
    assert turn.status == Turn.Status.AWAITING_APPROVAL  # the worker's resume claims it
    assert audit.payload["tool"] == "create_ticket" and audit.payload["requested_by"] == "operator@acme.test"
    assert audit.payload["reason"] == "Looks right" and audit.payload["arguments"]["priority"] == "high"
    assert resumes == [([turn.pk], turn.queue)]
    decided = [e for _, e in published if e["event"] == "approval.decided"]
    assert decided == [
        {
            "event": "approval.decided",
            "turn_id": turn.pk,
            "approval_id": approval.pk,
            "call_id": call.call_id,
            "status": "approved",
            "decided_by": "approver@acme.test",
            "reason": "Looks right",
        }
    ]
    assert published[0][0] == f"chat.{world.tenant_a.schema_name}.{turn.session_id}"
    assert client.get("/api/v1/approvals?status=pending").json()["items"] == []


def test_a_rejection_needs_a_reason_and_tells_the_turn(
    world: World, approver: Any, resumes: Any, django_capture_on_commit_callbacks: Any, published: Any
) -> None:
    approval = _parked(world)
    client = _member(world, approver)
    missing = _post(client, f"/api/v1/approvals/{approval.pk}/reject", {"reason": "   "})
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "reason_required"
    too_long = _post(client, f"/api/v1/approvals/{approval.pk}/reject", {"reason": "x" * 2001})
    assert too_long.status_code == 422 and too_long.json()["error"]["code"] == "reason_too_long"
    nul = _post(client, f"/api/v1/approvals/{approval.pk}/reject", {"reason": "a\u0000b"})
    assert nul.status_code == 422 and nul.json()["error"]["code"] == "invalid_characters"
    with django_capture_on_commit_callbacks(execute=True):
        response = _post(client, f"/api/v1/approvals/{approval.pk}/reject", {"reason": "Wrong priority"})
    assert response.status_code == 200 and response.json()["status"] == "rejected"
    with schema_context(world.tenant_a.schema_name):
        assert ToolCall.objects.get(pk=approval.tool_call_id).status == ToolCall.Status.REJECTED
        assert AuditEvent.objects.filter(action="approval.rejected").get().payload["reason"] == "Wrong priority"
    assert len(resumes) == 1
    assert [e["status"] for _, e in published if e["event"] == "approval.decided"] == ["rejected"]


def test_a_second_decision_is_a_conflict(world: World, approver: Any, resumes: Any) -> None:
    approval = _parked(world)
    first = _post(_member(world, approver), f"/api/v1/approvals/{approval.pk}/approve")
    assert first.status_code == 200
    for persona, action in (("owner", "approve"), ("admin", "reject")):
        again = _post(
            _member(world, world.user(persona)), f"/api/v1/approvals/{approval.pk}/{action}", {"reason": "no"}
        )
        assert again.status_code == 409
        error = again.json()["error"]
        assert error["code"] == "approval_decided" and "approver@acme.test" in error["message"]


def test_separation_of_duties(world: World) -> None:
    key_a = key_id_of(world.key_a)  # acts for the owner
    admin_key = api_key_create(
        principal=Principal.system("tests", tenant=world.tenant_a),
        tenant=world.tenant_a,
        name="admin's",
        scopes=["approvals:read", "approvals:decide"],
        acting_user=world.user("admin"),
    ).secret
    connection.set_schema_to_public()
    # The member who asked.
    own = _parked(world, "admin")
    response = _post(_member(world, world.user("admin")), f"/api/v1/approvals/{own.pk}/approve")
    assert response.status_code == 403 and response.json()["error"]["code"] == "separation_of_duties"
    # A key acting for the person who asked.
    response = _post(api_client(HOST_A, admin_key), f"/api/v1/approvals/{own.pk}/approve")
    assert response.status_code == 403 and response.json()["error"]["code"] == "separation_of_duties"
    # The same key that asked, and the member whose key asked.
    by_key = park(tenant=world.tenant_a, requester=key_principal(key_a))
    connection.set_schema_to_public()
    response = _post(api_client(HOST_A, world.key_a), f"/api/v1/approvals/{by_key.pk}/approve")
    assert response.status_code == 403 and response.json()["error"]["code"] == "separation_of_duties"
    response = _post(_member(world, world.user("owner")), f"/api/v1/approvals/{by_key.pk}/reject", {"reason": "x"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "separation_of_duties"
    # Someone else may.
    response = _post(api_client(HOST_A, admin_key), f"/api/v1/approvals/{by_key.pk}/approve")
    assert response.status_code == 200 and response.json()["decided_by"].startswith("aop_")
    with schema_context(world.tenant_a.schema_name):
        assert ApprovalRequest.objects.get(pk=own.pk).status == ApprovalRequest.Status.PENDING


@pytest.mark.parametrize(
    ("persona", "may_read", "may_decide"),
    [
        ("owner", True, True),
        ("admin", True, True),
        ("approver", True, True),
        ("operator", True, False),
        ("auditor", True, False),
        ("viewer", False, False),
    ],
)
def test_the_permission_matrix(world: World, approver: Any, persona: str, may_read: bool, may_decide: bool) -> None:
    approval = _parked(world, "viewer")
    client = _member(world, approver if persona == "approver" else world.user(persona))
    read = client.get(f"/api/v1/approvals/{approval.pk}")
    assert read.status_code == (200 if may_read else 403)
    assert client.get("/api/v1/approvals").status_code == (200 if may_read else 403)
    decided = _post(client, f"/api/v1/approvals/{approval.pk}/approve")
    assert decided.status_code == (200 if may_decide else 403), decided.content
    if not may_decide:
        assert decided.json()["error"]["code"] == "permission_denied"


def test_a_key_without_the_decide_scope_is_refused(world: World) -> None:
    key = api_key_create(
        principal=Principal.system("tests", tenant=world.tenant_a),
        tenant=world.tenant_a,
        name="reader",
        scopes=["approvals:read"],
    ).secret
    connection.set_schema_to_public()
    approval = _parked(world)
    client = api_client(HOST_A, key)
    assert client.get(f"/api/v1/approvals/{approval.pk}").status_code == 200
    response = _post(client, f"/api/v1/approvals/{approval.pk}/approve")
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"


def test_another_tenant_neither_sees_nor_decides_the_requests(world: World) -> None:
    approval = _parked(world)
    for client in (api_client(HOST_B, world.key_b), host_client(HOST_B, world.user("outsider"))):
        assert client.get(f"/api/v1/approvals/{approval.pk}").status_code == 404
        assert client.get("/api/v1/approvals").json()["items"] == []
        response = _post(client, f"/api/v1/approvals/{approval.pk}/approve")
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    # A's key on B's host is not a credential there.
    assert api_client(HOST_B, world.key_a).get("/api/v1/approvals").status_code == 401
    with schema_context(world.tenant_a.schema_name):
        assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.Status.PENDING


def test_the_status_filter_is_validated_and_pages_are_keyset(world: World, api_a: Client) -> None:
    bad = api_a.get("/api/v1/approvals?status=maybe")
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_status"
    agent = published_agent_in(world)
    ids = [_parked(world, agent=agent).pk for _ in range(3)]
    first = api_a.get("/api/v1/approvals?limit=2").json()
    assert [a["id"] for a in first["items"]] == [ids[2], ids[1]] and first["next_cursor"]
    rest = api_a.get(f"/api/v1/approvals?limit=2&cursor={first['next_cursor']}").json()
    assert [a["id"] for a in rest["items"]] == [ids[0]] and rest["next_cursor"] is None
    assert api_a.get("/api/v1/approvals?status=approved").json()["items"] == []


def test_the_list_costs_the_same_queries_for_one_request_or_many(world: World, api_a: Client) -> None:
    agent = published_agent_in(world)
    _parked(world, agent=agent)
    api_a.get("/api/v1/approvals")  # the key's first use of the test stamps last_used_at
    with CaptureQueriesContext(connection) as one:
        assert len(api_a.get("/api/v1/approvals").json()["items"]) == 1
    for _ in range(4):
        _parked(world, agent=agent)
    with CaptureQueriesContext(connection) as five:
        assert len(api_a.get("/api/v1/approvals").json()["items"]) == 5
    assert len(five.captured_queries) == len(one.captured_queries)


def published_agent_in(world: World) -> Agent:
    with schema_context(world.tenant_a.schema_name):
        agent = published_agent()
    connection.set_schema_to_public()
    return agent


def test_an_expired_request_cannot_be_decided_and_its_turn_fails(
    world: World, approver: Any, resumes: Any, django_capture_on_commit_callbacks: Any, published: Any
) -> None:
    approval = _parked(world, ttl=dt.timedelta(seconds=-1), created_at=timezone.now() - dt.timedelta(hours=24))
    with django_capture_on_commit_callbacks(execute=True):
        response = _post(_member(world, approver), f"/api/v1/approvals/{approval.pk}/approve")
    assert response.status_code == 409 and response.json()["error"]["code"] == "approval_expired"
    with schema_context(world.tenant_a.schema_name):
        assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.Status.EXPIRED
        assert Turn.objects.get(pk=approval.turn_id).error_code == "approval_expired"
    assert resumes == []
    assert [e["event"] for _, e in published] == ["approval.decided", "turn.failed"]


def test_approvals_expire_fails_turns_past_their_window_once(
    world: World, resumes: Any, published: Any, django_capture_on_commit_callbacks: Any
) -> None:
    now = timezone.now()
    old = _parked(world, created_at=now - dt.timedelta(hours=25))  # expired an hour ago
    fresh = _parked(world)
    with schema_context(world.tenant_a.schema_name):
        with django_capture_on_commit_callbacks(execute=True):
            assert approval_services.approvals_expire(now=now) == 1
        assert approval_services.approvals_expire(now=now) == 0  # idempotent
        old_row = ApprovalRequest.objects.get(pk=old.pk)
        turn = Turn.objects.get(pk=old.turn_id)
        assert old_row.status == ApprovalRequest.Status.EXPIRED
        assert ToolCall.objects.get(pk=old.tool_call_id).status == ToolCall.Status.EXPIRED
        assert turn.status == Turn.Status.FAILED and turn.error_code == "approval_expired"
        assert turn.error_message == "The request to run create_ticket was not decided within 24 hours."
        assert ApprovalRequest.objects.get(pk=fresh.pk).status == ApprovalRequest.Status.PENDING
        assert AuditEvent.objects.filter(action="approval.expired", target_id=str(old.pk)).count() == 1
    events = [e for _, e in published]
    assert events == [
        {
            "event": "approval.decided",
            "turn_id": turn.pk,
            "approval_id": old.pk,
            "call_id": old.tool_call.call_id,
            "status": "expired",
            "decided_by": "",
            "reason": "",
        },
        {
            "event": "turn.failed",
            "turn_id": turn.pk,
            "error": {
                "code": "approval_expired",
                "message": "The request to run create_ticket was not decided within 24 hours.",
            },
        },
    ]
    assert resumes == []


def test_the_expiry_task_is_scheduled_for_every_tenant(settings: Any) -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["approvals-expire"]
    assert entry["task"] == "agents.approvals_expire" and "tenant_schemas" not in entry


# --- Two approvers at once (committed rows, real threads) ----------------------------------


def _commit(function: Any) -> Any:
    from tests.agents.conftest import committed

    return committed(function)


def test_two_approvers_at_once_give_one_decision_and_one_resume(world: World, resumes: Any, portal: Any) -> None:
    # ``portal`` only orders this test with the live ones, after every other test: the audit
    # events it commits in tenant A (append-only) would show in their audit assertions.
    tenant = world.tenant_a
    operator = world.user("operator")

    def setup() -> tuple[int, int, int]:
        with schema_context(tenant.schema_name):
            tool = Tool.objects.create(
                name=f"conc_{timezone.now().strftime('%H%M%S%f')}",
                kind=Tool.Kind.HTTP,
                side_effect=Tool.SideEffect.WRITE,
                requires_approval=True,
                parameters={"type": "object"},
            )
            approval = park(tenant=tenant, requester=member_principal(tenant, operator), tool=tool)
            return approval.pk, approval.turn.session.agent_id, tool.pk

    approval_id, agent_id, tool_id = _commit(setup)
    barrier = threading.Barrier(2)
    answers: list[int] = []
    codes: list[str] = []

    def decide(persona: str) -> None:
        try:
            client = host_client(HOST_A, world.user(persona))
            barrier.wait(timeout=10)
            response = _post(client, f"/api/v1/approvals/{approval_id}/approve")
            answers.append(response.status_code)
            if response.status_code != 200:
                codes.append(response.json()["error"]["code"])
        finally:
            connections.close_all()

    try:
        threads = [threading.Thread(target=decide, args=(p,)) for p in ("owner", "admin")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(answers) == [200, 409] and codes == ["approval_decided"]
        assert len(resumes) == 1

        def read() -> tuple[str, str]:
            with schema_context(tenant.schema_name):
                approval = ApprovalRequest.objects.select_related("tool_call").get(pk=approval_id)
                return approval.status, approval.tool_call.status

        assert _commit(read) == ("approved", "approved")
    finally:

        def cleanup() -> None:
            with schema_context(tenant.schema_name):
                ChatSession.objects.filter(agent_id=agent_id).delete()
                Agent.objects.filter(pk=agent_id).update(active_version=None)
                Agent.objects.filter(pk=agent_id).delete()
                Tool.objects.filter(pk=tool_id).delete()

        _commit(cleanup)
