"""The portal's ``/metrics`` families (``config.metrics``): events recorded where turns, model
calls, tool calls and budget refusals happen (a turn run in this process against the scripted
model), and the state gauges read at scrape time: queue depths in Redis, documents and pending
approvals summed over tenant schemas, model endpoint probes. Across processes:
``tests/agents/test_telemetry_live.py``."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import django_rq
import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone
from django_tenants.utils import schema_context
from prometheus_client.parser import text_string_to_metric_families

from config import metrics
from config.celery import app as celery_app
from config.redis import redis_client
from knowledge.models import Collection, Document
from tests.agents.approval_rows import member_principal, park
from tests.billing.budget_rows import agent_on_scripted_model, budget_add
from tests.conftest import World
from tests.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.django_db

Samples = dict[str, list[tuple[dict[str, str], float]]]


def _scrape(client: Client | None = None, **headers: str) -> Samples:
    response = (client or Client(HTTP_HOST="10.0.0.1")).get("/metrics", **headers)
    assert response.status_code == 200, response.content[:300]
    out: Samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == want for k, want in labels.items()))


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    metrics.tenant_state_forget()
    yield
    metrics.tenant_state_forget()


# --- Events -------------------------------------------------------------------------------


def test_a_turn_records_its_model_call_tokens_and_outcome(
    world: World, scripted_llm: ScriptedLLM, django_capture_on_commit_callbacks: Any
) -> None:
    with schema_context(world.tenant_a.schema_name):
        setup = agent_on_scripted_model(world.tenant_a, scripted_llm, world.user("operator"))
        before = _scrape()
        with django_capture_on_commit_callbacks(execute=True):
            turn = setup.run()
    assert turn.status == "completed"

    after = _scrape()
    endpoint = setup.model  # the helper names the endpoint after its model

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("portal_model_call_seconds_count", tier="light", endpoint=endpoint) == 1
    assert delta("portal_model_ttft_seconds_count", tier="light", endpoint=endpoint) == 1
    assert delta("portal_model_tokens_total", tier="light", kind="prompt") == turn.input_tokens
    assert delta("portal_model_tokens_total", tier="light", kind="completion") == turn.output_tokens
    assert delta("portal_turns_total", status="completed", error_code="") == 1


def test_a_budget_refusal_is_counted_with_its_code_and_the_failed_turn_with_its_error(
    world: World, scripted_llm: ScriptedLLM, django_capture_on_commit_callbacks: Any
) -> None:
    with schema_context(world.tenant_a.schema_name):
        setup = agent_on_scripted_model(world.tenant_a, scripted_llm, world.user("operator"))
        budget_add(limit_tokens=setup.worst_case() - 1)
        before = _scrape()
        with django_capture_on_commit_callbacks(execute=True):
            turn = setup.run()
    assert turn.error_code == "budget_exceeded"

    after = _scrape()
    assert (_value(after, "portal_budget_blocks_total", code="budget_exceeded")
            - _value(before, "portal_budget_blocks_total", code="budget_exceeded")) == 1
    assert (_value(after, "portal_turns_total", status="failed", error_code="budget_exceeded")
            - _value(before, "portal_turns_total", status="failed", error_code="budget_exceeded")) == 1
    assert (_value(after, "portal_model_call_seconds_count", endpoint=setup.model)
            == _value(before, "portal_model_call_seconds_count", endpoint=setup.model))  # never called


# --- State at scrape time -----------------------------------------------------------------


def test_queue_depth_reflects_queued_tasks_per_celery_and_rq_queue(world: World) -> None:
    before = _scrape()
    # Sent to the broker, never run: no worker consumes this run's queues during these tests.
    for _ in range(3):
        celery_app.send_task("tests.never_run", queue="llm.heavy")
    celery_app.send_task("tests.never_run", queue="llm.light", priority=6)  # another priority step's list
    job = django_rq.get_queue("default").enqueue("builtins.len", "abc")
    try:
        after = _scrape()
    finally:
        job.delete()
        prefix = metrics._celery_key_prefix()
        redis_client().delete(prefix + "llm.heavy", prefix + "llm.light", f"{prefix}llm.light\x06\x166")

    def delta(queue: str, broker: str) -> float:
        return (_value(after, "portal_queue_depth", queue=queue, broker=broker)
                - _value(before, "portal_queue_depth", queue=queue, broker=broker))

    assert delta("llm.heavy", "celery") == 3
    assert delta("llm.light", "celery") == 1
    assert delta("llm.standard", "celery") == 0
    assert delta("default", "rq") == 1
    labelled = {(labels["broker"], labels["queue"]) for labels, _ in after["portal_queue_depth"]}
    assert labelled == {("celery", q) for q in metrics.CELERY_QUEUES} | {("rq", q) for q in metrics.RQ_QUEUES}


def _documents(statuses: list[str]) -> None:
    collection = Collection.objects.create(name=f"metrics-{uuid.uuid4().hex[:6]}", embedding_model="test",
                                           embedding_dim=django_settings.EMBEDDING_DIM)
    for n, status in enumerate(statuses):
        Document.objects.create(collection=collection, title=f"doc {n}", status=status, mime_type="text/plain",
                                size_bytes=1, sha256=f"{n:064x}")


def test_documents_and_pending_approvals_are_summed_over_both_tenants(
    world: World, django_assert_max_num_queries: Any
) -> None:
    before = metrics.tenant_state_read()
    with schema_context(world.tenant_a.schema_name):
        _documents(["pending", "indexed", "indexed", "failed"])
        park(tenant=world.tenant_a, requester=member_principal(world.tenant_a, world.user("operator")))
    with schema_context(world.tenant_b.schema_name):
        _documents(["pending", "processing"])
        old = timezone.now() - dt.timedelta(hours=2)
        park(tenant=world.tenant_b, requester=member_principal(world.tenant_b, world.user("outsider")),
             created_at=old)

    # One statement over every tenant schema, after the one that lists them (and django-tenants'
    # search path); none when cached.
    with django_assert_max_num_queries(3):
        samples = _scrape()
    with django_assert_max_num_queries(0):
        _scrape()

    def delta(status: str) -> float:
        return _value(samples, "portal_ingestion_documents", status=status) - before.documents.get(status, 0)

    assert (delta("pending"), delta("processing"), delta("indexed"), delta("failed")) == (2, 1, 2, 1)
    assert _value(samples, "portal_approvals_pending") - before.approvals_pending == 2
    assert _value(samples, "portal_approvals_oldest_pending_seconds") >= 2 * 3600


def test_cached_state_is_served_until_forgotten(world: World) -> None:
    first = _scrape()
    with schema_context(world.tenant_a.schema_name):
        _documents(["failed"])
    assert _value(_scrape(), "portal_ingestion_documents", status="failed") == _value(
        first, "portal_ingestion_documents", status="failed")
    metrics.tenant_state_forget()
    assert _value(_scrape(), "portal_ingestion_documents", status="failed") == _value(
        first, "portal_ingestion_documents", status="failed") + 1


def test_model_endpoint_up_follows_the_probe_hash(world: World) -> None:
    key = metrics.endpoint_health_key()
    checked = timezone.now().isoformat()
    redis_client().hset(key, mapping={
        "101": json.dumps({"ok": True, "latency_ms": 12.5, "checked_at": checked, "name": "vllm-a",
                           "tier": "standard", "error": ""}),
        "102": json.dumps({"ok": False, "latency_ms": None, "checked_at": checked, "name": "vllm-b",
                           "tier": "heavy", "error": "timeout"}),
        "103": "not json",
    })
    try:
        samples = _scrape()
    finally:
        redis_client().delete(key)
    assert _value(samples, "portal_model_endpoint_up", endpoint="vllm-a", tier="standard") == 1
    assert _value(samples, "portal_model_endpoint_up", endpoint="vllm-b", tier="heavy") == 0
    assert len(samples["portal_model_endpoint_up"]) == 2


def test_a_source_that_fails_leaves_the_others_exposed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def down() -> dict[tuple[str, str], int]:
        raise ConnectionError("redis is down")

    monkeypatch.setattr(metrics, "queue_depths", down)
    samples = _scrape()
    assert "portal_queue_depth" not in samples
    assert "portal_ingestion_documents" in samples


def test_the_metrics_token_still_guards_the_new_families(world: World, settings: Any) -> None:
    settings.METRICS_TOKEN = "scrape-token-1"
    refused = Client(HTTP_HOST="10.0.0.1").get("/metrics")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "not_authenticated"
    wrong = Client(HTTP_HOST="10.0.0.1").get("/metrics", HTTP_AUTHORIZATION="Bearer nope")
    assert wrong.status_code == 401
    samples = _scrape(HTTP_AUTHORIZATION="Bearer scrape-token-1")
    assert "portal_queue_depth" in samples and "portal_ingestion_documents" in samples


def test_reading_the_schemas_in_several_statements_sums_the_same(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    with schema_context(world.tenant_a.schema_name):
        _documents(["pending", "failed"])
        park(tenant=world.tenant_a, requester=member_principal(world.tenant_a, world.user("operator")),
             created_at=timezone.now() - dt.timedelta(minutes=5))
    with schema_context(world.tenant_b.schema_name):
        _documents(["pending"])
        park(tenant=world.tenant_b, requester=member_principal(world.tenant_b, world.user("outsider")),
             created_at=timezone.now() - dt.timedelta(minutes=50))
    whole = metrics.tenant_state_read()
    monkeypatch.setattr(metrics, "SCHEMAS_PER_STATEMENT", 1)  # a statement per schema
    assert metrics.tenant_state_read() == whole
    assert whole.oldest_pending_at is not None and whole.oldest_pending_at <= time.time() - 50 * 60
