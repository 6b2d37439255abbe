"""Streaming over the chat WebSocket, end to end: socket -> service -> Celery -> scripted model
server -> channel layer -> socket."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.agents.conftest import ChatWorld, chat_session_commit, ws_connect
from tests.live import Portal
from tests.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.django_db


def _events_until_final(ws: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = json.loads(ws.recv(timeout=deadline - time.monotonic()))
        out.append(event)
        if event["event"] in ("turn.completed", "turn.failed", "turn.cancelled"):
            return out
    raise AssertionError(f"no final event; got {out}")


def test_tokens_stream_over_the_socket_and_the_answer_is_saved(
        portal: Portal, celery_worker: Any, chat_world: ChatWorld, scripted_llm: ScriptedLLM,
        member_cookie: Any, django_db_blocker: Any) -> None:
    scripted_llm.script(chat_world.model, tokens=["The", " refund", " window", " is", " 30", " days."],
                        token_interval=0.01)
    session_id = chat_session_commit(portal.world.tenant_a, portal.world.user("operator"),
                                     chat_world.agent_id)
    with ws_connect(portal.port, f"/ws/chat/{session_id}/?format=json", cookie=member_cookie("operator")) as ws:
        ws.send(json.dumps({"content": "How long is the refund window?"}))
        events = _events_until_final(ws)
    names = [e["event"] for e in events]
    assert names[0] == "message.accepted"
    assert "turn.started" in names
    text = "".join(e["text"] for e in events if e["event"] == "token.delta")
    assert text == "The refund window is 30 days."
    final = events[-1]
    assert final["event"] == "turn.completed"
    assert final["content"] == text
    # The turn's cost is the sum of its usage events: 42 x 1 + 6 x 2 per million tokens.
    assert final["usage"] == {"input_tokens": 42, "output_tokens": 6, "estimated": False,
                              "cost": "0.000054000000", "currency": "USD"}


def test_the_consumer_sends_each_character_once_and_fills_a_lost_delta_from_the_snapshot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from agents import consumers

    sent: list[dict[str, Any]] = []
    consumer = consumers.ChatConsumer()
    consumer.schema, consumer.sent, consumer.as_json = "tenant_x", {}, True

    async def send_json(content: dict[str, Any], close: bool = False) -> None:
        sent.append(content)

    monkeypatch.setattr(consumer, "send_json", send_json)
    monkeypatch.setattr(consumers.events, "text_snapshot",
                        lambda schema, turn_id: "Hello, world there." if (schema, turn_id) == ("tenant_x", 7) else "")

    def delta(offset: int, text: str) -> dict[str, Any]:
        return {"event": "token.delta", "turn_id": 7, "offset": offset, "text": text}

    async def relay_all() -> None:
        for event in (delta(0, "Hello"), delta(0, "Hello"),  # a duplicate (snapshot then live delta)
                      delta(12, " there"),  # ", world" (offset 5) was lost on the way
                      delta(16, "re."),  # overlaps what was sent
                      ):
            await consumer._relay(event)

    asyncio.run(relay_all())
    assert [(e["offset"], e["text"]) for e in sent] == [(0, "Hello"), (5, ", world there"), (18, ".")]
    assert "".join(e["text"] for e in sent) == "Hello, world there."


def test_a_message_the_worker_refuses_comes_back_as_an_error_and_the_running_turn_goes_on(
        portal: Portal, celery_worker: Any, chat_world: ChatWorld, scripted_llm: ScriptedLLM,
        member_cookie: Any) -> None:
    # The socket hands messages to the worker; what the service refuses (a turn still running,
    # an empty message) returns through the session's group with the REST API's codes.
    scripted_llm.script(chat_world.model, tokens=["Thirty", " days", "."], token_interval=0.3)
    session_id = chat_session_commit(portal.world.tenant_a, portal.world.user("operator"),
                                     chat_world.agent_id)
    with ws_connect(portal.port, f"/ws/chat/{session_id}/?format=json", cookie=member_cookie("operator")) as ws:
        ws.send(json.dumps({"content": "How long is the refund window?"}))
        first = json.loads(ws.recv(timeout=30))
        assert first["event"] == "message.accepted" and first["content"] == "How long is the refund window?"
        ws.send(json.dumps({"content": "And exchanges?"}))
        ws.send(json.dumps({"content": "   "}))
        events = _events_until_final(ws)
    errors = [e["error"]["code"] for e in events if e["event"] == "error"]
    assert sorted(errors) == ["empty_message", "turn_in_progress"]
    assert not [e for e in events if e["event"] == "message.accepted"]
    assert events[-1]["event"] == "turn.completed" and events[-1]["content"] == "Thirty days."
    assert all(e.get("turn_id") == first["turn_id"] for e in events if e["event"] != "error")


def test_a_member_removed_after_the_socket_opened_gets_an_error_and_nothing_is_saved(
        world: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from django_tenants.utils import schema_context

    from agents import tasks
    from agents.models import Message
    from tenants.models import Membership

    published: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(tasks.events, "publish", lambda group, event: published.append((group, event)))
    # Tenant B's operator membership, sent into tenant A's schema: no such member here.
    foreign = Membership.objects.filter(tenant=world.tenant_b).first()
    assert foreign is not None
    with schema_context(world.tenant_a.schema_name):
        tasks.chat_message_accept_task(foreign.pk, 1, "hello")
        assert not Message.objects.exists()
    assert [event["error"]["code"] for _, event in published] == ["forbidden"]
    assert published[0][0] == tasks.events.session_group(world.tenant_a.schema_name, 1)


def test_a_message_the_broker_cannot_take_is_answered_with_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from kombu.exceptions import OperationalError

    from agents import consumers

    sent: list[dict[str, Any]] = []
    consumer = consumers.ChatConsumer()
    consumer.schema, consumer.sent, consumer.as_json, consumer.session_id = "tenant_x", {}, True, 3

    async def send_json(content: dict[str, Any], close: bool = False) -> None:
        sent.append(content)

    def broker_down(*args: Any) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(consumer, "send_json", send_json)
    monkeypatch.setattr(consumers, "_hand_off", broker_down)
    asyncio.run(consumer.receive_json({"content": "Is shipping free?"}))
    assert [e["error"]["code"] for e in sent] == ["unavailable"]


# --- Origin ----------------------------------------------------------------------------------

def _handshake_status(port: int, path: str, *, cookie: str, origin: str | None, host: str = "acme.localhost") -> int:
    """The HTTP status of a WebSocket handshake (101 when accepted), sending ``origin`` as the
    ``Origin`` header (none at all for ``None``)."""
    import socket

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    headers = {"Cookie": cookie}
    if origin is not None:
        headers["Origin"] = origin
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        with connect(f"ws://{host}:{port}{path}", sock=sock, additional_headers=headers, open_timeout=10,
                     origin=None) as ws:
            return int(ws.response.status_code)
    except InvalidStatus as refused:
        return int(refused.response.status_code)


def test_it_refuses_a_socket_opened_from_any_origin_but_the_tenants_own(
        portal: Portal, chat_world: ChatWorld, member_cookie: Any) -> None:
    session_id = chat_session_commit(portal.world.tenant_a, portal.world.user("operator"), chat_world.agent_id)
    path, port, cookie = f"/ws/chat/{session_id}/?format=json", portal.port, member_cookie("operator")
    refused = {
        # Any *.localhost page passed channels' AllowedHostsOriginValidator.
        "another subdomain": f"http://evil.localhost:{port}",
        "another tenant's host": f"http://globex.localhost:{port}",
        "the public host": f"http://localhost:{port}",
        "another port": "http://acme.localhost:9999",
        "another scheme": f"https://acme.localhost:{port}",
        "a suffix of the host": f"http://xacme.localhost:{port}",
        "an opaque origin": "null",
        "no Origin at all": None,
    }
    statuses = {why: _handshake_status(port, path, cookie=cookie, origin=origin) for why, origin in refused.items()}
    assert statuses == dict.fromkeys(refused, 403)
    # The tenant's own origin, in any letter case, gets in.
    assert _handshake_status(port, path, cookie=cookie, origin=f"http://ACME.localhost:{port}") == 101


def test_the_tenants_origins_follow_the_scheme_and_port_it_is_served_on(settings: Any) -> None:
    from agents.consumers import origin_allowed

    domains = ["acme.example.com", "chat.acme.test"]
    settings.ACCOUNT_DEFAULT_HTTP_PROTOCOL, settings.PUBLIC_PORT, settings.CSRF_TRUSTED_ORIGINS = "https", "", []
    assert origin_allowed("https://acme.example.com", domains)
    assert origin_allowed("https://chat.acme.test", domains)
    assert not origin_allowed("http://acme.example.com", domains)
    assert not origin_allowed("https://acme.example.com:8443", domains)
    assert not origin_allowed("https://globex.example.com", domains)
    assert not origin_allowed(None, domains)
    settings.PUBLIC_PORT = "443"  # the scheme's default: browsers leave it out of Origin
    assert origin_allowed("https://acme.example.com", domains)
    settings.PUBLIC_PORT = "8443"
    assert origin_allowed("https://acme.example.com:8443", domains)
    assert not origin_allowed("https://acme.example.com", domains)
    # CSRF_TRUSTED_ORIGINS widens it, exactly or by a *. pattern, as Django's CSRF check reads them.
    settings.CSRF_TRUSTED_ORIGINS = ["https://console.example.org", "https://*.partner.example"]
    assert origin_allowed("https://console.example.org", domains)
    assert origin_allowed("https://app.partner.example", domains)
    assert not origin_allowed("http://app.partner.example", domains)
    assert not origin_allowed("https://partner.example.evil", domains)
