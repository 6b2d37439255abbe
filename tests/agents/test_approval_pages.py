"""The approvals console: the queue (pending first, filter, live table, query count), a request's
page (who asked and why, arguments against the schema and the previous call), deciding with and
without htmx, refusals shown readably, who sees the buttons, other tenants, the nav badge."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_tenants.utils import schema_context

from agents.approval_views import argument_rows
from agents.models import ApprovalRequest, ToolCall
from tenants.roles import Role
from tests.agents.approval_rows import member_principal, park, published_agent
from tests.conftest import HOST_A, HOST_B, PASSWORD, World, host_client
from tests.factories import member_add

pytestmark = pytest.mark.django_db


@pytest.fixture
def approver(world: World) -> Any:
    return member_add(tenant=world.tenant_a, email="approver@acme.test", role=Role.APPROVER, password=PASSWORD).user


def _parked(world: World, persona: str = "operator", **kwargs: Any) -> ApprovalRequest:
    approval = park(tenant=world.tenant_a, requester=member_principal(world.tenant_a, world.user(persona)), **kwargs)
    connection.set_schema_to_public()
    return approval


def _agent(world: World) -> Any:
    with schema_context(world.tenant_a.schema_name):
        agent = published_agent()
    connection.set_schema_to_public()
    return agent


def test_the_queue_lists_pending_requests_first_and_polls(world: World, approver: Any) -> None:
    agent = _agent(world)
    decided = _parked(world, agent=agent)
    pending = _parked(world, agent=agent, question="Please open a ticket about the printer")
    with schema_context(world.tenant_a.schema_name):
        ApprovalRequest.objects.filter(pk=decided.pk).update(status="approved", decided_by_label="owner@acme.test")
    client = host_client(HOST_A, approver)
    page = client.get("/approvals/").content.decode()
    assert page.index(f'id="approval-{pending.pk}"') < page.index(f'id="approval-{decided.pk}"')
    assert 'hx-trigger="every 3s"' in page and 'href="/approvals/"' in page
    assert "Please open a ticket about the printer" in page and "operator@acme.test" in page
    assert f'href="/approvals/{pending.pk}/"' in page
    fragment = client.get("/approvals/?status=pending", HTTP_HX_REQUEST="true").content.decode()
    assert fragment.lstrip().startswith('<div id="approval-table"')
    assert f"approval-{pending.pk}" in fragment and f"approval-{decided.pk}" not in fragment
    assert 'hx-get="/approvals/?status=pending"' in fragment  # the poll keeps the filter
    # An unknown status shows everything rather than failing.
    assert client.get("/approvals/?status=bogus").status_code == 200


def test_the_queue_costs_the_same_queries_for_one_request_or_many(world: World, approver: Any) -> None:
    agent = _agent(world)
    _parked(world, agent=agent)
    client = host_client(HOST_A, approver)
    client.get("/approvals/")
    with CaptureQueriesContext(connection) as one:
        assert client.get("/approvals/").status_code == 200
    for _ in range(4):
        _parked(world, agent=agent)
    with CaptureQueriesContext(connection) as five:
        page = client.get("/approvals/").content.decode()
    assert page.count('data-testid="review"') == 5
    assert len(five.captured_queries) == len(one.captured_queries)


def test_a_request_shows_who_asked_why_and_the_arguments_against_the_schema_and_the_previous_call(
    world: World, approver: Any
) -> None:
    agent = _agent(world)
    earlier = _parked(world, agent=agent, arguments={"title": "Laptop screen broken", "priority": "low"})
    approval = _parked(
        world, agent=agent, arguments={"title": "Laptop screen broken", "priority": "high", "extra": [1, 2]}
    )
    with schema_context(world.tenant_a.schema_name):
        ToolCall.objects.filter(pk=earlier.tool_call_id).update(status=ToolCall.Status.OK)
    page = host_client(HOST_A, approver).get(f"/approvals/{approval.pk}/").content.decode()
    assert 'data-testid="requested-by">operator@acme.test<' in page
    assert "My screen is broken" in page  # the excerpt
    assert "One line saying what is wrong" in page and "How urgent it is" in page  # schema descriptions
    assert "string (low, normal, high)" in page  # type with its enum
    rows = dict(re.findall(r'data-field="(\w+)"( data-changed="true")?', page))
    assert rows == {"title": "", "priority": ' data-changed="true"', "body": "", "extra": ' data-changed="true"'}
    assert "Previous call" in page and "(not in the schema)" in page
    assert 'data-testid="approve"' in page and 'data-testid="reject"' in page


def test_argument_rows_mark_changes_only_against_a_previous_call() -> None:
    parameters = {"properties": {"a": {"type": "integer", "description": "A number"}}, "required": ["a"]}
    alone = argument_rows(parameters=parameters, arguments={"a": 1})
    assert [(r.name, r.type, r.description, r.required, r.value, r.changed) for r in alone] == [
        ("a", "integer", "A number", True, "1", False)
    ]
    compared = argument_rows(parameters=parameters, arguments={"a": 1, "b": "x"}, previous={"a": 1})
    assert [(r.name, r.changed, r.previous_present) for r in compared] == [("a", False, True), ("b", True, False)]


def test_an_approver_approves_with_htmx_and_a_second_decision_is_shown_readably(
    world: World, approver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agents.tasks import turn_resume_task

    monkeypatch.setattr(turn_resume_task, "apply_async", lambda **kwargs: None)
    approval = _parked(world)
    response = host_client(HOST_A, approver).post(
        f"/approvals/{approval.pk}/decide", {"decision": "approved", "reason": "Fine"}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    body = response.content.decode()
    assert body.lstrip().startswith('<div id="approval-decision"')
    assert "Approved by <strong>approver@acme.test</strong>" in body and ": Fine" in body
    assert "Approved" in response["HX-Trigger"]
    again = host_client(HOST_A, world.user("admin")).post(
        f"/approvals/{approval.pk}/decide", {"decision": "rejected", "reason": "No"}, HTTP_HX_REQUEST="true"
    )
    text = again.content.decode()
    assert 'data-testid="decision-error"' in text and "already approved by approver@acme.test" in text
    assert "danger" in again["HX-Trigger"]


def test_without_javascript_a_rejection_redirects_back_and_a_missing_reason_is_explained(
    world: World, approver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agents.tasks import turn_resume_task

    monkeypatch.setattr(turn_resume_task, "apply_async", lambda **kwargs: None)
    approval = _parked(world)
    client = host_client(HOST_A, approver)
    missing = client.post(f"/approvals/{approval.pk}/decide", {"decision": "rejected", "reason": ""}, follow=True)
    assert "Say why you reject the call" in missing.content.decode()
    done = client.post(f"/approvals/{approval.pk}/decide", {"decision": "rejected", "reason": "Not needed"})
    assert done.status_code == 302 and done["Location"] == f"/approvals/{approval.pk}/"
    page = client.get(done["Location"]).content.decode()
    assert "Rejected by <strong>approver@acme.test</strong>" in page and "Not needed" in page
    with schema_context(world.tenant_a.schema_name):
        assert ToolCall.objects.get(pk=approval.tool_call_id).status == ToolCall.Status.REJECTED


def test_the_requester_sees_they_cannot_decide_and_readers_see_no_buttons(world: World) -> None:
    approval = _parked(world, "admin")
    own = host_client(HOST_A, world.user("admin")).get(f"/approvals/{approval.pk}/").content.decode()
    assert "you cannot decide your own request" in own and 'data-testid="approve"' not in own
    refused = host_client(HOST_A, world.user("admin")).post(
        f"/approvals/{approval.pk}/decide", {"decision": "approved"}, follow=True
    )
    assert "another approver must decide it" in refused.content.decode()
    for persona in ("operator", "auditor"):
        page = host_client(HOST_A, world.user(persona)).get(f"/approvals/{approval.pk}/").content.decode()
        assert 'data-testid="approve"' not in page and "Waiting for an owner, admin or approver" in page
    assert host_client(HOST_A, world.user("viewer")).get("/approvals/").status_code == 403
    assert host_client(HOST_A, world.user("viewer")).get(f"/approvals/{approval.pk}/").status_code == 403
    operator_post = host_client(HOST_A, world.user("operator")).post(
        f"/approvals/{approval.pk}/decide", {"decision": "approved"}, follow=True
    )
    assert "approvals:decide" in operator_post.content.decode()
    with schema_context(world.tenant_a.schema_name):
        assert ApprovalRequest.objects.get(pk=approval.pk).status == ApprovalRequest.Status.PENDING


def test_another_tenant_gets_not_found(world: World) -> None:
    approval = _parked(world)
    client = host_client(HOST_B, world.user("outsider"))
    assert client.get(f"/approvals/{approval.pk}/").status_code == 404
    assert client.post(f"/approvals/{approval.pk}/decide", {"decision": "approved"}).status_code == 404
    assert f"approval-{approval.pk}" not in client.get("/approvals/").content.decode()


def test_the_nav_shows_the_pending_count_to_readers_of_approvals(world: World, approver: Any) -> None:
    agent = _agent(world)
    _parked(world, agent=agent)
    _parked(world, agent=agent)
    page = host_client(HOST_A, approver).get("/chat/").content.decode()
    assert re.search(r'href="/approvals/">Approvals <span[^>]*data-testid="nav-badge"[^>]*>2</span>', page)
    viewer_page = host_client(HOST_A, world.user("viewer")).get("/chat/").content.decode()
    assert 'href="/approvals/"' not in viewer_page
