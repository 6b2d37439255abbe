"""The chat's tool calls and approvals: the socket renders tool.call / tool.result as cards and
approval.requested / approval.decided as a waiting block that the decision updates; a resumed
turn streams again from offset 0; a (re)connecting client gets a parked turn's calls and
approval; the chat page shows past turns' cards from their rows."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
from django.db import connection
from django_tenants.utils import schema_context

from agents import consumers
from agents.models import Tool, ToolCall
from tenants.principal import Principal
from tests.agents.approval_rows import TICKET_PARAMETERS, member_principal, park, published_agent
from tests.agents.conftest import committed, ws_connect
from tests.conftest import HOST_A, World, host_client
from tests.live import Portal

pytestmark = pytest.mark.django_db


def _consumer(monkeypatch: pytest.MonkeyPatch, *, as_json: bool, can_review: bool = True) -> list[Any]:
    sent: list[Any] = []
    consumer = consumers.ChatConsumer()
    consumer.schema, consumer.sent, consumer.as_json = "tenant_x", {}, as_json
    consumer.principal = Principal(
        kind="user", tenant=None, permissions=frozenset({"chat", "approvals:read"} if can_review else {"chat"})
    )

    async def send(text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False) -> None:
        sent.append(text_data)

    async def send_json(content: dict[str, Any], close: bool = False) -> None:
        sent.append(content)

    monkeypatch.setattr(consumer, "send", send)
    monkeypatch.setattr(consumer, "send_json", send_json)
    monkeypatch.setattr(consumers.events, "text_snapshot", lambda schema, turn_id: "")
    sent.append(consumer)
    return sent


def _relay(consumer: Any, *events: dict[str, Any]) -> None:
    async def run() -> None:
        for event in events:
            await consumer._relay(event)

    asyncio.run(run())


def test_the_socket_renders_tool_calls_as_cards_and_the_approval_as_a_block(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = _consumer(monkeypatch, as_json=False)
    consumer = sent.pop(0)
    _relay(
        consumer,
        {
            "event": "tool.call",
            "turn_id": 7,
            "call_id": "call_1",
            "tool": "list_tickets",
            "arguments": {"q": "<script>alert(1)</script>"},
        },
        {"event": "tool.result", "turn_id": 7, "call_id": "call_1", "status": "ok", "excerpt": "<img src=x>2 open"},
        {"event": "tool.call", "turn_id": 7, "call_id": "call 2!", "tool": "create_ticket", "arguments": {}},
        {
            "event": "approval.requested",
            "turn_id": 7,
            "approval_id": 31,
            "call_id": "call 2!",
            "tool": "create_ticket",
            "arguments": {},
            "expires_at": "2026-12-08T04:00:00+00:00",
        },
        {
            "event": "approval.decided",
            "turn_id": 7,
            "approval_id": 31,
            "call_id": "call 2!",
            "status": "rejected",
            "decided_by": "admin@acme.test",
            "reason": "Use <b>the</b> form",
        },
    )
    call, result, second, requested, decided = sent
    assert '<div id="turn-7-tools" hx-swap-oob="beforeend"><details class="chat-tool" id="turn-7-call-call_1"' in call
    assert "<code>list_tickets</code>" in call and "&lt;script&gt;alert(1)&lt;/script&gt;" in call
    assert "<script>" not in call
    assert 'id="turn-7-call-call_1-icon"' in result and 'data-status="ok"' in result
    assert 'id="turn-7-call-call_1-result"' in result and "&lt;img src=x&gt;2 open" in result
    assert 'id="turn-7-call-' in second and "call 2!" not in second.split('id="')[2].split('"')[0]
    assert 'id="approval-31"' in requested and "Waiting for approval by an approver" in requested
    assert "2026-12-08 04:00" in requested and 'href="/approvals/31/"' in requested
    assert 'id="turn-7-status"' in requested and 'data-status="awaiting_approval"' in requested
    assert 'id="approval-31"' in decided and 'hx-swap-oob="true"' in decided
    assert "Rejected by admin@acme.test" in decided and "Use &lt;b&gt;the&lt;/b&gt; form" in decided


def test_the_request_link_is_only_for_readers_of_approvals(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = _consumer(monkeypatch, as_json=False, can_review=False)
    consumer = sent.pop(0)
    _relay(
        consumer,
        {
            "event": "approval.requested",
            "turn_id": 7,
            "approval_id": 31,
            "call_id": "c",
            "tool": "create_ticket",
            "arguments": {},
            "expires_at": "2026-12-08T04:00:00+00:00",
        },
    )
    assert "Waiting for approval" in sent[0] and "/approvals/31/" not in sent[0]


def test_a_resumed_turn_streams_its_answer_again_from_offset_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = _consumer(monkeypatch, as_json=True)
    consumer = sent.pop(0)

    def delta(offset: int, text: str) -> dict[str, Any]:
        return {"event": "token.delta", "turn_id": 7, "offset": offset, "text": text}

    _relay(
        consumer,
        {"event": "turn.started", "turn_id": 7},
        delta(0, "Let me check."),
        {"event": "turn.started", "turn_id": 7},  # resumed after the approval
        delta(0, "Done"),
        delta(4, ": ticket 12."),
    )
    texts = [(e["offset"], e["text"]) for e in sent if e["event"] == "token.delta"]
    assert texts == [(0, "Let me check."), (0, "Done"), (4, ": ticket 12.")]


def test_the_chat_page_shows_past_tool_calls_and_a_parked_turns_approval(world: World) -> None:
    tenant = world.tenant_a
    operator = member_principal(tenant, world.user("operator"))
    with schema_context(tenant.schema_name):
        agent = published_agent()
        approval = park(
            tenant=tenant,
            requester=operator,
            agent=agent,
            call_id="call_9",
            arguments={"title": "<b>Broken</b> screen"},
        )
        ToolCall.objects.create(
            turn_id=approval.turn_id,
            sequence=0,
            call_id="call_8",
            tool_name="list_tickets",
            arguments={"q": "screen"},
            status=ToolCall.Status.OK,
            output_excerpt="[] no tickets",
        )
        session_id = approval.turn.session_id
    connection.set_schema_to_public()
    page = host_client(HOST_A, world.user("operator")).get(f"/chat/{session_id}/").content.decode()
    tools = page[page.index(f'id="turn-{approval.turn_id}-tools"') :]
    assert tools.index(f'id="turn-{approval.turn_id}-call-call_8"') < tools.index("call_9")
    assert "[] no tickets" in tools and 'data-status="ok"' in tools
    assert "&lt;b&gt;Broken&lt;/b&gt; screen" in tools and "<b>Broken</b>" not in tools
    assert f'id="approval-{approval.pk}"' in tools and "Waiting for approval by an approver" in tools
    assert f'href="/approvals/{approval.pk}/"' in tools  # the operator reads approvals
    assert 'data-status="awaiting_approval"' in page and "waiting for approval" in page


# --- Live: the socket of a parked turn ------------------------------------------------------


def test_a_parked_turn_is_shown_on_connect_and_the_decision_arrives_live(
    portal: Portal, member_cookie: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agents.approval_services import approval_decide
    from agents.tasks import turn_resume_task

    resumed: list[Any] = []
    monkeypatch.setattr(turn_resume_task, "apply_async", lambda **kwargs: resumed.append(kwargs))
    tenant, world = portal.world.tenant_a, portal.world

    def setup() -> tuple[int, int, int]:
        with schema_context(tenant.schema_name):
            tool = Tool.objects.create(
                name=f"ticket_{uuid.uuid4().hex[:8]}",
                kind=Tool.Kind.HTTP,
                side_effect=Tool.SideEffect.WRITE,
                requires_approval=True,
                parameters=TICKET_PARAMETERS,
                description="Open a ticket",
            )
            approval = park(
                tenant=tenant,
                requester=member_principal(tenant, world.user("operator")),
                tool=tool,
                call_id="call_live",
            )
            return approval.pk, approval.turn.session_id, approval.turn_id

    approval_id, session_id, turn_id = committed(setup)
    with ws_connect(portal.port, f"/ws/chat/{session_id}/?format=json", cookie=member_cookie("operator")) as ws:
        first = [json.loads(ws.recv(timeout=10)) for _ in range(3)]
    assert [e["event"] for e in first] == ["turn.state", "tool.call", "approval.requested"]
    assert first[0]["status"] == "awaiting_approval" and first[2]["approval_id"] == approval_id

    with ws_connect(portal.port, f"/ws/chat/{session_id}/", cookie=member_cookie("operator")) as ws:
        snapshot = [ws.recv(timeout=10) for _ in range(2)]
        assert f'id="turn-{turn_id}-tools" class="chat-tools" hx-swap-oob="true"' in snapshot[1]
        assert "Waiting for approval by an approver" in snapshot[1]

        def decide() -> None:
            with schema_context(tenant.schema_name):
                from agents.models import ApprovalRequest

                admin = member_principal(tenant, world.user("admin"))
                approval_decide(
                    principal=admin,
                    approval=ApprovalRequest.objects.get(pk=approval_id),
                    decision="approved",
                    reason="ok",
                )

        committed(decide)
        deadline = time.monotonic() + 10
        decided = ""
        while time.monotonic() < deadline and "Approved by" not in decided:
            decided = str(ws.recv(timeout=deadline - time.monotonic()))
    assert f'id="approval-{approval_id}"' in decided and "Approved by admin@acme.test" in decided
    assert len(resumed) == 1


def test_a_resumed_turn_that_continues_its_offsets_is_resent_whole_from_the_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The tool loop resumes the text where it parked (offset = the text before the tool call).
    sent = _consumer(monkeypatch, as_json=True)
    consumer = sent.pop(0)
    monkeypatch.setattr(consumers.events, "text_snapshot", lambda schema, turn_id: "Let me check. Done.")
    _relay(
        consumer,
        {"event": "turn.started", "turn_id": 7},
        {"event": "token.delta", "turn_id": 7, "offset": 0, "text": "Let me check."},
        {"event": "turn.started", "turn_id": 7},
        {"event": "token.delta", "turn_id": 7, "offset": 13, "text": " Done."},
    )
    texts = [(e["offset"], e["text"]) for e in sent if e["event"] == "token.delta"]
    assert texts == [(0, "Let me check."), (0, "Let me check. Done.")]
