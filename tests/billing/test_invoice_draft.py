"""Drafting invoices: POST /api/v1/invoices/draft, GET /api/v1/invoices[/{id}], the console
pages, period boundaries in the tenant's timezone, permissions and isolation."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.test import Client
from django_tenants.utils import schema_context

from billing.models import Invoice, UsageEvent
from tenants.models import Tenant
from tenants.principal import Principal
from tenants.services.keys import api_key_create
from tests.billing.invoice_rows import drafted, event_at, plan_set
from tests.conftest import HOST_A, HOST_B, World, api_client

MARCH = dt.datetime(2025, 3, 10, 12, 0, tzinfo=dt.UTC)


def _draft(client: Client, period: str) -> Any:
    return client.post("/api/v1/invoices/draft", {"period": period}, content_type="application/json")


def test_it_drafts_one_line_per_kind_model_endpoint_agent_and_price_with_the_plan_fee(
    world: World, api_a: Client
) -> None:
    schema = world.tenant_a.schema_name
    plan_set(world.tenant_a, fee="49.00")
    for _ in range(3):  # 3 x 1000 tokens x 0.0000025 = 0.0075 -> 0.01 (half up, once per line)
        event_at(schema, MARCH, agent_id=7, metadata={"endpoint": "standard"})
    event_at(
        schema,
        MARCH,
        kind=UsageEvent.Kind.LLM_OUTPUT_TOKENS,
        quantity=333,
        unit_price=Decimal("0.000015"),
        agent_id=7,
        metadata={"endpoint": "standard"},
    )  # 0.004995 -> 0.00
    event_at(schema, MARCH, agent_id=7, metadata={"endpoint": "heavy"})  # another endpoint: another line
    event_at(schema, MARCH, kind=UsageEvent.Kind.KB_QUERY, quantity=1, unit_price=Decimal("0.005"), model="")
    response = _draft(api_a, "2025-03")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "draft" and body["number"] is None and body["currency"] == "USD"
    assert body["events_count"] == 6
    usage = [line for line in body["lines"] if line["kind"] != "plan.fee"]
    assert [(line["kind"], line["endpoint"], line["quantity"], line["amount"]) for line in usage] == [
        ("kb.query", "", 1, "0.01"),
        ("llm.input_tokens", "heavy", 1000, "0.00"),
        ("llm.input_tokens", "standard", 3000, "0.01"),
        ("llm.output_tokens", "standard", 333, "0.00"),
    ]
    assert usage[2]["unit_price"] == "0.000002500000" and usage[2]["agent_id"] == 7
    assert "Model input tokens" in usage[2]["description"] and "standard" in usage[2]["description"]
    fee = body["lines"][-1]
    assert (fee["kind"], fee["amount"]) == ("plan.fee", "49.00")
    assert (body["usage_total"], body["plan_fee"], body["total"]) == ("0.02", "49.00", "49.02")
    assert sum(Decimal(line["amount"]) for line in body["lines"]) == Decimal(body["total"])

    event_at(schema, MARCH, kind=UsageEvent.Kind.KB_QUERY, quantity=1, unit_price=Decimal("0.005"), model="")
    again = _draft(api_a, "2025-03")
    assert again.status_code == 200 and again.json()["id"] == body["id"]  # recomputed, same invoice
    assert again.json()["lines"][0]["amount"] == "0.01" and again.json()["events_count"] == 7
    with schema_context(schema):
        assert Invoice.objects.count() == 1


def test_it_takes_the_month_in_the_tenants_timezone(world: World, api_a: Client) -> None:
    Tenant.objects.filter(pk=world.tenant_a.pk).update(time_zone="Asia/Tokyo")
    schema = world.tenant_a.schema_name
    tokyo = ZoneInfo("Asia/Tokyo")
    start = dt.datetime(2025, 3, 1, tzinfo=tokyo)  # 2025-02-28 15:00 UTC
    end = dt.datetime(2025, 4, 1, tzinfo=tokyo)
    event_at(schema, start - dt.timedelta(microseconds=1), quantity=1)  # February in Tokyo
    event_at(schema, start, quantity=10)  # the first instant of March in Tokyo
    event_at(schema, end - dt.timedelta(microseconds=1), quantity=100)
    event_at(schema, end, quantity=1000)  # April in Tokyo, still March 31 in UTC
    body = _draft(api_a, "2025-03").json()
    assert body["lines"][0]["quantity"] == 110 and body["events_count"] == 2
    assert dt.datetime.fromisoformat(body["period_start"]) == start
    assert dt.datetime.fromisoformat(body["period_end"]) == end


def test_it_refuses_malformed_and_future_months_and_foreign_currencies(world: World, api_a: Client) -> None:
    for bad in ("2025-13", "2025-3", "March", ""):
        response = _draft(api_a, bad)
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_period", bad
    future = _draft(api_a, f"{dt.datetime.now(tz=dt.UTC).year + 1}-01")
    assert future.status_code == 422 and future.json()["error"]["code"] == "period_in_future"
    event_at(world.tenant_a.schema_name, MARCH, currency="EUR")
    mismatch = _draft(api_a, "2025-03")
    assert mismatch.status_code == 422
    error = mismatch.json()["error"]
    assert error["code"] == "currency_mismatch" and error["details"]["event_currencies"] == ["EUR"]
    assert "EUR" in error["message"] and "USD" in error["message"]
    with schema_context(world.tenant_a.schema_name):
        assert not Invoice.objects.exists()


def test_the_invoice_takes_the_plans_currency(world: World, api_a: Client) -> None:
    plan_set(world.tenant_a, fee="10.00", currency="EUR", code="euro-test")
    event_at(world.tenant_a.schema_name, MARCH, currency="EUR")
    body = _draft(api_a, "2025-03").json()
    assert body["currency"] == "EUR" and body["total"] == "10.00"


def test_it_lists_invoices_by_keyset_pages_with_a_constant_query_count(
    world: World, api_a: Client, django_assert_max_num_queries: Any
) -> None:
    drafted(world.tenant_a, "2024-01")
    with django_assert_max_num_queries(12) as few:
        assert api_a.get("/api/v1/invoices").status_code == 200
    baseline = len(few.captured_queries)
    for month in range(2, 8):
        drafted(world.tenant_a, f"2024-{month:02d}")
    with django_assert_max_num_queries(baseline):
        first = api_a.get("/api/v1/invoices?limit=4").json()
    second = api_a.get(f"/api/v1/invoices?limit=4&cursor={first['next_cursor']}").json()
    periods = [i["period"] for i in first["items"] + second["items"]]
    assert periods == [f"2024-{m:02d}" for m in range(7, 0, -1)] and second["next_cursor"] is None
    assert "lines" not in first["items"][0]


def test_one_invoice_has_its_lines_and_total_as_a_decimal_string(world: World, api_a: Client) -> None:
    event_at(world.tenant_a.schema_name, MARCH, quantity=4000)
    invoice = drafted(world.tenant_a, "2025-03")
    body = api_a.get(f"/api/v1/invoices/{invoice.pk}").json()
    assert body["total"] == "0.01" and isinstance(body["total"], str)
    for field in (
        "number",
        "period",
        "status",
        "currency",
        "plan_fee",
        "usage_total",
        "period_start",
        "period_end",
        "finalized_at",
        "lines",
    ):
        assert field in body
    assert api_a.get("/api/v1/invoices/999999").status_code == 404


def test_a_member_without_billing_read_gets_403_and_the_outsider_404(world: World) -> None:
    invoice = drafted(world.tenant_a, "2025-03")
    viewer_key = api_key_create(
        principal=Principal.system("tests", tenant=world.tenant_a),
        tenant=world.tenant_a,
        name="viewer",
        scopes=["tenant:read"],
        acting_user=world.user("viewer"),
    ).secret
    viewer = api_client(HOST_A, viewer_key)
    assert viewer.get("/api/v1/invoices").status_code == 403
    assert viewer.get(f"/api/v1/invoices/{invoice.pk}").status_code == 403
    assert _draft(viewer, "2025-03").status_code == 403
    outsider = api_client(HOST_B, world.key_b)
    response = outsider.get(f"/api/v1/invoices/{invoice.pk}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "invoice_not_found"
    assert outsider.get("/api/v1/invoices").json()["items"] == []
    assert outsider.post(f"/api/v1/invoices/{invoice.pk}/finalize").status_code == 404
    assert api_client(HOST_B, world.key_a).get("/api/v1/invoices").status_code == 401  # A's key on B's host


def test_an_auditor_reads_but_cannot_draft(world: World) -> None:
    key = api_key_create(
        principal=Principal.system("tests", tenant=world.tenant_a),
        tenant=world.tenant_a,
        name="auditor",
        scopes=["billing:read"],
        acting_user=world.user("auditor"),
    ).secret
    auditor = api_client(HOST_A, key)
    assert auditor.get("/api/v1/invoices").status_code == 200
    response = _draft(auditor, "2025-03")
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"


# --- Console ----------------------------------------------------------------------------------


def test_the_console_drafts_a_month_and_shows_the_invoice(
    world: World, client_a: Any, django_assert_max_num_queries: Any
) -> None:
    event_at(world.tenant_a.schema_name, MARCH, quantity=4000, agent_id=None)
    owner = client_a("owner")
    page = owner.get("/invoices/")
    assert page.status_code == 200 and b"Draft invoice" in page.content
    response = owner.post("/invoices/draft/", {"period": "2025-03"})
    assert response.status_code == 302
    with schema_context(world.tenant_a.schema_name):
        invoice = Invoice.objects.get(period="2025-03")
    assert response["Location"] == f"/invoices/{invoice.pk}/"
    detail = owner.get(response["Location"]).content.decode()
    assert "Invoice DRAFT" in detail and "USD 0.01" in detail and "Finalize" in detail
    with django_assert_max_num_queries(20) as few:
        owner.get("/invoices/")
    baseline = len(few.captured_queries)
    for month in range(1, 7):
        drafted(world.tenant_a, f"2024-{month:02d}")
    with django_assert_max_num_queries(baseline):
        html = owner.get("/invoices/").content.decode()
    assert html.count('<tr id="invoice-') == 7
    bad = owner.post("/invoices/draft/", {"period": "2099-01"})
    assert bad.status_code == 422 and b"has not begun" in bad.content


def test_the_console_refuses_a_viewer_and_hides_writes_from_an_auditor(world: World, client_a: Any) -> None:
    invoice = drafted(world.tenant_a, "2025-03")
    viewer = client_a("viewer")
    assert viewer.get("/invoices/").status_code == 403
    assert viewer.get(f"/invoices/{invoice.pk}/").status_code == 403
    auditor = client_a("auditor")
    assert b"Draft invoice" not in auditor.get("/invoices/").content
    assert b"invoice-finalize" not in auditor.get(f"/invoices/{invoice.pk}/").content
    assert auditor.post("/invoices/draft/", {"period": "2025-04"}).status_code == 403
    assert auditor.post(f"/invoices/{invoice.pk}/finalize/").status_code == 403
    assert auditor.get(f"/invoices/{invoice.pk}/csv/").status_code == 200
