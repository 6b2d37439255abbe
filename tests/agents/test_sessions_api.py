"""Chat sessions and messages over the REST API: Server-Sent Events and waiting answers end to end
(API -> service -> Celery -> scripted model server -> channel layer -> HTTP response), isolation,
bad inputs and query counts.

Live tests act through the daphne server with httpx (the server and worker cannot see a test's
own transaction); the others use the Django test client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from django_tenants.utils import schema_context

from agents.models import Agent, Message, Turn
from agents.selectors import session_get
from agents.services import chat_message_send, chat_session_create
from agents.streaming import TurnRelay, turn_wait
from tenants.models import Membership
from tenants.principal import Principal
from tenants.services.keys import api_key_authenticate
from tests.agents.conftest import ChatWorld, chat_session_commit, sse_events
from tests.conftest import HOST_A, World, api_client, host_client
from tests.live import Portal
from tests.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.django_db

FINAL = ("turn.completed", "turn.failed", "turn.cancelled")


# --- Django test client ------------------------------------------------------------------------

def _post(client: Client, path: str, body: dict[str, Any] | None = None) -> Any:
    return client.post(path, body or {}, content_type="application/json")


def _active_agent(client: Client, slug: str = "helpdesk") -> dict[str, Any]:
    agent = _post(client, "/api/v1/agents", {"slug": slug, "name": slug.title()}).json()
    assert _post(client, f"/api/v1/agents/{agent['id']}/versions/1/publish").status_code == 200
    return agent  # type: ignore[no-any-return]


def _session(client: Client, **body: Any) -> dict[str, Any]:
    response = _post(client, "/api/v1/sessions", body)
    assert response.status_code == 201, response.content
    return response.json()  # type: ignore[no-any-return]


def _key_principal(world: World) -> Principal:
    key = api_key_authenticate(raw_key=world.key_a, tenant=world.tenant_a)
    return Principal.for_api_key(key)


def test_a_session_is_opened_by_id_or_slug_read_and_deleted(world: World, api_a: Client) -> None:
    agent = _active_agent(api_a)
    by_id = _session(api_a, agent_id=agent["id"], title="Refunds")
    by_slug = _session(api_a, agent="helpdesk")
    assert by_id["agent_slug"] == "helpdesk" and by_id["channel"] == "api" and by_id["title"] == "Refunds"
    listed = api_a.get("/api/v1/sessions").json()["items"]
    assert [s["id"] for s in listed] == [by_slug["id"], by_id["id"]]
    assert api_a.get(f"/api/v1/sessions/{by_id['id']}").json() == by_id
    assert api_a.delete(f"/api/v1/sessions/{by_id['id']}").status_code == 204
    assert api_a.get(f"/api/v1/sessions/{by_id['id']}").status_code == 404
    assert _post(api_a, "/api/v1/sessions", {"title": "no agent"}).json()["error"]["code"] == "agent_required"


def test_unknown_and_inactive_agents_are_refused(world: World, api_a: Client) -> None:
    assert _post(api_a, "/api/v1/sessions", {"agent": "nobody"}).status_code == 404
    assert _post(api_a, "/api/v1/sessions", {"agent_id": 999999}).status_code == 404
    draft = _post(api_a, "/api/v1/agents", {"slug": "draft", "name": "Draft"}).json()
    refused = _post(api_a, "/api/v1/sessions", {"agent_id": draft["id"]})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "agent_unavailable"
    agent = _active_agent(api_a)
    session = _session(api_a, agent_id=agent["id"])
    _post(api_a, f"/api/v1/agents/{agent['id']}/status", {"status": "paused"})
    paused = _post(api_a, f"/api/v1/sessions/{session['id']}/messages", {"content": "hello?"})
    assert paused.status_code == 409 and paused.json()["error"]["code"] == "agent_unavailable"


@pytest.mark.parametrize(("content", "code"), [
    ("", "empty_message"),
    ("   \n ", "empty_message"),
    ("x" * (settings.CHAT_MAX_MESSAGE_CHARS + 1), "message_too_long"),
])
def test_bad_messages_are_rejected(world: World, api_a: Client, content: str, code: str) -> None:
    session = _session(api_a, agent_id=_active_agent(api_a)["id"])
    response = _post(api_a, f"/api/v1/sessions/{session['id']}/messages", {"content": content})
    assert response.status_code == 422 and response.json()["error"]["code"] == code
    assert api_a.get(f"/api/v1/sessions/{session['id']}/messages").json()["items"] == []


def test_a_message_without_content_is_a_validation_error(world: World, api_a: Client) -> None:
    session = _session(api_a, agent_id=_active_agent(api_a)["id"])
    response = _post(api_a, f"/api/v1/sessions/{session['id']}/messages", {"stream": True})
    assert response.status_code == 422 and response.json()["error"]["code"] == "validation_failed"


def test_a_second_message_while_a_turn_is_unfinished_conflicts(world: World, api_a: Client) -> None:
    session = _session(api_a, agent_id=_active_agent(api_a)["id"])
    with schema_context(world.tenant_a.schema_name):
        principal = _key_principal(world)
        turn = chat_message_send(principal=principal, session=session_get(principal=principal,
                                                                          session_id=session["id"]),
                                 content="first")  # queued: its commit (and worker) never comes in this test
    connection.set_schema_to_public()
    response = _post(api_a, f"/api/v1/sessions/{session['id']}/messages", {"content": "second"})
    assert response.status_code == 409 and response.json()["error"]["code"] == "turn_in_progress"
    state = api_a.get(f"/api/v1/sessions/{session['id']}/turns/{turn.pk}").json()
    assert state["status"] == "queued" and state["error"] is None
    messages = api_a.get(f"/api/v1/sessions/{session['id']}/messages").json()["items"]
    assert [(m["role"], m["content"], m["turn_id"]) for m in messages] == [("user", "first", turn.pk)]
    cancelled = _post(api_a, f"/api/v1/sessions/{session['id']}/turns/{turn.pk}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = _post(api_a, f"/api/v1/sessions/{session['id']}/turns/{turn.pk}/cancel")  # idempotent
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert api_a.get(f"/api/v1/sessions/{session['id']}/turns/999999").status_code == 404


def test_sessions_of_another_principal_are_not_found(world: World, api_a: Client) -> None:
    agent = _active_agent(api_a)
    with schema_context(world.tenant_a.schema_name):
        membership = Membership.objects.select_related("user", "tenant").get(user=world.user("operator"),
                                                                             tenant=world.tenant_a)
        theirs = chat_session_create(principal=Principal.for_member(membership),
                                     agent=Agent.objects.get(pk=agent["id"]))
    connection.set_schema_to_public()
    path = f"/api/v1/sessions/{theirs.pk}"
    for response in (api_a.get(path), api_a.get(f"{path}/messages"), api_a.delete(path),
                     _post(api_a, f"{path}/messages", {"content": "hi"})):
        assert response.status_code == 404, response.content
    assert api_a.get("/api/v1/sessions").json()["items"] == []
    operator = host_client(HOST_A, world.user("operator"))
    assert [s["id"] for s in operator.get("/api/v1/sessions").json()["items"]] == [theirs.pk]
    auditor = host_client(HOST_A, world.user("auditor"))  # may read agents but not chat
    assert auditor.get("/api/v1/sessions").status_code == 403


def test_tenant_b_key_gets_nothing_on_tenant_a(world: World, api_a: Client) -> None:
    session = _session(api_a, agent_id=_active_agent(api_a)["id"])
    b_on_a = api_client(HOST_A, world.key_b)
    path = f"/api/v1/sessions/{session['id']}"
    responses = [b_on_a.get("/api/v1/sessions"), b_on_a.get(path), b_on_a.get(f"{path}/messages"),
                 _post(b_on_a, "/api/v1/sessions", {"agent": "helpdesk"}),
                 _post(b_on_a, f"{path}/messages", {"content": "hi"}), b_on_a.delete(path),
                 b_on_a.get("/api/v1/openai/models"),
                 _post(b_on_a, "/api/v1/openai/chat/completions",
                       {"model": "helpdesk", "messages": [{"role": "user", "content": "hi"}]})]
    assert [r.status_code for r in responses] == [401] * len(responses)
    assert api_a.get(path).status_code == 200


def test_list_endpoints_do_not_grow_their_query_count(world: World, api_a: Client,
                                                      django_assert_max_num_queries: Any) -> None:
    agent = _active_agent(api_a)
    session = _session(api_a, agent_id=agent["id"])
    with django_assert_max_num_queries(12) as few:
        api_a.get("/api/v1/sessions")
    sessions_baseline = len(few.captured_queries)  # read now: each request clears Django's query log
    with django_assert_max_num_queries(12) as few:
        api_a.get("/api/v1/agents")
    agents_baseline = len(few.captured_queries)
    with schema_context(world.tenant_a.schema_name):
        principal = _key_principal(world)
        chat_message_send(principal=principal, session=session_get(principal=principal, session_id=session["id"]),
                          content="one")
    connection.set_schema_to_public()
    with django_assert_max_num_queries(12) as few:
        api_a.get(f"/api/v1/sessions/{session['id']}/messages")
    messages_baseline = len(few.captured_queries)
    for n in range(12):
        _session(api_a, agent_id=_active_agent(api_a, slug=f"agent-{n}")["id"])
    with schema_context(world.tenant_a.schema_name):
        Turn.objects.filter(session_id=session["id"]).update(status=Turn.Status.COMPLETED)
        for n in range(10):
            turn = chat_message_send(principal=principal,
                                     session=session_get(principal=principal, session_id=session["id"]),
                                     content=f"question {n}")
            Turn.objects.filter(pk=turn.pk).update(status=Turn.Status.COMPLETED)
    connection.set_schema_to_public()
    with django_assert_max_num_queries(sessions_baseline):
        assert len(api_a.get("/api/v1/sessions").json()["items"]) == 13
    with django_assert_max_num_queries(agents_baseline):
        assert len(api_a.get("/api/v1/agents").json()["items"]) == 13
    with django_assert_max_num_queries(messages_baseline):
        assert len(api_a.get(f"/api/v1/sessions/{session['id']}/messages").json()["items"]) == 11


def test_the_relay_drops_repeats_and_overlaps_and_completes_the_text() -> None:
    relay = TurnRelay(7)
    queued = {"event": "turn.queued", "turn_id": 7}
    assert relay.accept(queued) == [queued] and relay.accept(queued) == []
    assert relay.accept({"event": "turn.queued", "turn_id": 8}) == []  # another turn of the session
    assert relay.accept({"event": "token.delta", "turn_id": 7, "offset": 0, "text": "Hello, wo"})[0]["text"] == \
        "Hello, wo"
    assert relay.accept({"event": "token.delta", "turn_id": 7, "offset": 0, "text": "Hello"}) == []
    overlap = relay.accept({"event": "token.delta", "turn_id": 7, "offset": 7, "text": "world"})
    assert overlap == [{"event": "token.delta", "turn_id": 7, "offset": 9, "text": "rld"}]
    assert relay.accept({"event": "token.delta", "turn_id": 7, "offset": 20, "text": "gap"}) == []
    done = relay.accept({"event": "turn.completed", "turn_id": 7, "content": "Hello, world!"})
    assert [e["event"] for e in done] == ["token.delta", "turn.completed"]
    assert done[0]["offset"] == 12 and done[0]["text"] == "!"
    assert relay.accept({"event": "turn.failed", "turn_id": 7}) == []


def test_waiting_reads_a_finished_turn_from_the_database_and_gives_up_on_a_quiet_one(
        world: World, api_a: Client) -> None:
    session = _session(api_a, agent_id=_active_agent(api_a)["id"])
    schema = world.tenant_a.schema_name
    with schema_context(schema):
        principal = _key_principal(world)
        turn = chat_message_send(principal=principal, session=session_get(principal=principal,
                                                                          session_id=session["id"]),
                                 content="question")
    assert turn_wait(schema=schema, session_id=session["id"], turn_id=turn.pk, wait_seconds=0.3) is None
    with schema_context(schema):
        answer = Message.objects.create(session_id=session["id"], role=Message.Role.ASSISTANT, content="answer",
                                        output_tokens=1)
        Turn.objects.filter(pk=turn.pk).update(status=Turn.Status.COMPLETED, assistant_message=answer,
                                               input_tokens=5, output_tokens=1)
    final = turn_wait(schema=schema, session_id=session["id"], turn_id=turn.pk, wait_seconds=5)
    assert final is not None and final["event"] == "turn.completed"
    assert final["content"] == "answer" and final["usage"]["input_tokens"] == 5
    connection.set_schema_to_public()


def test_an_answer_not_ready_in_time_gets_504_with_the_turn_id(world: World, api_a: Client, settings: Any) -> None:
    settings.CHAT_SYNC_WAIT_SECONDS = 0.3
    session = _session(api_a, agent_id=_active_agent(api_a)["id"])
    response = _post(api_a, f"/api/v1/sessions/{session['id']}/messages", {"content": "Anyone there?"})
    assert response.status_code == 504  # no worker sees this test's transaction, so the turn stays queued
    error = response.json()["error"]
    assert error["code"] == "turn_not_finished" and error["details"]["session_id"] == session["id"]
    turn = api_a.get(f"/api/v1/sessions/{session['id']}/turns/{error['details']['turn_id']}").json()
    assert turn["status"] == "queued"


# --- Live: daphne + Celery + the scripted model server -----------------------------------------

@pytest.fixture
def live(portal: Portal, celery_worker: Any, chat_world: ChatWorld) -> Iterator[httpx.Client]:
    """An httpx client on the live server, as tenant A's all-scopes key."""
    with httpx.Client(base_url=f"http://127.0.0.1:{portal.port}", timeout=60,
                      headers={"Host": f"acme.localhost:{portal.port}",
                               "Authorization": f"Bearer {portal.world.key_a}"}) as client:
        yield client


