"""The staff operations page (``/admin/ops/``): who may see it, what it shows across tenants, and
that its query count does not grow with the number of tenants."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import django_rq
import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_tenants.utils import schema_context

from agents.models import Agent, ChatSession, Message, Turn
from agents.services import agent_create
from billing.models import UsageEvent
from compliance.models import AuditEvent
from config.metrics import celery_queue_depths, endpoint_health_key
from config.redis import redis_client
from knowledge.models import Collection, Document
from tenants.models import ModelEndpoint, Tenant
from tenants.ops_selectors import ops_tenants, ops_turns_failed, rq_queue_depths
from tenants.principal import Principal
from tenants.services.provisioning import tenant_create
from tests.billing.invoice_rows import event_at
from tests.conftest import HOST_A, World, host_client, verified_staff_client

STAFF_PAGE = "/admin/ops/"


def _agent(tenant: Tenant, slug: str) -> Agent:
    with schema_context(tenant.schema_name):
        return agent_create(
            principal=Principal.system("tests", tenant=tenant),
            slug=slug,
            name=f"Agent {slug}",
            config={"system_prompt": "Be brief.", "tier": "light"},
        )


def _turn(
    tenant: Tenant, agent: Agent, *, status: str, error_code: str = "", minutes_ago: float = 5, seconds: float = 3.0
) -> Turn:
    now = timezone.now()
    started = now - dt.timedelta(minutes=minutes_ago)
    final = status in Turn.FINAL
    with schema_context(tenant.schema_name):
        session = ChatSession.objects.create(agent=agent, title="ops")
        message = Message.objects.create(session=session, role=Message.Role.USER, content="hi")
        return Turn.objects.create(
            session=session,
            agent_version=agent.versions.get(),
            user_message=message,
            status=status,
            queue="llm.light",
            deadline=now + dt.timedelta(minutes=5),
            queued_at=started,
            started_at=started,
            finished_at=started + dt.timedelta(seconds=seconds) if final else None,
            error_code=error_code,
            error_message="The model did not answer in time." if error_code else "",
            endpoint_name="scripted light",
        )


def _document(tenant: Tenant, *, status: str, minutes_ago: float, title: str) -> Document:
    with schema_context(tenant.schema_name):
        collection = Collection.objects.first() or Collection.objects.create(
            name="ops", embedding_model="test", embedding_dim=settings.EMBEDDING_DIM
        )
        return Document.objects.create(
            collection=collection,
            title=title,
            mime_type="text/plain",
            size_bytes=3,
            sha256=title.ljust(64, "0"),
            status=status,
            created_at=timezone.now() - dt.timedelta(minutes=minutes_ago),
        )


def _tenants(count: int) -> list[Tenant]:
    system = Principal.system("tests")
    made = [
        tenant_create(
            actor=system, slug=f"opsload{i}", name=f"Ops load {i}", owner_email=f"owner{i}@opsload.example"
        ).tenant
        for i in range(count)
    ]
    connection.set_schema_to_public()
    return made


def _fill(tenant: Tenant, tag: str) -> str:
    """Rows in every section of the page; returns the failed turn's row id."""
    agent = _agent(tenant, f"ops-{tag}")
    _turn(tenant, agent, status=Turn.Status.RUNNING)
    # The newest failure, so the page's 50 rows show it whatever earlier (live) tests committed.
    failed = _turn(tenant, agent, status=Turn.Status.FAILED, error_code="model_timeout", minutes_ago=0)
    _document(tenant, status=Document.Status.PENDING, minutes_ago=7, title=f"{tag}-pending")
    event_at(tenant.schema_name, timezone.now(), quantity=1000)
    return f'id="ops-turns-failed-{tenant.slug}-{failed.pk}"'


# --- Access -------------------------------------------------------------------------------------


def test_the_ops_page_is_for_verified_staff_only(world: World) -> None:
    unverified = host_client("localhost", world.user("staff"))
    assert unverified.get(STAFF_PAGE).status_code == 302
    member = host_client("localhost", world.user("owner"))
    response = member.get(STAFF_PAGE)
    assert response.status_code in {302, 403} and b"ops-queues" not in response.content
    assert host_client(HOST_A, world.user("owner")).get(STAFF_PAGE).status_code == 404
    # The staff test action too: a member (or anonymous) POST probes nothing.
    endpoint = ModelEndpoint.objects.create(name="ops closed", model="openai/x", api_base="http://127.0.0.1:9/v1")
    response = member.post(f"/admin/ops/endpoints/{endpoint.pk}/test/")
    assert response.status_code in {302, 403}
    assert not AuditEvent.objects.filter(action="model_endpoint.tested").exists()


def test_the_selectors_refuse_anyone_but_staff(world: World) -> None:
    from config.errors import Forbidden

    with pytest.raises(Forbidden):
        ops_tenants(principal=Principal.for_member(world.tenant_a.memberships.get(user=world.user("owner"))))


def test_the_admin_index_links_the_ops_page(world: World) -> None:
    assert STAFF_PAGE in verified_staff_client(world).get("/admin/").content.decode()


