"""Plan rate limits (``config.ratelimit``): 429 with ``Retry-After`` and ``RateLimit-*`` on the
API, the OpenAI-compatible endpoint and search; the console search page; the chat socket; per key
and per member; per tenant; unlimited plans never reach Redis; two processes share one limit.

Each test counts under a Redis key prefix of its own (``_own_prefix``), so tests (and other runs
on the same Redis) never share counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django_tenants.utils import schema_context

from agents.models import Agent, Message, Turn
from agents.services import (
    agent_create,
    agent_version_publish,
    chat_message_accept,
    chat_message_send,
    chat_session_create,
)
from config import ratelimit
from config.errors import TooManyRequests
from config.redis import redis_client
from knowledge.services import collection_create
from tenants.models import ApiKey, Membership, Plan, Tenant
from tenants.principal import Principal
from tenants.roles import PERMISSIONS
from tenants.services.keys import api_key_create
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client
from tests.factories import PlanFactory

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parents[2]
HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")


@pytest.fixture(autouse=True)
def _own_prefix(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    prefix = f"ratelimit-test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setattr(ratelimit, "KEY_PREFIX", prefix)
    limiter = ratelimit._limiter  # a test may replace it; its cache holds this prefix's storage
    limiter.cache_clear()
    yield prefix
    limiter.cache_clear()
    keys = list(redis_client().scan_iter(f"{prefix}:*"))
    if keys:
        redis_client().delete(*keys)


def _plan(tenant: Tenant, **limits: int | None) -> Plan:
    plan = PlanFactory(name="Starter", **limits)
    Tenant.objects.filter(pk=tenant.pk).update(plan=plan)
    return plan


def _member_principal(tenant: Tenant, persona_user: Any) -> Principal:
    return Principal.for_member(
        Membership.objects.select_related("user", "tenant", "tenant__plan").get(tenant=tenant, user=persona_user)
    )


def _assert_limited(response: Any, limit: str, allowed: int) -> dict[str, Any]:
    assert response.status_code == 429, response.content
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    assert error["details"]["limit"] == limit and error["details"]["allowed"] == allowed
    assert limit in error["message"] and "Starter plan" in error["message"]
    retry_after = int(response["Retry-After"])
    assert 1 <= retry_after <= 60
    assert response["RateLimit-Limit"] == str(allowed)
    assert response["RateLimit-Remaining"] == "0"
    assert 1 <= int(response["RateLimit-Reset"]) <= 60
    return error  # type: ignore[no-any-return]


# --- The REST API ---------------------------------------------------------------------------------


def test_a_200_carries_the_ratelimit_headers_counting_down(world: World, api_a: Client) -> None:
    _plan(world.tenant_a, api_requests_per_minute=5)
    first = api_a.get("/api/v1/me")
    second = api_a.get("/api/v1/me")
    assert first.status_code == second.status_code == 200
    assert (first["RateLimit-Limit"], first["RateLimit-Remaining"]) == ("5", "4")
    assert (second["RateLimit-Limit"], second["RateLimit-Remaining"]) == ("5", "3")
    assert 1 <= int(second["RateLimit-Reset"]) <= 60
    assert not second.has_header("Retry-After")


def test_the_request_past_the_limit_gets_429_with_retry_after_and_the_api_error_body(
    world: World, api_a: Client
) -> None:
    _plan(world.tenant_a, api_requests_per_minute=3)
    assert [api_a.get("/api/v1/agents").status_code for _ in range(3)] == [200, 200, 200]
    refused = api_a.get("/api/v1/agents")
    error = _assert_limited(refused, "api_requests_per_minute", 3)
    assert error["details"]["window_seconds"] == 60
    assert set(error) == {"code", "message", "details", "request_id"}
    # Refused requests are not counted, and every path of the API shares the one allowance.
    assert api_a.post("/api/v1/agents", {"slug": "x", "name": "X"}, content_type="application/json").status_code == 429


def test_the_openai_compatible_endpoint_answers_429_with_the_same_body(world: World, api_a: Client) -> None:
    _plan(world.tenant_a, api_requests_per_minute=1)
    assert api_a.get("/api/v1/openai/models").status_code == 200
    refused = api_a.post(
        "/api/v1/openai/chat/completions",
        {"model": "helpdesk", "messages": [{"role": "user", "content": "Hi"}]},
        content_type="application/json",
    )
    _assert_limited(refused, "api_requests_per_minute", 1)


def test_keys_and_members_have_allowances_of_their_own(world: World, api_a: Client) -> None:
    _plan(world.tenant_a, api_requests_per_minute=2)
    other_key = api_key_create(
        principal=Principal.system("tests", tenant=world.tenant_a),
        tenant=world.tenant_a,
        name="second",
        scopes=list(PERMISSIONS),
    ).secret
    connection.set_schema_to_public()
    other = api_client(HOST_A, other_key)
    member = host_client(HOST_A, world.user("operator"))
    for _ in range(2):
        assert api_a.get("/api/v1/me").status_code == 200
    assert api_a.get("/api/v1/me").status_code == 429
    # Another key of the same tenant (even of the same person) and a member are not refused.
    assert other.get("/api/v1/me")["RateLimit-Remaining"] == "1"
    assert member.get("/api/v1/me")["RateLimit-Remaining"] == "1"
    assert member.get("/api/v1/me").status_code == 200
    assert member.get("/api/v1/me").status_code == 429
    assert other.get("/api/v1/me").status_code == 200


def test_tenant_a_traffic_does_not_use_tenant_b_allowance(world: World, api_a: Client) -> None:
    plan = _plan(world.tenant_a, api_requests_per_minute=1)
    Tenant.objects.filter(pk=world.tenant_b.pk).update(plan=plan)  # the same plan, counted apart
    api_b = api_client(HOST_B, world.key_b)
    assert api_a.get("/api/v1/me").status_code == 200
    assert api_a.get("/api/v1/me").status_code == 429
    answer_b = api_b.get("/api/v1/me")
    assert answer_b.status_code == 200 and answer_b["RateLimit-Remaining"] == "0"
    # The outsider's key on tenant A's host is refused as before (401), not counted in A.
    assert api_client(HOST_A, world.key_b).get("/api/v1/me").status_code == 401


def test_an_unlimited_plan_or_no_plan_makes_no_redis_call(
    world: World, api_a: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_redis() -> Any:
        raise AssertionError("an unlimited plan must not reach Redis")

    monkeypatch.setattr(ratelimit, "_limiter", no_redis)
    _plan(world.tenant_a, api_requests_per_minute=None, kb_searches_per_minute=None, chat_turns_per_minute=None)
    response = api_a.get("/api/v1/me")
    assert response.status_code == 200 and not response.has_header("RateLimit-Limit")
    Tenant.objects.filter(pk=world.tenant_a.pk).update(plan=None)
    assert api_a.get("/api/v1/me").status_code == 200
    assert (
        api_a.post(
            "/api/v1/knowledge/search",
            {"query": "refund", "collection_ids": [999_999]},
            content_type="application/json",
        ).status_code
        == 404
    )  # no such collection, not 429


def test_an_unreachable_redis_lets_requests_through(
    world: World, api_a: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    class Down:
        def hit(self, *args: Any) -> bool:
            raise redis.ConnectionError("down")

    monkeypatch.setattr(ratelimit, "_limiter", lambda: Down())
    _plan(world.tenant_a, api_requests_per_minute=1)
    assert [api_a.get("/api/v1/me").status_code for _ in range(3)] == [200, 200, 200]


# --- Chat -----------------------------------------------------------------------------------------


def _published_agent(tenant: Tenant) -> Agent:
    system = Principal.system("tests", tenant=tenant)
    agent = agent_create(principal=system, slug=f"rl-{uuid.uuid4().hex[:6]}", name="Limited")
    agent_version_publish(principal=system, version=agent.versions.get())
    return Agent.objects.get(pk=agent.pk)


def test_chat_messages_past_the_limit_are_refused_and_leave_no_turn(world: World) -> None:
    _plan(world.tenant_a, chat_turns_per_minute=2)
    with schema_context(world.tenant_a.schema_name):
        agent = _published_agent(world.tenant_a)
        operator = _member_principal(world.tenant_a, world.user("operator"))
        sessions = [chat_session_create(principal=operator, agent=agent) for _ in range(3)]
        for session in sessions[:2]:
            chat_message_send(principal=operator, session=session, content="Hello", enqueue=False)
        with pytest.raises(TooManyRequests) as refused:
            chat_message_send(principal=operator, session=sessions[2], content="Hello", enqueue=False)
        assert refused.value.details["limit"] == "chat_turns_per_minute"
        assert refused.value.retry_after is not None and refused.value.headers["RateLimit-Remaining"] == "0"
        assert not Message.objects.filter(session=sessions[2]).exists()
        # The socket's worker path does not count again (the socket counted the message).
        turn = chat_message_accept(principal=operator, session_id=sessions[2].pk, content="Hello", queue="llm.standard")
        assert turn.status == Turn.Status.RUNNING
        # Another member has an allowance of their own.
        admin = _member_principal(world.tenant_a, world.user("admin"))
        chat_message_send(
            principal=admin, session=chat_session_create(principal=admin, agent=agent), content="Hello", enqueue=False
        )


def test_chat_over_rest_and_the_openai_endpoint_answer_429(world: World, api_a: Client) -> None:
    _plan(world.tenant_a, chat_turns_per_minute=0)
    with schema_context(world.tenant_a.schema_name):
        agent = _published_agent(world.tenant_a)
    connection.set_schema_to_public()
    session = api_a.post("/api/v1/sessions", {"agent_id": agent.pk}, content_type="application/json").json()
    refused = api_a.post(
        f"/api/v1/sessions/{session['id']}/messages", {"content": "Hello"}, content_type="application/json"
    )
    _assert_limited(refused, "chat_turns_per_minute", 0)
    refused = api_a.post(
        "/api/v1/openai/chat/completions",
        {"model": agent.slug, "messages": [{"role": "user", "content": "Hi"}]},
        content_type="application/json",
    )
    _assert_limited(refused, "chat_turns_per_minute", 0)


def test_the_chat_socket_sends_an_error_event_and_stays_open(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer itself, through channels' communicator: the connection check and the snapshot
    are stubbed (they read committed rows), the hand-off to the broker is recorded, and the clock
    of the limiter is moved past the window."""
    from channels.testing import WebsocketCommunicator

    from agents import consumers

    plan = _plan(world.tenant_a, chat_turns_per_minute=2)
    membership = Membership.objects.select_related("user", "tenant").get(
        tenant=world.tenant_a, user=world.user("operator")
    )
    membership.tenant.plan = plan
    principal = Principal.for_member(membership)
    handed: list[str] = []

    async def authorize(scope: Any, session_id: int) -> tuple[str, Any, int, str]:
        return world.tenant_a.schema_name, principal, membership.pk, "llm.light"

    async def snapshot(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return []

    monkeypatch.setattr(consumers, "_authorize", authorize)
    monkeypatch.setattr(consumers, "_snapshot", snapshot)
    monkeypatch.setattr(consumers, "_hand_off", lambda schema, queue, mid, sid, text, received: handed.append(text))
    clock = {"now": 1_000_000.0}
    monkeypatch.setattr("time.time", lambda: clock["now"])  # the limiter's and config.ratelimit's clock

    async def conversation() -> list[dict[str, Any]]:
        communicator = WebsocketCommunicator(consumers.ChatConsumer.as_asgi(), "/ws/chat/1/?format=json")
        communicator.scope["url_route"] = {"kwargs": {"session_id": 1}}
        connected, _ = await communicator.connect()
        assert connected
        received = []
        for text in ("one", "two", "three"):
            await communicator.send_json_to({"content": text})
        received.append(await communicator.receive_json_from(timeout=5))
        clock["now"] += 61  # the window has moved past the first two messages
        await communicator.send_json_to({"content": "four"})
        assert await communicator.receive_nothing(timeout=0.5)
        await communicator.disconnect()
        return received

    received = asyncio.run(conversation())
    assert handed == ["one", "two", "four"]
    [event] = received
    assert event["event"] == "error" and event["error"]["code"] == "rate_limited"
    assert event["error"]["retry_after"] == 60 and event["error"]["details"]["limit"] == "chat_turns_per_minute"


# --- Search ---------------------------------------------------------------------------------------


def test_search_past_the_limit_gets_429_on_the_api(world: World, api_a: Client) -> None:
    _plan(world.tenant_a, kb_searches_per_minute=1, api_requests_per_minute=100)
    with schema_context(world.tenant_a.schema_name):
        collection = collection_create(principal=Principal.system("tests", tenant=world.tenant_a), name="Docs")
    connection.set_schema_to_public()
    body = {"query": "refund", "collection_ids": [collection.pk], "mode": "keyword"}
    ok = api_a.post("/api/v1/knowledge/search", body, content_type="application/json")
    assert ok.status_code == 200, ok.content
    assert ok["RateLimit-Limit"] == "100"  # a 200 reports the request limit
    refused = api_a.post("/api/v1/knowledge/search", body, content_type="application/json")
    _assert_limited(refused, "kb_searches_per_minute", 1)
    # A search that names no collection of the tenant is not counted: 404, not 429.
    assert (
        api_a.post(
            "/api/v1/knowledge/search",
            {"query": "x", "collection_ids": [collection.pk + 999]},
            content_type="application/json",
        ).status_code
        == 404
    )


def test_the_console_search_page_shows_the_limit_with_429(world: World, client_a: Any) -> None:
    _plan(world.tenant_a, kb_searches_per_minute=1)
    with schema_context(world.tenant_a.schema_name):
        collection_create(principal=Principal.system("tests", tenant=world.tenant_a), name="Docs")
    viewer = client_a("viewer")
    assert viewer.get("/kb/search/", {"query": "refund", "mode": "keyword"}).status_code == 200
    refused = viewer.get("/kb/search/", {"query": "refund", "mode": "keyword"})
    assert refused.status_code == 429
    assert "allows 1 knowledge-base searches per minute" in refused.content.decode()
    assert 1 <= int(refused["Retry-After"]) <= 60
    fragment = viewer.get("/kb/search/", {"query": "refund", "mode": "keyword"}, HTTP_HX_REQUEST="true")
    assert (
        fragment.status_code == 429 and "rate limit" in json.loads(fragment["HX-Trigger"])["toast"]["message"].lower()
    )
    # The outsider cannot search tenant A at all.
    assert host_client(HOST_A, world.user("outsider")).get("/kb/search/", {"query": "refund"}).status_code in (403, 404)


# --- Across processes -----------------------------------------------------------------------------

_HITTER = textwrap.dedent("""
    import sys
    import django
    django.setup()
    from config import ratelimit
    from config.errors import TooManyRequests
    from tenants.models import ApiKey, Plan, Tenant
    from tenants.principal import Principal

    prefix, schema, allowed, attempts = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ratelimit.KEY_PREFIX = prefix
    plan = Plan(pk=-1, code="xproc", name="Cross", api_requests_per_minute=allowed)  # never saved
    tenant = Tenant(schema_name=schema, slug=schema, plan=plan)
    principal = Principal(kind="api_key", tenant=tenant, permissions=frozenset(), api_key=ApiKey(key_id="shared"))
    sys.stdin.readline()  # start together
    accepted = 0
    for _ in range(attempts):
        try:
            ratelimit.rate_limit_hit(tenant=tenant, principal=principal, limit="api_requests_per_minute")
            accepted += 1
        except TooManyRequests:
            pass
    print(accepted)
""")


def test_two_processes_sharing_a_limit_allow_exactly_the_limit_in_total(_own_prefix: str) -> None:
    from tests.live import _database_url

    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": _database_url()}
    schema, allowed = f"xproc_{uuid.uuid4().hex[:8]}", 25
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _HITTER, _own_prefix, schema, str(allowed), str(allowed)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate("go\n", timeout=120)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes)
    counts = [int(out.strip().splitlines()[-1]) for out in outputs]
    assert sum(counts) == allowed, counts


# --- Keys ----------------------------------------------------------------------------------------


def test_the_bucket_is_the_key_or_the_member(world: World) -> None:
    key = ApiKey(key_id="abc123")
    assert (
        ratelimit.caller_bucket(Principal(kind="api_key", tenant=None, permissions=frozenset(), api_key=key))
        == "key:abc123"
    )
    operator = world.user("operator")
    assert ratelimit.caller_bucket(_member_principal(world.tenant_a, operator)) == f"user:{operator.pk}"
    assert ratelimit.caller_bucket(Principal.system("tests")) is None
    with pytest.raises(ValueError, match="Unknown rate limit"):
        ratelimit.plan_rate(world.tenant_a, "bananas_per_minute")