def _live_session(live: httpx.Client, chat_world: ChatWorld) -> int:
    response = live.post("/api/v1/sessions", json={"agent": chat_world.agent_slug, "title": "live"})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def _stream(live: httpx.Client, session_id: int, content: str) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """POST a streamed message; the response and its events, read as they arrive."""
    events: list[dict[str, Any]] = []
    with live.stream("POST", f"/api/v1/sessions/{session_id}/messages",
                     json={"content": content, "stream": True}) as response:
        buffer = ""
        for text in response.iter_text():
            buffer += text
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                events.extend(sse_events(block + "\n\n"))
    return response, events


def test_streamed_answers_arrive_as_server_sent_events(live: httpx.Client, chat_world: ChatWorld,
                                                       scripted_llm: ScriptedLLM) -> None:
    tokens = ["The", " refund", " window", " is", " 30", " days."]
    # Tokens far apart compared with the worker's delta batching, so the answer comes in pieces.
    scripted_llm.script(chat_world.model, tokens=tokens, token_interval=0.2)
    session_id = _live_session(live, chat_world)
    response, events = _stream(live, session_id, "How long is the refund window?")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache" and response.headers["x-accel-buffering"] == "no"
    names = [e["event"] for e in events]
    assert names[:2] == ["turn.queued", "turn.started"] and names[-1] == "turn.completed"
    assert [name for name in names if name in FINAL] == ["turn.completed"]
    deltas = [e for e in events if e["event"] == "token.delta"]
    texts = [d["text"] for d in deltas]
    # In order and without overlap; the worker may batch tokens that arrive close together.
    assert "".join(texts) == "".join(tokens) and len(texts) > 1
    assert [d["offset"] for d in deltas] == [len("".join(texts[:i])) for i in range(len(texts))]
    final = events[-1]
    assert final["content"] == "".join(tokens)
    # The turn's cost is the sum of its usage events: 42 x 1 + 6 x 2 per million tokens.
    assert final["usage"] == {"input_tokens": 42, "output_tokens": 6, "estimated": False,
                              "cost": "0.000054000000", "currency": "USD"}
    assert {e["turn_id"] for e in events} == {final["turn_id"]}


