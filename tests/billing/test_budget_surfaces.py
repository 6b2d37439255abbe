"""Where a budget refusal shows: the turn's ``turn.failed`` event (relayed as is by SSE and the
chat socket), 429 on the OpenAI-compatible and REST endpoints, the streaming error chunk, the
console page and banner, and the signed alert webhook."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.db import connection
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from django_tenants.utils import schema_context

from agents import openai_api
from agents.api import turn_outcome_error
from agents.runtime import orchestrator
from billing.models import Budget, BudgetPeriod
from billing.services.budgets import budget_fold, budget_reserve, budget_settle, webhook_post
from billing.services.budgets.alerts import SIGNATURE_HEADER, TIMESTAMP_HEADER
from config.crypto import secret_encrypt
from tests.billing.budget_rows import agent_on_scripted_model, budget_add
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client
from tests.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.django_db


def test_a_refused_turn_publishes_turn_failed_with_the_budget_code(
    world: World, scripted_llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    published: list[dict[str, Any]] = []
    monkeypatch.setattr(orchestrator.events, "publish", lambda group, event, **kw: published.append(event))
    with schema_context(world.tenant_a.schema_name):
        setup = agent_on_scripted_model(world.tenant_a, scripted_llm, world.user("operator"))
        budget_add(name="Tight", limit_tokens=1)
        turn = setup.run()
    failed = [e for e in published if e["event"] == "turn.failed"]
    assert failed == [{"event": "turn.failed", "turn_id": turn.pk,
                       "error": {"code": "budget_exceeded", "message": turn.error_message}}]
    assert "Tight" in failed[0]["error"]["message"]


def test_the_openai_endpoint_answers_429_when_a_blocking_budget_has_no_room(world: World,
                                                                            scripted_llm: ScriptedLLM) -> None:
    with schema_context(world.tenant_a.schema_name):
        setup = agent_on_scripted_model(world.tenant_a, scripted_llm, world.user("operator"))
        budget = budget_add(name="Spent", scope="agent", agent=setup.agent.slug, limit_tokens=10)
        hold = budget_reserve(tenant=world.tenant_a, tokens=10, cost=Decimal(0), agent_slug=setup.agent.slug)
        budget_settle(hold=hold, tokens=10, cost=Decimal(0))
        budget_fold(hold=hold)
        turns_before = setup.agent.sessions.count() if hasattr(setup.agent, "sessions") else None
    connection.set_schema_to_public()
    response = api_client(HOST_A, world.key_a).post(
        "/api/v1/openai/chat/completions", data=json.dumps({"model": setup.agent.slug,
                                                            "messages": [{"role": "user", "content": "Hi"}]}),
        content_type="application/json")
    assert response.status_code == 429, response.content
    assert response.json()["error"]["code"] == "budget_exceeded"
    assert "Spent" in response.json()["error"]["message"]
    assert setup.requests() == 0
    with schema_context(world.tenant_a.schema_name):
        assert BudgetPeriod.objects.get(budget=budget).spent_tokens == 10
        if turns_before is not None:
            assert setup.agent.sessions.count() == turns_before


@pytest.mark.parametrize(("code", "status"), [("budget_exceeded", 429), ("quota_exceeded", 429),
                                              ("model_error", 502)])
def test_a_turn_failed_on_its_budget_maps_to_429(code: str, status: int) -> None:
    request = RequestFactory().post("/")
    response = turn_outcome_error(request, final={"event": "turn.failed", "error": {"code": code, "message": "m"}},
                                  turn_id=1, session_id=2)
    assert response is not None and response.status_code == status
    assert json.loads(response.content)["error"]["code"] == code


def test_the_streaming_error_chunk_carries_the_budget_code(monkeypatch: pytest.MonkeyPatch) -> None:
    async def events(**kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        yield {"event": "turn.failed", "error": {"code": "budget_exceeded", "message": "Budget 'x' is spent."}}

    monkeypatch.setattr(openai_api, "turn_events_or_keepalives", events)

    async def collect() -> list[str]:
        return [c async for c in openai_api.completion_chunks(schema="s", session_id=1, turn_id=1, wait_seconds=1,
                                                              completion_id="c", created=0, model="m",
                                                              include_usage=False)]

    chunks = asyncio.run(collect())
    error = json.loads(chunks[1].removeprefix("data: "))["error"]
    assert error["code"] == "budget_exceeded" and error["type"] == "insufficient_quota"
    assert chunks[-1] == "data: [DONE]\n\n"


def test_the_console_lists_budgets_with_progress_and_creates_one(world: World) -> None:
    owner = host_client(HOST_A, world.user("owner"))
    response = owner.post("/budgets/", {"name": "Console made", "scope": "tenant", "period": "day",
                                        "limit_tokens": "1000", "alert_thresholds": "0.5, 1", "action": "alert"})
    assert response.status_code == 302
    with schema_context(world.tenant_a.schema_name):
        budget = Budget.objects.get(name="Console made")
        assert budget.alert_thresholds == [0.5, 1.0]
        BudgetPeriod.objects.filter(budget=budget).update(spent_tokens=600, alerted=[0.5])
    connection.set_schema_to_public()
    page = owner.get("/budgets/").content.decode()
    assert "Console made" in page and "600 spent, 0 reserved / 1000" in page
    assert 'class="budget-bar-spent" x="0" y="0" width="60"' in page
    assert 'data-testid="budget-banner"' in page and "50%" in page
    invalid = owner.post("/budgets/", {"scope": "tenant", "period": "day", "action": "block"})
    assert invalid.status_code == 422 and "at least one limit" in invalid.content.decode()
    edit = owner.post(f"/budgets/{budget.pk}/edit/", {"name": "Renamed", "scope": "tenant", "period": "day",
                                                     "limit_tokens": "2000", "action": "alert"})
    assert edit.status_code == 302
    assert owner.post(f"/budgets/{budget.pk}/delete/").status_code == 302
    with schema_context(world.tenant_a.schema_name):
        assert not Budget.objects.filter(pk=budget.pk).exists()


def test_readers_see_the_page_without_forms_and_others_are_refused(world: World) -> None:
    with schema_context(world.tenant_a.schema_name):
        budget = budget_add(limit_tokens=10)
    connection.set_schema_to_public()
    auditor = host_client(HOST_A, world.user("auditor")).get("/budgets/")
    assert auditor.status_code == 200 and "Create budget" not in auditor.content.decode()
    assert host_client(HOST_A, world.user("viewer")).get("/budgets/").status_code == 403
    assert host_client(HOST_A, world.user("viewer")).get("/").content.decode().count("budget-banner") == 0
    outsider = host_client(HOST_B, world.user("outsider"))
    assert outsider.get(f"/budgets/{budget.pk}/edit/").status_code == 404
    assert host_client(HOST_A, world.user("outsider")).get("/budgets/").status_code in (302, 403, 404)


def test_the_page_costs_the_same_queries_for_one_budget_or_many(world: World) -> None:
    owner = host_client(HOST_A, world.user("owner"))
    with schema_context(world.tenant_a.schema_name):
        budget_add(limit_tokens=10)
    connection.set_schema_to_public()
    owner.get("/budgets/")
    with CaptureQueriesContext(connection) as one:
        owner.get("/budgets/")
    with schema_context(world.tenant_a.schema_name):
        for period in ("day", "month", "day"):
            budget_add(limit_tokens=10, period=period)
    connection.set_schema_to_public()
    with CaptureQueriesContext(connection) as four:
        owner.get("/budgets/")
    assert len(four.captured_queries) == len(one.captured_queries)


# --- The alert webhook -------------------------------------------------------------------------


@pytest.fixture
def receiver(settings: Any) -> Iterator[dict[str, Any]]:
    """A local webhook receiver (allowlisted): answers 503 to the first ``fail`` requests."""
    state: dict[str, Any] = {"requests": [], "fail": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
            return

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state["requests"].append({"body": body, "headers": dict(self.headers.items())})
            status = 503 if len(state["requests"]) <= state["fail"] else 204
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.EGRESS_ALLOWLIST = [f"127.0.0.1:{server.server_address[1]}"]
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/hooks/budget"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_the_webhook_is_signed_with_hmac_sha256_of_timestamp_and_body(world: World, receiver: dict[str, Any]) -> None:
    tenant = world.tenant_a
    tenant.alert_webhook_url = receiver["url"]
    tenant.alert_webhook_secret_encrypted = secret_encrypt("s3cret")
    tenant.save()
    body = json.dumps({"event": "budget.threshold_crossed", "threshold": 0.8})
    assert webhook_post(tenant_id=tenant.pk, body=body) == 204
    request = receiver["requests"][0]
    timestamp = request["headers"][TIMESTAMP_HEADER]
    expected = hmac.new(b"s3cret", timestamp.encode() + b"." + request["body"], hashlib.sha256).hexdigest()
    assert request["headers"][SIGNATURE_HEADER] == f"sha256={expected}"
    assert request["body"] == body.encode()


def test_the_webhook_task_retries_with_exponential_backoff(world: World, receiver: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from billing import tasks

    tenant = world.tenant_a
    tenant.alert_webhook_url = receiver["url"]
    tenant.alert_webhook_secret_encrypted = secret_encrypt("s3cret")
    tenant.save()
    receiver["fail"] = 3
    countdowns: list[int] = []

    class Retry(Exception):
        pass

    def retry(*, exc: Exception, countdown: int) -> Exception:
        countdowns.append(countdown)
        return Retry()

    monkeypatch.setattr(tasks.budget_alert_webhook_task, "retry", retry)
    for attempt in range(4):
        tasks.budget_alert_webhook_task.push_request(retries=attempt)
        try:
            tasks.budget_alert_webhook_task.run(tenant_id=tenant.pk, body="{}")
        except Retry:
            continue
        finally:
            tasks.budget_alert_webhook_task.pop_request()
    assert countdowns == [1, 2, 4]
    assert len(receiver["requests"]) == 4


def test_a_refused_webhook_url_is_retried_not_sent(world: World, settings: Any) -> None:
    from config.egress import EgressDenied

    settings.EGRESS_ALLOWLIST = []
    tenant = world.tenant_a
    tenant.alert_webhook_url = "http://169.254.169.254/latest"
    tenant.save()
    with pytest.raises(EgressDenied):
        webhook_post(tenant_id=tenant.pk, body="{}")
