"""The budgets API: CRUD with validation (422 naming the field), scopes billing:read /
billing:write (viewer 403), another tenant's budget 404, audit events, query counts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django_tenants.utils import schema_context

from agents.services import agent_create
from billing.models import Budget, BudgetPeriod
from billing.services.usage import usage_event_record
from compliance.models import AuditEvent
from tenants.models import ApiKey
from tenants.principal import Principal
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client

pytestmark = pytest.mark.django_db


def _send(client: Client, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    return getattr(client, method)(path, data=json.dumps(body or {}), content_type="application/json")


@pytest.fixture
def agent_slug(world: World) -> str:
    with schema_context(world.tenant_a.schema_name):
        agent_create(principal=Principal.system("tests", tenant=world.tenant_a), slug="budgeted", name="Budgeted",
                     config={"system_prompt": "Hi."})
    connection.set_schema_to_public()
    return "budgeted"


def test_a_budget_is_created_read_changed_and_deleted_with_audit_events(world: World, api_a: Client,
                                                                        agent_slug: str) -> None:
    created = _send(api_a, "post", "/api/v1/budgets", {
        "name": "Helpdesk monthly", "scope": "agent", "agent": agent_slug, "period": "month",
        "limit_tokens": 100000, "limit_cost": "25.50", "action": "block"})
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["limit_cost"] == "25.500000"
    assert body["alert_thresholds"] == [0.8, 1.0]
    assert (body["spent_tokens"], body["spent_cost"], body["reserved_tokens"]) == (0, "0.000000", 0)
    assert body["period_start"][8:10] == "01"  # a month budget's period starts on the 1st
    budget_id = body["id"]
    got = api_a.get(f"/api/v1/budgets/{budget_id}")
    assert got.status_code == 200 and got.json()["name"] == "Helpdesk monthly"
    changed = _send(api_a, "patch", f"/api/v1/budgets/{budget_id}", {"limit_tokens": None, "action": "alert"})
    assert changed.status_code == 200, changed.content
    assert (changed.json()["limit_tokens"], changed.json()["action"]) == (None, "alert")
    assert api_a.delete(f"/api/v1/budgets/{budget_id}").status_code == 204
    assert api_a.get(f"/api/v1/budgets/{budget_id}").status_code == 404
    with schema_context(world.tenant_a.schema_name):
        actions = list(AuditEvent.objects.filter(target_type="budget", target_id=str(budget_id))
                       .order_by("id").values_list("action", flat=True))
    assert actions == ["budget.created", "budget.changed", "budget.deleted"]


def test_the_get_shows_the_current_periods_spend_so_far(world: World, api_a: Client) -> None:
    with schema_context(world.tenant_a.schema_name):
        usage_event_record(kind="llm.output_tokens", quantity=30, unit_price=1)
    connection.set_schema_to_public()
    created = _send(api_a, "post", "/api/v1/budgets", {"limit_tokens": 100})
    body = api_a.get(f"/api/v1/budgets/{created.json()['id']}").json()
    assert body["spent_tokens"] == 30
    assert body["spent_cost"] == "30.000000"


@pytest.mark.parametrize(("payload", "field"), [
    ({"limit_tokens": None, "limit_cost": None}, "limit_tokens"),
    ({"scope": "agent", "agent": "no-such-agent", "limit_tokens": 10}, "agent"),
    ({"scope": "api_key", "api_key": "nope", "limit_tokens": 10}, "api_key"),
    ({"limit_tokens": 0}, "limit_tokens"),
    ({"limit_cost": "-1"}, "limit_cost"),
    ({"limit_cost": "lots"}, "limit_cost"),
    ({"limit_tokens": 10, "alert_thresholds": [0]}, "alert_thresholds"),
    ({"limit_tokens": 10, "alert_thresholds": [11]}, "alert_thresholds"),
    ({"limit_tokens": 10, "period": "week"}, "period"),
    ({"limit_tokens": 10, "action": "shout"}, "action"),
    ({"limit_tokens": 10, "scope": "team"}, "scope"),
])
def test_invalid_budgets_are_refused_with_422_naming_the_field(api_a: Client, payload: dict[str, Any],
                                                               field: str) -> None:
    response = _send(api_a, "post", "/api/v1/budgets", payload)
    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert error["code"] == "validation_failed"
    assert error["details"][0]["field"] == field


def test_an_api_key_budget_names_a_key_of_this_tenant(world: World, api_a: Client) -> None:
    key_a = ApiKey.objects.get(tenant=world.tenant_a, name="acme all")
    key_b = ApiKey.objects.get(tenant=world.tenant_b, name="globex all")
    ok = _send(api_a, "post", "/api/v1/budgets", {"scope": "api_key", "api_key": key_a.key_id, "limit_tokens": 5})
    assert ok.status_code == 201 and ok.json()["api_key"] == key_a.key_id
    other = _send(api_a, "post", "/api/v1/budgets", {"scope": "api_key", "api_key": key_b.key_id,
                                                    "limit_tokens": 5})
    assert other.status_code == 422


def test_a_viewer_may_not_read_an_auditor_reads_but_may_not_write(world: World, api_a: Client) -> None:
    viewer = host_client(HOST_A, world.user("viewer"))
    assert viewer.get("/api/v1/budgets").status_code == 403
    assert _send(viewer, "post", "/api/v1/budgets", {"limit_tokens": 5}).status_code == 403
    auditor = host_client(HOST_A, world.user("auditor"))
    assert auditor.get("/api/v1/budgets").status_code == 200
    assert _send(auditor, "post", "/api/v1/budgets", {"limit_tokens": 5}).status_code == 403
    budget_id = _send(api_a, "post", "/api/v1/budgets", {"limit_tokens": 5}).json()["id"]
    assert _send(auditor, "patch", f"/api/v1/budgets/{budget_id}", {"limit_tokens": 6}).status_code == 403
    assert auditor.delete(f"/api/v1/budgets/{budget_id}").status_code == 403


def test_another_tenants_budget_is_not_found_and_not_listed(world: World, api_a: Client) -> None:
    budget_id = _send(api_a, "post", "/api/v1/budgets", {"name": "acme only", "limit_tokens": 5}).json()["id"]
    outsider = api_client(HOST_B, world.key_b)
    assert outsider.get(f"/api/v1/budgets/{budget_id}").status_code == 404
    assert _send(outsider, "patch", f"/api/v1/budgets/{budget_id}", {"limit_tokens": 1}).status_code == 404
    assert outsider.delete(f"/api/v1/budgets/{budget_id}").status_code == 404
    assert all(b["name"] != "acme only" for b in outsider.get("/api/v1/budgets").json()["items"])
    # The outsider's key on acme's host is refused outright.
    assert api_client(HOST_A, world.key_b).get("/api/v1/budgets").status_code in (401, 403)
    with schema_context(world.tenant_a.schema_name):
        assert Budget.objects.get(pk=budget_id).limit_tokens == 5


def test_the_list_costs_the_same_queries_for_one_budget_or_many(world: World, api_a: Client) -> None:
    _send(api_a, "post", "/api/v1/budgets", {"limit_tokens": 5})
    api_a.get("/api/v1/budgets")
    with CaptureQueriesContext(connection) as one:
        assert len(api_a.get("/api/v1/budgets").json()["items"]) == 1
    for period in ("day", "month", "day", "month"):
        _send(api_a, "post", "/api/v1/budgets", {"limit_tokens": 5, "period": period})
    with CaptureQueriesContext(connection) as five:
        assert len(api_a.get("/api/v1/budgets").json()["items"]) == 5
    assert len(five.captured_queries) == len(one.captured_queries)


def test_changing_a_budgets_scope_recounts_its_period(world: World, api_a: Client, agent_slug: str) -> None:
    with schema_context(world.tenant_a.schema_name):
        usage_event_record(kind="llm.input_tokens", quantity=7)
    connection.set_schema_to_public()
    budget_id = _send(api_a, "post", "/api/v1/budgets", {"limit_tokens": 100}).json()["id"]
    assert api_a.get(f"/api/v1/budgets/{budget_id}").json()["spent_tokens"] == 7
    changed = _send(api_a, "patch", f"/api/v1/budgets/{budget_id}", {"scope": "agent", "agent": agent_slug})
    assert changed.json()["spent_tokens"] == 0
    with schema_context(world.tenant_a.schema_name):
        assert BudgetPeriod.objects.filter(budget_id=budget_id).count() == 1