def test_a_waiting_answer_returns_the_message_and_the_history_lists_both(
        live: httpx.Client, chat_world: ChatWorld, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(chat_world.model, tokens=["Thirty", " days", "."])
    session_id = _live_session(live, chat_world)
    response = live.post(f"/api/v1/sessions/{session_id}/messages", json={"content": "Refund window?"})
    assert response.status_code == 200, response.text
    message = response.json()
    assert message["role"] == "assistant" and message["content"] == "Thirty days."
    assert message["input_tokens"] == 42 and message["output_tokens"] == 3
    turn = live.get(f"/api/v1/sessions/{session_id}/turns/{message['turn_id']}").json()
    assert turn["status"] == "completed" and turn["assistant_message_id"] == message["id"]
    assert turn["model"] == f"openai/{chat_world.model}" and turn["output_tokens"] == 3
    history = live.get(f"/api/v1/sessions/{session_id}/messages").json()["items"]
    assert [(m["role"], m["content"]) for m in history] == [("user", "Refund window?"),
                                                             ("assistant", "Thirty days.")]
    assert {m["turn_id"] for m in history} == {message["turn_id"]}
    assert history[1]["citations"] == [] and history[1]["output_tokens"] == 3


def test_a_failed_turn_is_reported_in_the_stream_and_as_an_error_body(
        live: httpx.Client, chat_world: ChatWorld, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(chat_world.model, failure="status:400")
    session_id = _live_session(live, chat_world)
    _, events = _stream(live, session_id, "Will this fail?")
    assert events[-1]["event"] == "turn.failed" and events[-1]["error"]["code"]
    waited = live.post(f"/api/v1/sessions/{session_id}/messages", json={"content": "And this?"})
    assert waited.status_code == 502
    error = waited.json()["error"]
    assert error["code"] == events[-1]["error"]["code"] and error["details"]["session_id"] == session_id
    scripted_llm.script(chat_world.model)


def test_a_streamed_turn_can_be_cancelled(live: httpx.Client, chat_world: ChatWorld,
                                          scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(chat_world.model, tokens=["slow"] * 40, token_interval=0.25)
    session_id = _live_session(live, chat_world)
    events: list[dict[str, Any]] = []
    cancelled = False
    with live.stream("POST", f"/api/v1/sessions/{session_id}/messages",
                     json={"content": "Take your time", "stream": True}) as response:
        buffer = ""
        for text in response.iter_text():
            buffer += text
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                for event in sse_events(block + "\n\n"):
                    events.append(event)
                    if event["event"] == "token.delta" and not cancelled:
                        cancelled = True
                        busy = live.post(f"/api/v1/sessions/{session_id}/messages", json={"content": "again"})
                        assert busy.status_code == 409
                        cancel = live.post(f"/api/v1/sessions/{session_id}/turns/{event['turn_id']}/cancel")
                        assert cancel.status_code == 200
    assert events[-1]["event"] == "turn.cancelled"
    partial = "".join(e["text"] for e in events if e["event"] == "token.delta")
    assert partial and len(partial) < len("slow") * 40
    turn = live.get(f"/api/v1/sessions/{session_id}/turns/{events[-1]['turn_id']}").json()
    assert turn["status"] == "cancelled" and turn["cancel_requested"] is True
    scripted_llm.script(chat_world.model)


def test_a_client_that_hangs_up_mid_stream_leaves_the_turn_running(
        portal: Portal, live: httpx.Client, chat_world: ChatWorld, scripted_llm: ScriptedLLM) -> None:
    scripted_llm.script(chat_world.model, tokens=["a", "b", "c", "d", "e"], token_interval=0.2)
    session_id = _live_session(live, chat_world)
    with live.stream("POST", f"/api/v1/sessions/{session_id}/messages",
                     json={"content": "Hang up on me", "stream": True}) as response:
        first = sse_events(next(response.iter_text()))
    turn_id = first[0]["turn_id"]
    deadline = time.monotonic() + 30
    status = ""
    while time.monotonic() < deadline and status != "completed":
        status = live.get(f"/api/v1/sessions/{session_id}/turns/{turn_id}").json()["status"]
        time.sleep(0.2)  # polling the worker's progress, not asserting on time
    assert status == "completed"
    assert live.post(f"/api/v1/sessions/{session_id}/messages", json={"content": "Still there?"}).status_code == 200
    assert "Traceback" not in portal.log.read_text(errors="replace")


def test_live_sessions_are_private_to_their_principal(portal: Portal, live: httpx.Client,
                                                      chat_world: ChatWorld) -> None:
    theirs = chat_session_commit(portal.world.tenant_a, portal.world.user("operator"), chat_world.agent_id)
    assert live.get(f"/api/v1/sessions/{theirs}").status_code == 404
    assert live.post(f"/api/v1/sessions/{theirs}/messages", json={"content": "hi"}).status_code == 404
    assert theirs not in [s["id"] for s in live.get("/api/v1/sessions?limit=200").json()["items"]]
    mine = _live_session(live, chat_world)
    b_on_a = {"Authorization": f"Bearer {portal.world.key_b}"}
    assert live.get(f"/api/v1/sessions/{mine}", headers=b_on_a).status_code == 401
    streamed = live.post(f"/api/v1/sessions/{mine}/messages", headers=b_on_a,
                         json={"content": "hi", "stream": True})
    assert streamed.status_code == 401 and json.loads(streamed.text)["error"]["code"] == "invalid_api_key"
