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
    assert final["usage"] == {"input_tokens": 42, "output_tokens": 6, "estimated": False}
