"""The turn machinery end to end, and every way a turn can fail: socket -> service -> Celery ->
scripted model server -> channel layer -> socket, with the rows checked in the database.

Each failure ends the turn ``failed`` with a message a person can read, and never loses the
user's message. Agents are pinned to their own endpoint on the scripted server (one scripted
model per scenario), committed, so the worker and the server see them.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from django_tenants.utils import schema_context
from websockets.exceptions import InvalidStatus

from agents.models import Agent, ChatSession, Message, Turn
from agents.services import agent_create, agent_version_publish, chat_message_send, chat_session_create, turns_sweep
from billing.models import UsageEvent
from tenants.models import Membership, ModelEndpoint
from tenants.principal import Principal
from tests.agents.conftest import ChatWorld, chat_session_commit, committed, endpoint_create, ws_connect
from tests.conftest import World
from tests.live import Portal
from tests.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.django_db

FINAL_EVENTS = ("turn.completed", "turn.failed", "turn.cancelled")
TOKENS = [f" w{i}" for i in range(12)]


def _recv(ws: Any, deadline: float) -> dict[str, Any]:
    return dict(json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.1))))


def _events_until_final(ws: Any, timeout: float = 45.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = _recv(ws, deadline)
        out.append(event)
        if event["event"] in FINAL_EVENTS:
            return out
    raise AssertionError(f"no final event; got {out}")


def _streamed(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["event"] == "token.delta")


AgentMaker = Callable[..., int]


@pytest.fixture
def make_agent(portal: Portal, scripted_llm: ScriptedLLM) -> AgentMaker:
    """``make_agent(model, **script)``: a committed, published agent in tenant A pinned to its own
    endpoint on the scripted model ``model`` (scripted with ``script``); returns the agent id.

    ``timeout_seconds``, ``collection_ids``, ``config`` (more version fields) and ``context_window``
    configure the endpoint and version; scripted models get a unique suffix so runs never share a script."""

    def make(model: str, *, timeout_seconds: float = 10.0, collection_ids: list[int] | None = None,
             config: dict[str, Any] | None = None, **script: Any) -> int:
        suffix = uuid.uuid4().hex[:8]
        name = f"turns-{model}-{suffix}"
        scripted_llm.script(name, **script)
        tenant = portal.world.tenant_a

        def create() -> int:
            endpoint = endpoint_create(name=name, model=name, api_base=scripted_llm.api_base, tier="light",
                                       priority=5000, timeout_seconds=timeout_seconds)
            with schema_context(tenant.schema_name):
                principal = Principal.system("tests", tenant=tenant)
                agent = agent_create(principal=principal, slug=name, name=name, config={
                    "system_prompt": "Answer briefly.", "tier": "light", "endpoint_id": endpoint.pk,
                    "collection_ids": collection_ids or [], **(config or {})})
                agent_version_publish(principal=principal, version=agent.versions.get())
                return int(agent.pk)

        return int(committed(create))

    return make


def _ask(portal: Portal, member_cookie: Any, agent_id: int, question: str = "What is the refund window?",
         persona: str = "operator", timeout: float = 45.0) -> tuple[list[dict[str, Any]], Turn]:
    """Open a session as ``persona``, ask ``question`` over the socket, and return the events up to
    the final one and the turn as the database has it."""
    session_id = chat_session_commit(portal.world.tenant_a, portal.world.user(persona), agent_id)
    with ws_connect(portal.port, f"/ws/chat/{session_id}/?format=json", cookie=member_cookie(persona)) as ws:
        ws.send(json.dumps({"content": question}))
        events = _events_until_final(ws, timeout)
    assert events[0]["event"] == "message.accepted", events
    with schema_context(portal.world.tenant_a.schema_name):
        turn = Turn.objects.select_related("user_message", "assistant_message").get(pk=events[0]["turn_id"])
    return events, turn


def _assert_failed_keeping_question(events: list[dict[str, Any]], turn: Turn, code: str, question: str) -> None:
    final = events[-1]
    assert final["event"] == "turn.failed", events
    assert final["error"]["code"] == code
    assert turn.status == Turn.Status.FAILED
    assert turn.error_code == code
    # Readable: a sentence for a person, not an exception's repr.
    assert turn.error_message == final["error"]["message"]
    assert turn.error_message.endswith(".") and "Error(" not in turn.error_message and len(turn.error_message) > 15
    assert turn.finished_at is not None
    assert turn.user_message.role == Message.Role.USER
    assert turn.user_message.content == question
    assert turn.assistant_message is None


# --- Failures ---------------------------------------------------------------------------------

def test_a_model_that_does_not_answer_in_time_fails_the_turn(
        portal: Portal, celery_worker: Any, make_agent: AgentMaker, member_cookie: Any) -> None:
    agent_id = make_agent("timeout", timeout_seconds=1.0, failure="timeout", hang_seconds=6.0)
    events, turn = _ask(portal, member_cookie, agent_id, "Is anyone there?")
    _assert_failed_keeping_question(events, turn, "model_timeout", "Is anyone there?")


def test_an_http_500_from_the_model_fails_the_turn(
        portal: Portal, celery_worker: Any, make_agent: AgentMaker, member_cookie: Any) -> None:
    agent_id = make_agent("http500", failure="status:500")
    events, turn = _ask(portal, member_cookie, agent_id, "Will this work?")
    _assert_failed_keeping_question(events, turn, "model_error", "Will this work?")
    assert "500" in turn.error_message


def test_a_stream_cut_after_two_tokens_fails_and_the_partial_text_is_not_an_answer(
        portal: Portal, celery_worker: Any, make_agent: AgentMaker, member_cookie: Any) -> None:
    agent_id = make_agent("cut", tokens=TOKENS, failure="cut", cut_after=2)
    events, turn = _ask(portal, member_cookie, agent_id, "Tell me everything.")
    # The two tokens already reached the user (they were on screen), but an answer that was cut
    # off is not saved as the assistant's message: the turn is failed and can be retried.
    assert _streamed(events) == "".join(TOKENS[:2])
    _assert_failed_keeping_question(events, turn, "stream_interrupted", "Tell me everything.")
    with schema_context(portal.world.tenant_a.schema_name):
        assert not Message.objects.filter(session_id=turn.session_id, role=Message.Role.ASSISTANT).exists()
        # The model did generate those tokens: they are metered (estimated, the server sent no
        # usage before the cut) and the turn carries the same counts.
        usage = {e.kind: e for e in UsageEvent.objects.filter(turn_id=turn.pk)}
    output = usage[UsageEvent.Kind.LLM_OUTPUT_TOKENS]
    assert output.quantity == turn.output_tokens > 0
    assert usage[UsageEvent.Kind.LLM_INPUT_TOKENS].quantity == turn.input_tokens > 0
    assert output.metadata["estimated"] is True


def test_an_empty_stream_fails_the_turn_as_malformed(
        portal: Portal, celery_worker: Any, make_agent: AgentMaker, member_cookie: Any) -> None:
    agent_id = make_agent("empty", failure="empty")
    events, turn = _ask(portal, member_cookie, agent_id, "Say something.")
    _assert_failed_keeping_question(events, turn, "malformed_stream", "Say something.")
    assert _streamed(events) == ""


def test_a_failing_endpoint_falls_back_to_the_next_of_the_tier(
        portal: Portal, celery_worker: Any, scripted_llm: ScriptedLLM, member_cookie: Any) -> None:
    # Platform endpoints of the heavy tier, first in it (the only other one, the local model's,
    # is last and pinned by its agent); a tenant's own endpoints serve only versions that pin them.
    suffix = uuid.uuid4().hex[:8]
    broken, working = f"turns-fb-broken-{suffix}", f"turns-fb-working-{suffix}"
    scripted_llm.script(broken, failure="status:500")
    scripted_llm.script(working, tokens=["From", " the", " second."])
    tenant = portal.world.tenant_b
    outsider = portal.world.user("outsider")

    def create() -> tuple[int, int]:
        endpoint_create(name=broken, model=broken, api_base=scripted_llm.api_base, tier="heavy", priority=1)
        endpoint_create(name=working, model=working, api_base=scripted_llm.api_base, tier="heavy", priority=2)
        with schema_context(tenant.schema_name):
            principal = Principal.for_member(Membership.objects.select_related("user", "tenant")
                                             .get(user=outsider, tenant=tenant))
            agent = agent_create(principal=principal, slug=f"fallback-{suffix}", name="Fallback",
                                 config={"system_prompt": "Answer.", "tier": "heavy"})
            agent = agent_version_publish(principal=principal, version=agent.versions.get())
            session = chat_session_create(principal=principal, agent=agent)
            return int(agent.pk), int(session.pk)

    _, session_id = committed(create)
    with ws_connect(portal.port, f"/ws/chat/{session_id}/?format=json", cookie=member_cookie("outsider"),
                    host="globex.localhost") as ws:
        ws.send(json.dumps({"content": "Who answers?"}))
        events = _events_until_final(ws)
    assert events[-1]["event"] == "turn.completed", events
    assert events[-1]["content"] == "From the second."
    assert len(scripted_llm.requests_for(broken)) == 1
    assert len(scripted_llm.requests_for(working)) == 1
    with schema_context(tenant.schema_name):
        turn = Turn.objects.get(pk=events[0]["turn_id"])
        assert turn.status == Turn.Status.COMPLETED
        assert turn.endpoint_name == working
        # One model call produced tokens: one input and one output usage event, on the second endpoint.
        kinds = sorted(UsageEvent.objects.filter(turn_id=turn.pk).values_list("kind", "metadata__endpoint"))
    assert kinds == [(UsageEvent.Kind.LLM_INPUT_TOKENS, working), (UsageEvent.Kind.LLM_OUTPUT_TOKENS, working)]
    # Platform endpoints are shared by the whole session: later tests must not fall back onto these.
    committed(lambda: ModelEndpoint.objects.filter(name__in=[broken, working]).delete())


# --- Cancel, reconnect ------------------------------------------------------------------------

def test_cancelling_a_running_turn_keeps_the_partial_answer(
        portal: Portal, celery_worker: Any, make_agent: AgentMaker, member_cookie: Any) -> None:
    tokens = [f" t{i}" for i in range(60)]
    agent_id = make_agent("slow-cancel", tokens=tokens, token_interval=0.1)
    session_id = chat_session_commit(portal.world.tenant_a, portal.world.user("operator"), agent_id)
    with ws_connect(portal.port, f"/ws/chat/{session_id}/?format=json", cookie=member_cookie("operator")) as ws:
        ws.send(json.dumps({"content": "Count slowly."}))
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while len(_streamed(events)) < 3 * len(" t0"):
            events.append(_recv(ws, deadline))
        turn_id = events[0]["turn_id"]
        ws.send(json.dumps({"action": "cancel", "turn_id": turn_id}))
        events += _events_until_final(ws)
    final = events[-1]
    assert final["event"] == "turn.cancelled", events
    with schema_context(portal.world.tenant_a.schema_name):
        turn = Turn.objects.select_related("assistant_message", "user_message").get(pk=turn_id)
    assert turn.status == Turn.Status.CANCELLED
    assert turn.user_message.content == "Count slowly."
    assert turn.assistant_message is not None
    assert final["message_id"] == turn.assistant_message.pk
    partial = turn.assistant_message.content
    assert partial == _streamed(events)
    assert "".join(tokens).startswith(partial)
    assert 3 * len(" t0") <= len(partial) < len("".join(tokens))


def test_reconnecting_mid_turn_shows_the_text_so_far_then_continues_without_duplicates(
        portal: Portal, celery_worker: Any, make_agent: AgentMaker, member_cookie: Any) -> None:
    tokens = [f" r{i}" for i in range(30)]
    agent_id = make_agent("slow-reconnect", tokens=tokens, token_interval=0.05)
    session_id = chat_session_commit(portal.world.tenant_a, portal.world.user("operator"), agent_id)
    path = f"/ws/chat/{session_id}/?format=json"
    with ws_connect(portal.port, path, cookie=member_cookie("operator")) as first:
        first.send(json.dumps({"content": "Stream for a while."}))
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while len(_streamed(seen)) < 4 * len(" r0"):
            seen.append(_recv(first, deadline))
    # An SSE client joining now reads turn.started from the database: the same model and endpoint
    # the worker announced.
    from agents.streaming import _snapshot_sync

    turn_id = next(e["turn_id"] for e in seen if e["event"] == "turn.started")
    announced = next(e for e in seen if e["event"] == "turn.started")
    started = next(e for e in _snapshot_sync(portal.world.tenant_a.schema_name, turn_id)
                   if e["event"] == "turn.started")
    assert (started["model"], started["endpoint"]) == (announced["model"], announced["endpoint"])
    assert announced["model"]
    # The first socket is gone; a new one joins mid-turn.
    with ws_connect(portal.port, path, cookie=member_cookie("operator")) as second:
        events = _events_until_final(second)
    state = events[0]
    assert state["event"] == "turn.state"
    assert state["status"] == Turn.Status.RUNNING
    assert state["question"] == "Stream for a while."
    deltas = [e for e in events if e["event"] == "token.delta"]
    snapshot = deltas[0]
    assert snapshot["offset"] == 0
    assert snapshot["text"].startswith(_streamed(seen))
    # Every later delta starts exactly where the previous one ended: no gap, no repeat.
    offset = 0
    for delta in deltas:
        assert delta["offset"] == offset
        offset += len(delta["text"])
    assert _streamed(events) == "".join(tokens)
    assert events[-1]["event"] == "turn.completed"
    assert events[-1]["content"] == "".join(tokens)


# --- Usage and retrieval ----------------------------------------------------------------------

def _indexed_collection(portal: Portal, name: str, files: dict[str, bytes], **settings: Any) -> list[int]:
    """Create a collection in tenant A (with ``settings``) holding ``files`` (name -> content), index
    them, and commit it all so live processes see it; the collection's id, then the documents' ids
    in the order of ``files``."""
    from knowledge.ingestion import ingest_documents
    from knowledge.services import collection_create, document_upload

    tenant = portal.world.tenant_a

    def create() -> list[int]:
        with schema_context(tenant.schema_name):
            principal = Principal.system("tests", tenant=tenant)
            collection = collection_create(principal=principal, name=f"{name} {uuid.uuid4().hex[:8]}", **settings)
            ids = [int(document_upload(principal=principal, collection=collection, filename=filename, data=data,
                                       queue=False).documents[0].pk)
                   for filename, data in files.items()]
            report = ingest_documents(ids)
            assert report.indexed == len(ids), report
            return [int(collection.pk), *ids]

    return list(committed(create))


@pytest.fixture
def handbook_collection(portal: Portal) -> int:
    """A committed collection in tenant A holding one indexed text document; its id."""
    text = (b"Refund policy\n\nCustomers may ask for a refund within 30 days of purchase. "
            b"Refunds are paid to the original card within five business days.\n")
    return _indexed_collection(portal, "Refunds", {"refunds.txt": text})[0]


def test_usage_events_are_recorded_per_call_with_the_endpoints_prices_and_the_kb_query(
        portal: Portal, celery_worker: Any, make_agent: AgentMaker, member_cookie: Any,
        handbook_collection: int) -> None:
    tokens = ["Within", " 30", " days", " [1]."]
    agent_id = make_agent("usage", tokens=tokens, collection_ids=[handbook_collection], prompt_tokens=321)
    events, turn = _ask(portal, member_cookie, agent_id, "How long do I have to ask for a refund?")
    final = events[-1]
    assert final["event"] == "turn.completed", events
    assert [c["title"] for c in final["citations"]] == ["Refund policy"]
    assert "citations" in [e["event"] for e in events]
    with schema_context(portal.world.tenant_a.schema_name):
        usage = list(UsageEvent.objects.filter(turn_id=turn.pk).order_by("pk"))
    by_kind = {e.kind: e for e in usage}
    assert sorted(e.kind for e in usage) == sorted([UsageEvent.Kind.KB_QUERY, UsageEvent.Kind.LLM_INPUT_TOKENS,
                                                    UsageEvent.Kind.LLM_OUTPUT_TOKENS])
    # The endpoint's prices are 1 (input) and 2 (output) per million tokens (see endpoint_create).
    inp, out = by_kind[UsageEvent.Kind.LLM_INPUT_TOKENS], by_kind[UsageEvent.Kind.LLM_OUTPUT_TOKENS]
    assert (inp.quantity, inp.unit_price, inp.cost) == (321, Decimal("0.000001"), Decimal("0.000321"))
    assert (out.quantity, out.unit_price, out.cost) == (4, Decimal("0.000002"), Decimal("0.000008"))
    assert inp.model == out.model == turn.model
    assert (inp.agent_id, inp.session_id, inp.turn_id) == (agent_id, turn.session_id, turn.pk)
    kb = by_kind[UsageEvent.Kind.KB_QUERY]
    assert (kb.quantity, kb.agent_id, kb.session_id) == (1, agent_id, turn.session_id)
    assert [r["title"] for r in turn.retrieved] == ["Refund policy"]


@pytest.fixture
def two_policies_collection(portal: Portal) -> tuple[int, int, int]:
    """A committed collection in tenant A: a long refund policy cut into many small chunks, and a
    one-chunk refund FAQ; the ids of the collection, the policy and the FAQ."""
    from knowledge.models import Chunk

    policy = "\n\n".join(f"Refund rule {n}: a refund for purchase type {n} is paid within {n + 3} days."
                          for n in range(12)).encode()
    faq = b"Refund FAQ\n\nAsk for a refund by mail; the refund is paid to the card you used."
    collection, policy_id, faq_id = _indexed_collection(portal, "Policies", {"policy.txt": policy, "faq.txt": faq},
                                                        chunk_size_tokens=32, chunk_overlap_tokens=0)
    with schema_context(portal.world.tenant_a.schema_name):
        assert Chunk.objects.filter(document_id=policy_id).count() >= 6
    return collection, policy_id, faq_id


@pytest.mark.parametrize("cap", [None, 1], ids=["no-cap", "one-per-document"])
def test_the_versions_chunks_per_document_cap_reaches_retrieval(
        portal: Portal, celery_worker: Any, make_agent: AgentMaker, member_cookie: Any,
        two_policies_collection: tuple[int, int, int], cap: int | None) -> None:
    collection, policy, faq = two_policies_collection
    agent_id = make_agent("capped", tokens=["Paid", " [1]."], collection_ids=[collection],
                          config={"retrieval_top_k": 4, "retrieval_max_chunks_per_document": cap})
    events, turn = _ask(portal, member_cookie, agent_id, "How is a refund paid?")
    assert events[-1]["event"] == "turn.completed", events
    documents = [r["document_id"] for r in turn.retrieved]
    if cap is None:
        # Without a cap the policy's many matching chunks fill the top 4.
        assert len(documents) == 4 and documents.count(policy) >= 3, turn.retrieved
    else:
        # One chunk of each: two documents hold fewer than top_k chunks' worth.
        assert sorted(documents) == sorted([policy, faq]), turn.retrieved


# --- Isolation over the socket ----------------------------------------------------------------

def _refused(port: int, path: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as refused, ws_connect(port, path, **kwargs):
        pass
    return int(refused.value.response.status_code)


def test_only_the_sessions_owner_may_open_its_socket_from_an_allowed_origin(
        portal: Portal, celery_worker: Any, chat_world: ChatWorld, member_cookie: Any) -> None:
    session_id = chat_session_commit(portal.world.tenant_a, portal.world.user("operator"), chat_world.agent_id)
    path = f"/ws/chat/{session_id}/?format=json"
    # Tenant B's member on tenant A's host.
    assert _refused(portal.port, path, cookie=member_cookie("outsider")) == 403
    # Tenant B's member on tenant B's host: the session id is not one of B's (nor B's member's).
    assert _refused(portal.port, path, cookie=member_cookie("outsider"), host="globex.localhost") == 403
    # A member of tenant A who does not own the session.
    assert _refused(portal.port, path, cookie=member_cookie("viewer")) == 403
    # The owner, but the page that opened the socket is on another site.
    assert _refused(portal.port, path, cookie=member_cookie("operator"), origin="http://evil.example") == 403
    # Not signed in.
    assert _refused(portal.port, path, cookie=None) == 403
    # The owner from the tenant's own origin gets in.
    with ws_connect(portal.port, path, cookie=member_cookie("operator")) as ws:
        ws.send(json.dumps({"content": "Hello?"}))
        assert _recv(ws, time.monotonic() + 15)["event"] == "message.accepted"


# --- The sweeper (no live processes: the service runs in this test's transaction) -------------

def _operator_and_published_agent(world: World, *, slug: str) -> tuple[Principal, Agent]:
    """Tenant A's operator and a published light-tier agent ``slug`` (call in A's schema)."""
    tenant = world.tenant_a
    principal = Principal.for_member(Membership.objects.select_related("user", "tenant")
                                     .get(user=world.user("operator"), tenant=tenant))
    system = Principal.system("tests", tenant=tenant)
    agent = agent_create(principal=system, slug=slug, name=slug.title(), config={"tier": "light"})
    agent_version_publish(principal=system, version=agent.versions.get())
    return principal, agent


def test_the_sweeper_fails_turns_past_their_deadline_and_keeps_the_question(
        world: World, django_capture_on_commit_callbacks: Any) -> None:
    tenant = world.tenant_a
    with schema_context(tenant.schema_name):
        principal, agent = _operator_and_published_agent(world, slug="sweep-me")
        turns: dict[str, Turn] = {}
        for state in ("queued", "running", "fresh"):
            session = chat_session_create(principal=principal, agent=Agent.objects.get(pk=agent.pk))
            turns[state] = chat_message_send(principal=principal, session=session, content=f"Question {state}")
        now = timezone.now()
        Turn.objects.filter(pk=turns["queued"].pk).update(deadline=now - dt.timedelta(seconds=1))
        Turn.objects.filter(pk=turns["running"].pk).update(status=Turn.Status.RUNNING, started_at=now,
                                                           deadline=now - dt.timedelta(seconds=1))

        with django_capture_on_commit_callbacks() as published:
            result = turns_sweep(now=now)

        assert result.failed == 2
        # The sessions hear of it after the commit, one turn.failed event per failed turn.
        assert [c.args[1]["event"] for c in published] == ["turn.failed", "turn.failed"]  # type: ignore[attr-defined]
        got = {state: Turn.objects.select_related("user_message").get(pk=t.pk) for state, t in turns.items()}
        assert (got["queued"].status, got["queued"].error_code) == (Turn.Status.FAILED, "not_dispatched")
        assert (got["running"].status, got["running"].error_code) == (Turn.Status.FAILED, "worker_lost")
        for state in ("queued", "running"):
            assert got[state].error_message.endswith(".")
            assert got[state].finished_at == now
            assert got[state].user_message.content == f"Question {state}"
        assert got["fresh"].status == Turn.Status.QUEUED
        # Idempotent: a second pass finds nothing more to fail.
        assert turns_sweep(now=now).failed == 0
        assert ChatSession.objects.filter(agent_id=agent.pk).count() == 3


def test_the_sweeper_fails_a_running_turn_whose_heartbeat_is_stale_and_only_that_one(
        world: World, settings: Any) -> None:
    settings.CHAT_TURN_HEARTBEAT_STALE_SECONDS = 15
    tenant = world.tenant_a
    with schema_context(tenant.schema_name):
        principal, agent = _operator_and_published_agent(world, slug="beat-me")
        now = timezone.now()
        beats = {"silent": now - dt.timedelta(seconds=16), "fresh": now - dt.timedelta(seconds=14),
                 "unstamped": None}
        turns: dict[str, Turn] = {}
        for state, beat in beats.items():
            session = chat_session_create(principal=principal, agent=Agent.objects.get(pk=agent.pk))
            turns[state] = chat_message_send(principal=principal, session=session, content=f"Question {state}")
            # Long before their deadline (CHAT_TURN_DEADLINE_SECONDS from now).
            Turn.objects.filter(pk=turns[state].pk).update(status=Turn.Status.RUNNING, started_at=now - dt.timedelta(
                seconds=60), heartbeat_at=beat)

        assert turns_sweep(now=now).failed == 1

        got = {state: Turn.objects.get(pk=t.pk) for state, t in turns.items()}
        assert (got["silent"].status, got["silent"].error_code) == (Turn.Status.FAILED, "worker_lost")
        assert got["silent"].error_message.endswith(".")
        # A live worker's turn, and one claimed by a worker that does not stamp, wait.
        assert got["fresh"].status == got["unstamped"].status == Turn.Status.RUNNING


# --- Both streaming paths read the server's own finish reason and usage -----------------------

@pytest.mark.parametrize("path", ["direct", "litellm"])
@pytest.mark.parametrize(("script", "outcome"), [
    ({"failure": "cut", "cut_after": 2}, "stream_interrupted"),
    ({"failure": "empty"}, "malformed_stream"),
    ({"usage": False}, "estimated"),
    ({}, "counted"),
])
def test_a_stream_is_judged_by_what_the_server_sent(scripted_llm: ScriptedLLM, path: str, script: dict[str, Any],
                                                    outcome: str) -> None:
    # litellm's wrapper invents a finish reason ("stop") and a usage count when the server sends
    # none; neither may turn a cut stream into an answer or an estimate into a count.
    from agents.runtime import llm
    from config.crypto import secret_encrypt
    from tenants.models import ModelEndpoint

    name = f"judge-{uuid.uuid4().hex[:8]}"
    scripted_llm.script(name, tokens=TOKENS, **script)
    endpoint = ModelEndpoint(name=name, model=f"openai/{name}", api_base=scripted_llm.api_base,
                             api_key_encrypted=secret_encrypt(""), timeout_seconds=10)
    stream = llm._stream_direct if path == "direct" else llm._stream_one
    result = llm.StreamResult(endpoint=endpoint)
    deltas: list[str] = []
    try:
        stream(endpoint, [{"role": "user", "content": "hi"}], temperature=0.0, max_tokens=50, response_format=None,
               on_delta=deltas.append, should_stop=lambda: False, result=result)
    except llm.LLMError as error:
        assert error.code == outcome
        assert error.fallback_ok is (outcome == "malformed_stream")
        return
    assert outcome in ("counted", "estimated"), f"expected {outcome}, got a finished stream"
    assert result.finish_reason == "stop"
    assert "".join(deltas) == result.text == "".join(TOKENS)
    if outcome == "counted":
        assert (result.input_tokens, result.output_tokens) == (42, len(TOKENS))
    else:
        assert (result.input_tokens, result.output_tokens) == (0, 0)  # stream_chat estimates and flags it
        assert outcome == "estimated"
