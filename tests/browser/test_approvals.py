"""Approve from the queue and see the chat resume: a member's agent calls a write tool, the chat
shows it waiting for approval, an approver approves in /approvals/ (another browser context), and
the member's chat shows the call's result and the answer streaming in; the tool's service got
exactly one request."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django_tenants.utils import schema_context

from tests.agents.conftest import committed, endpoint_create
from tests.browser.conftest import Portal, sign_in
from tests.scripted_llm import ScriptedCall, ScriptedLLM, Step

pytestmark = [pytest.mark.browser, pytest.mark.django_db]


@pytest.fixture
def ticket_service() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """A ticket service on 127.0.0.1 that records its requests, opened by a committed staff
    egress allow rule for its port (the live worker reads the rules at each request)."""
    from tenants.models import EgressAllowRule

    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
            return

        def do_POST(self) -> None:  # noqa: N802 (stdlib name)
            length = int(self.headers.get("Content-Length") or 0)
            received.append({"path": self.path, "body": self.rfile.read(length).decode()})
            data = json.dumps({"id": 101, "status": "open"}).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = int(server.server_address[1])
    rule_id = committed(
        lambda: (
            EgressAllowRule.objects.create(target="127.0.0.1", port=port, description="browser test ticket service").pk
        )
    )
    try:
        yield port, received
    finally:
        committed(lambda: EgressAllowRule.objects.filter(pk=rule_id).delete())
        server.shutdown()
        server.server_close()


def _agent(portal: Portal, llm: ScriptedLLM, port: int) -> tuple[str, str]:
    """A committed agent whose version offers a write tool that needs approval; returns (agent
    name, tool name). Its scripted model calls the tool, then answers."""
    from agents.models import Tool
    from agents.services import agent_create, agent_version_publish
    from tenants.principal import Principal

    name = f"Tickets {uuid.uuid4().hex[:6]}"
    model = f"browser-approvals-{uuid.uuid4().hex[:8]}"
    tool = f"create_ticket_{uuid.uuid4().hex[:6]}"
    llm.script(
        model,
        steps=[
            Step(tokens=["Opening a ticket."], tool_calls=[ScriptedCall(tool, json.dumps({"title": "Laptop screen"}))]),
            Step(tokens=["Ticket ", "101 ", "is ", "open."]),
        ],
        token_interval=0.2,
    )
    tenant = portal.world.tenant_a

    def create() -> None:
        endpoint = endpoint_create(name=model, model=model, api_base=llm.api_base, tier="light", priority=9000)
        with schema_context(tenant.schema_name):
            Tool.objects.create(
                name=tool,
                description="Open a ticket",
                kind=Tool.Kind.HTTP,
                method="POST",
                url=f"http://127.0.0.1:{port}/tickets",
                side_effect=Tool.SideEffect.WRITE,
                requires_approval=True,
                parameters={
                    "type": "object",
                    "required": ["title"],
                    "properties": {"title": {"type": "string", "description": "What is broken"}},
                },
            )
            system = Principal.system("tests", tenant=tenant)
            agent = agent_create(
                principal=system,
                slug=model,
                name=name,
                config={"system_prompt": "Open tickets.", "tier": "light", "endpoint_id": endpoint.pk,
                        "tools": [tool]},
            )
            agent_version_publish(principal=system, version=agent.versions.get())

    committed(create)
    return name, tool


def test_approve_from_the_queue_and_see_the_chat_resume(
    portal: Portal,
    celery_worker: Any,
    scripted_llm: ScriptedLLM,
    new_page: Any,
    ticket_service: tuple[int, list[dict[str, Any]]],
) -> None:
    port, received = ticket_service
    agent_name, tool = _agent(portal, scripted_llm, port)

    member = new_page()
    sign_in(member, portal, "operator@acme.test")
    member.goto(portal.url(path="/chat/"))
    member.locator("select[name=agent]").select_option(label=agent_name)
    with member.expect_websocket(), member.expect_navigation():
        member.get_by_role("button", name="New chat").click()
    member.locator("#chat-form textarea").fill("Open a ticket: my laptop screen is broken")
    member.get_by_role("button", name="Send").click()

    turn = member.locator("#chat-log .chat-turn").last
    waiting = turn.locator("[data-testid=approval][data-status=pending]")
    waiting.wait_for(timeout=60_000)
    assert "Waiting for approval by an approver" in waiting.inner_text()
    assert turn.locator("[id$=-status]").get_attribute("data-status") == "awaiting_approval"
    card = turn.locator("[data-testid=tool-call]")
    assert tool in card.locator("summary").inner_text()
    assert received == []  # nothing is sent before a decision

    approver = new_page()
    sign_in(approver, portal, "admin@acme.test")
    approver.goto(portal.url(path="/approvals/"))
    row = approver.locator("#approval-table tr", has_text=tool)
    row.get_by_role("link", name="Review").click()
    approver.locator("[data-testid=arguments] [data-field=title]").filter(has_text="Laptop screen").wait_for()
    assert "What is broken" in approver.locator("[data-testid=arguments]").inner_text()
    approver.locator("#id_reason").fill("Go ahead")
    approver.get_by_role("button", name="Approve").click()
    approver.locator("[data-testid=decided]").filter(has_text="Approved by admin@acme.test").wait_for()

    turn.locator("[data-testid=approval][data-status=approved]").wait_for(timeout=30_000)
    turn.locator("[data-testid=tool-call] .chat-tool-icon[data-status=ok]").wait_for(timeout=30_000)
    turn.locator("[id$=-status][data-status=completed]").wait_for(timeout=60_000)
    assert "Ticket 101 is open." in turn.locator("[id$=-body]").inner_text()
    assert len(received) == 1 and json.loads(received[0]["body"]) == {"title": "Laptop screen"}
