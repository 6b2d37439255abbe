"""The plan's rate limits and quota where people see and set them: ``GET /api/v1/me``
(``plan.limits``), the staff admin's plan form, and the tenant's dashboard."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from tenants.models import Plan, Tenant
from tests.conftest import HOST_A, World, api_client, host_client, verified_staff_client
from tests.factories import PlanFactory

pytestmark = pytest.mark.django_db

LIMIT_NAMES = {
    "api_requests_per_minute",
    "chat_turns_per_minute",
    "kb_searches_per_minute",
    "monthly_token_quota",
    "max_members",
    "max_agents",
    "max_storage_mb",
}


def _plan(world: World, **fields: Any) -> Plan:
    plan = PlanFactory(**fields)
    Tenant.objects.filter(pk=world.tenant_a.pk).update(plan=plan)
    return plan


def test_me_returns_the_plan_and_its_limits_with_null_for_unlimited(world: World) -> None:
    _plan(
        world,
        code="team",
        name="Team",
        monthly_fee=Decimal("49.50"),
        currency="EUR",
        api_requests_per_minute=600,
        chat_turns_per_minute=30,
        kb_searches_per_minute=None,
        monthly_token_quota=5_000_000,
        max_members=25,
        max_agents=None,
        max_storage_mb=1024,
    )
    response = api_client(HOST_A, world.key_a).get("/api/v1/me")
    assert response.status_code == 200, response.content
    plan = response.json()["plan"]
    assert plan == {
        "code": "team",
        "name": "Team",
        "monthly_fee": "49.50",
        "currency": "EUR",
        "limits": {
            "api_requests_per_minute": 600,
            "chat_turns_per_minute": 30,
            "kb_searches_per_minute": None,
            "monthly_token_quota": 5_000_000,
            "max_members": 25,
            "max_agents": None,
            "max_storage_mb": 1024,
        },
    }
    assert set(plan["limits"]) == LIMIT_NAMES
    assert response.json()["tenant"]["plan"] == "team"  # unchanged for existing clients


def test_me_returns_a_null_plan_when_the_tenant_has_none(world: World) -> None:
    Tenant.objects.filter(pk=world.tenant_a.pk).update(plan=None)
    response = host_client(HOST_A, world.user("viewer")).get("/api/v1/me")
    assert response.status_code == 200 and response.json()["plan"] is None


def test_me_does_not_show_tenant_a_plan_to_the_outsider(world: World) -> None:
    _plan(world, code="secret-deal", name="Secret deal")
    assert api_client(HOST_A, world.key_b).get("/api/v1/me").status_code == 401
    outsider = host_client(HOST_A, world.user("outsider")).get("/api/v1/me")
    assert outsider.status_code == 403 and "secret-deal" not in outsider.content.decode()


def test_the_openapi_schema_documents_the_plan_limits(world: World) -> None:
    schema = api_client(HOST_A, world.key_a).get("/api/v1/openapi.json").json()
    limits = schema["components"]["schemas"]["PlanLimitsOut"]["properties"]
    assert set(limits) == LIMIT_NAMES


def test_staff_set_the_rate_limits_and_quota_in_the_admin(world: World) -> None:
    plan = PlanFactory(code="editable", name="Editable")
    client = verified_staff_client(world)
    page = client.get(f"/admin/tenants/plan/{plan.pk}/change/")
    assert page.status_code == 200
    for name in ("api_requests_per_minute", "chat_turns_per_minute", "kb_searches_per_minute", "monthly_token_quota"):
        assert f'name="{name}"' in page.content.decode()
    saved = client.post(
        f"/admin/tenants/plan/{plan.pk}/change/",
        {
            "code": "editable",
            "name": "Editable",
            "description": "",
            "is_active": "on",
            "monthly_fee": "10.00",
            "currency": "USD",
            "max_members": "",
            "max_agents": "",
            "max_storage_mb": "",
            "api_requests_per_minute": "120",
            "chat_turns_per_minute": "",
            "kb_searches_per_minute": "30",
            "monthly_token_quota": "1000000",
        },
    )
    assert saved.status_code == 302, saved.content.decode()[:2000]
    plan.refresh_from_db()
    assert (
        plan.api_requests_per_minute,
        plan.chat_turns_per_minute,
        plan.kb_searches_per_minute,
        plan.monthly_token_quota,
    ) == (120, None, 30, 1_000_000)


def test_the_dashboard_shows_the_plan_limits(world: World, client_a: Any) -> None:
    _plan(
        world,
        name="Team",
        api_requests_per_minute=600,
        chat_turns_per_minute=None,
        kb_searches_per_minute=60,
        monthly_token_quota=2_000_000,
    )
    page = client_a("viewer").get("/").content.decode()
    assert "API: 600 requests/min" in page
    assert "Chat: unlimited messages/min" in page
    assert "Search: 60 searches/min" in page
    assert "Tokens: 2,000,000 a month" in page