# --- Contents -------------------------------------------------------------------------------------


def test_it_shows_turns_backlog_and_usage_of_two_tenants(world: World) -> None:
    a, b = world.tenant_a, world.tenant_b
    agent_a, agent_b = _agent(a, "ops-a"), _agent(b, "ops-b")
    running = _turn(a, agent_a, status=Turn.Status.RUNNING, minutes_ago=2)
    failed_b = _turn(b, agent_b, status=Turn.Status.FAILED, error_code="model_timeout", minutes_ago=1, seconds=4.5)
    old_failure = _turn(a, agent_a, status=Turn.Status.FAILED, error_code="model_error", minutes_ago=60 * 30)
    done = _turn(a, agent_a, status=Turn.Status.COMPLETED)
    _document(b, status=Document.Status.PENDING, minutes_ago=10, title="b-pending")
    _document(b, status=Document.Status.PROCESSING, minutes_ago=1, title="b-processing")
    _document(a, status=Document.Status.INDEXED, minutes_ago=1, title="a-indexed")
    event_at(a.schema_name, timezone.now(), quantity=1200, kind=UsageEvent.Kind.LLM_INPUT_TOKENS)
    event_at(a.schema_name, timezone.now(), quantity=300, kind=UsageEvent.Kind.LLM_OUTPUT_TOKENS)
    event_at(b.schema_name, timezone.now(), quantity=50, kind=UsageEvent.Kind.LLM_OUTPUT_TOKENS)
    event_at(b.schema_name, timezone.now() - dt.timedelta(days=40), quantity=999_999)  # an earlier month

    page = verified_staff_client(world).get(STAFF_PAGE)
    assert page.status_code == 200
    html = page.content.decode()
    assert f'id="ops-turns-running-acme-{running.pk}"' in html
    assert f'id="ops-turns-failed-globex-{failed_b.pk}"' in html
    assert "model_timeout" in html and "Agent ops-b" in html and "4.5 s" in html
    assert f"ops-turns-failed-acme-{old_failure.pk}" not in html  # older than 24 hours
    assert f'-acme-{done.pk}"' not in html
    assert 'id="backlog-globex"' in html and 'id="backlog-acme"' not in html
    backlog_row = html.split('id="backlog-globex"')[1].split("</tr>")[0]
    assert "<td>1</td><td>1</td>" in backlog_row
    usage_a = html.split('id="usage-acme"')[1].split("</tr>")[0]
    assert "<td>1200</td><td>300</td>" in usage_a
    usage_b = html.split('id="usage-globex"')[1].split("</tr>")[0]
    assert "<td>1</td><td>0</td><td>50</td>" in usage_b  # the earlier month's event is left out


def test_the_failed_turns_are_newest_first_across_tenants(world: World) -> None:
    a, b = world.tenant_a, world.tenant_b
    older = _turn(a, _agent(a, "ops-old"), status=Turn.Status.FAILED, error_code="x", minutes_ago=0.5)
    newer = _turn(b, _agent(b, "ops-new"), status=Turn.Status.FAILED, error_code="y", minutes_ago=0.1)
    staff = Principal.for_staff(world.user("staff"))
    rows = ops_turns_failed(principal=staff, tenants=ops_tenants(principal=staff))
    keys = [(r.tenant_slug, r.turn_id) for r in rows]
    assert keys.index(("globex", newer.pk)) < keys.index(("acme", older.pk))
    row = rows[keys.index(("acme", older.pk))]
    assert row.error_code == "x" and row.duration_seconds == pytest.approx(3.0) and row.agent == "Agent ops-old"


def test_the_query_count_does_not_grow_with_the_tenants(world: World) -> None:
    failed = [_fill(world.tenant_a, "a"), _fill(world.tenant_b, "b")]
    client = verified_staff_client(world)
    client.get(STAFF_PAGE)  # warm caches (session, content types)
    with CaptureQueriesContext(connection) as two:
        html_two = client.get(STAFF_PAGE).content.decode()
    extra = _tenants(2)
    failed += [_fill(tenant, f"x{i}") for i, tenant in enumerate(extra)]
    with CaptureQueriesContext(connection) as four:
        html_four = client.get(STAFF_PAGE).content.decode()
    assert all(row in html_two for row in failed[:2])
    assert all(row in html_four for row in failed)
    assert all(f'id="backlog-{t.slug}"' in html_four for t in (world.tenant_a, world.tenant_b, *extra))
    assert all(f'id="usage-{t.slug}"' in html_four for t in extra)
    assert len(four) == len(two), [q["sql"][:120] for q in four.captured_queries]
    assert len(two) <= 12  # a fixed handful (10 when written): auth, tenants, endpoints, one per section


def test_the_cross_tenant_reads_split_into_statements_of_bounded_size(world: World, monkeypatch: Any) -> None:
    from config.db import schema_batches
    from tenants import ops_selectors

    _fill(world.tenant_a, "a")
    _fill(world.tenant_b, "b")
    staff = Principal.for_staff(world.user("staff"))
    tenants = ops_tenants(principal=staff)
    reads = (ops_selectors.ops_turns_in_flight, ops_selectors.ops_turns_failed,
             ops_selectors.ops_ingestion_backlog, ops_selectors.ops_usage_month_to_date)
    now = timezone.now()
    whole = [read(principal=staff, tenants=tenants, now=now) for read in reads]
    # One schema per statement: the same rows, in the same order, from one statement per tenant.
    monkeypatch.setattr(ops_selectors, "schema_batches", lambda items: schema_batches(items, 1))
    with CaptureQueriesContext(connection) as split_queries:
        split = [read(principal=staff, tenants=tenants, now=now) for read in reads]
    assert split == whole
    assert len(split_queries) == len(reads) * len(tenants)


# --- Queues ----------------------------------------------------------------------------------------


def test_queue_depths_count_celery_messages_under_the_broker_prefix(world: World) -> None:
    from config.celery import app

    before = celery_queue_depths()
    # Messages really sent through kombu: the task need not exist, nothing consumes llm.heavy here.
    with app.connection_for_write() as conn:
        for _ in range(3):
            app.send_task("tests.ops_never_run", queue="llm.heavy", connection=conn)
        app.send_task("tests.ops_never_run", queue="llm.heavy", priority=6, connection=conn)
    try:
        after = celery_queue_depths()
        assert after["llm.heavy"] - before["llm.heavy"] == 4
        assert after["llm.light"] == before["llm.light"]
    finally:
        prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
        redis_client().delete(f"{prefix}llm.heavy", f"{prefix}llm.heavy\x06\x166")


def test_queue_depths_count_rq_jobs(world: World) -> None:
    queue = django_rq.get_queue("default")
    before = rq_queue_depths()["default"]
    job = queue.enqueue("tests.tenants.test_staff_ops.test_queue_depths_count_rq_jobs")
    try:
        assert rq_queue_depths()["default"][0] == before[0] + 1
        html = verified_staff_client(world).get(STAFF_PAGE).content.decode()
        assert 'id="queue-rq-default"' in html and 'id="queue-celery-llm.standard"' in html
    finally:
        job.delete()


# --- Endpoint health ---------------------------------------------------------------------------------


def test_it_shows_each_platform_endpoints_last_probe(world: World) -> None:
    up = ModelEndpoint.objects.create(name="ops up", model="openai/a", api_base="http://127.0.0.1:9/v1", tier="light")
    down = ModelEndpoint.objects.create(name="ops down", model="openai/b", api_base="http://127.0.0.1:9/v1")
    never = ModelEndpoint.objects.create(name="ops never", model="openai/c", api_base="http://127.0.0.1:9/v1")
    now = timezone.now().isoformat()
    health: dict[str, Any] = {
        str(up.pk): {"ok": True, "latency_ms": 12.5, "checked_at": now, "name": up.name, "tier": "light", "error": ""},
        str(down.pk): {
            "ok": False,
            "latency_ms": None,
            "checked_at": now,
            "name": down.name,
            "tier": "standard",
            "error": "The model server could not be reached.",
        },
    }
    client = redis_client()
    client.hset(endpoint_health_key(), mapping={k: json.dumps(v) for k, v in health.items()})
    try:
        html = verified_staff_client(world).get(STAFF_PAGE).content.decode()
    finally:
        client.hdel(endpoint_health_key(), str(up.pk), str(down.pk))
    assert "ok, 12.5 ms" in html.split(f'id="probe-{up.pk}"')[1].split("</td>")[0]
    assert "could not be reached" in html.split(f'id="probe-{down.pk}"')[1].split("</td>")[0]
    assert "never probed" in html.split(f'id="probe-{never.pk}"')[1].split("</td>")[0]
    # A tenant's own endpoint is not the platform's: not on the page.
    own = ModelEndpoint.objects.create(name="ops own", model="openai/d", tenant=world.tenant_a)
    assert f'id="endpoint-{own.pk}"' not in verified_staff_client(world).get(STAFF_PAGE).content.decode()


def test_money_is_summed_exactly(world: World) -> None:
    event_at(world.tenant_a.schema_name, timezone.now(), quantity=3, unit_price=Decimal("0.333333333333"))
    staff = Principal.for_staff(world.user("staff"))
    from tenants.ops_selectors import ops_usage_month_to_date

    usage = {u.tenant.slug: u for u in ops_usage_month_to_date(principal=staff, tenants=ops_tenants(principal=staff))}
    assert usage["acme"].costs == [("USD", Decimal("0.999999999999"))]


def test_the_page_loads_htmx_under_its_content_security_policy(world: World) -> None:
    import re

    response = verified_staff_client(world).get(STAFF_PAGE)
    policy = response.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", policy)
    assert nonce is not None
    html = response.content.decode()
    assert f'src="/static/vendor/htmx/htmx.min.js" nonce="{nonce.group(1)}"' in html
    assert '"includeIndicatorStyles": false' in html  # htmx adds no inline style element
    assert "style=" not in html.split('id="content-main"')[1]
