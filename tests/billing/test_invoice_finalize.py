"""Finalizing invoices: numbers, the immutability trigger, redrafting refused, voiding,
concurrent finalizes, the CSV / API / PDF totals, invoice_verify, the beat task, staff pages."""

from __future__ import annotations

import csv
import datetime as dt
import io
import threading
from decimal import Decimal
from typing import Any

import pytest
from django.core.management import call_command
from django.db import IntegrityError, connection, connections, transaction
from django.test import Client
from django_tenants.utils import schema_context
from pypdf import PdfReader

from billing.models import Invoice, InvoiceLine, UsageEvent
from billing.services.invoices import invoice_draft, invoice_finalize
from billing.tasks import invoice_draft_last_month_task
from config.celery import app as celery_app
from tenants.models import Tenant
from tenants.principal import Principal
from tests.billing.invoice_rows import drafted, event_at, plan_set
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client, verified_staff_client

MARCH = dt.datetime(2025, 3, 10, 12, 0, tzinfo=dt.UTC)


def _finalize(client: Client, invoice_id: int) -> Any:
    return client.post(f"/api/v1/invoices/{invoice_id}/finalize")


def test_finalize_numbers_invoices_one_two_three_and_recomputes_them(world: World, api_a: Client) -> None:
    schema = world.tenant_a.schema_name
    invoices = [drafted(world.tenant_a, period) for period in ("2025-01", "2025-02", "2025-03")]
    event_at(schema, MARCH, quantity=4000)  # arrives after the draft: finalize recomputes
    numbers = []
    for invoice in invoices:
        response = _finalize(api_a, invoice.pk)
        assert response.status_code == 200, response.content
        numbers.append(response.json()["number"])
    assert numbers == [1, 2, 3]
    body = api_a.get(f"/api/v1/invoices/{invoices[2].pk}").json()
    assert body["status"] == "finalized" and body["finalized_at"] and body["total"] == "0.01"
    again = _finalize(api_a, invoices[0].pk)
    assert again.status_code == 409 and again.json()["error"]["code"] == "invoice_finalized"


def test_redrafting_a_finalized_month_is_409_and_a_voided_one_drafts_anew(world: World, api_a: Client) -> None:
    invoice = drafted(world.tenant_a, "2025-03")
    _finalize(api_a, invoice.pk)
    response = api_a.post("/api/v1/invoices/draft", {"period": "2025-03"}, content_type="application/json")
    assert response.status_code == 409 and response.json()["error"]["code"] == "invoice_finalized"
    voided = api_a.post(f"/api/v1/invoices/{invoice.pk}/void")
    assert voided.status_code == 200 and voided.json()["status"] == "void" and voided.json()["number"] == 1
    anew = api_a.post("/api/v1/invoices/draft", {"period": "2025-03"}, content_type="application/json")
    assert anew.status_code == 201 and anew.json()["id"] != invoice.pk
    assert api_a.post(f"/api/v1/invoices/{invoice.pk}/void").json()["error"]["code"] == "invoice_not_finalized"


def test_finalize_refuses_a_month_that_has_not_ended(world: World, api_a: Client) -> None:
    now = dt.datetime.now(tz=dt.UTC)
    invoice = drafted(world.tenant_a, f"{now:%Y-%m}")
    response = _finalize(api_a, invoice.pk)
    assert response.status_code == 409 and response.json()["error"]["code"] == "period_open"
    with schema_context(world.tenant_a.schema_name):
        assert Invoice.objects.get(pk=invoice.pk).status == "draft"


def _raw(schema: str, sql: str, params: list[Any] | None = None) -> None:
    with schema_context(schema), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, params or [])


def test_the_trigger_refuses_changes_to_a_finalized_invoice_and_its_lines(world: World) -> None:
    schema = world.tenant_a.schema_name
    event_at(schema, MARCH, quantity=4000)
    invoice = drafted(world.tenant_a, "2025-03")
    _raw(schema, "UPDATE billing_invoiceline SET amount = 9 WHERE invoice_id = %s", [invoice.pk])  # a draft may
    _raw(schema, "UPDATE billing_invoice SET total = 9 WHERE id = %s", [invoice.pk])
    with schema_context(schema):
        invoice_finalize(principal=Principal.system("tests", tenant=world.tenant_a), invoice=invoice)
    refused = [
        ("UPDATE billing_invoice SET total = 0 WHERE id = %s", [invoice.pk]),
        ("UPDATE billing_invoice SET status = 'draft' WHERE id = %s", [invoice.pk]),
        ("UPDATE billing_invoice SET status = 'void', voided_at = now(), total = 0 WHERE id = %s", [invoice.pk]),
        ("DELETE FROM billing_invoice WHERE id = %s", [invoice.pk]),
        ("UPDATE billing_invoiceline SET amount = 0 WHERE invoice_id = %s", [invoice.pk]),
        ("DELETE FROM billing_invoiceline WHERE invoice_id = %s", [invoice.pk]),
        (
            "INSERT INTO billing_invoiceline (invoice_id, position, kind, description, model, endpoint, agent_slug, "
            "quantity, unit, unit_price, amount) VALUES (%s, 9, 'tool.call', '', '', '', '', 1, 'call', 1, 1)",
            [invoice.pk],
        ),
        ("SET CONSTRAINTS ALL IMMEDIATE; TRUNCATE billing_invoiceline", []),
    ]
    for sql, params in refused:
        with pytest.raises(IntegrityError, match="finalized|TRUNCATE"):
            _raw(schema, sql, params)
    with schema_context(schema):
        stored = Invoice.objects.get(pk=invoice.pk)
        assert stored.total == Decimal("0.01") and stored.status == "finalized"
        assert InvoiceLine.objects.filter(invoice=invoice).get().amount == Decimal("0.01")
    _raw(schema, "UPDATE billing_invoice SET status = 'void', voided_at = now() WHERE id = %s", [invoice.pk])
    with pytest.raises(IntegrityError, match="void"):
        _raw(schema, "UPDATE billing_invoice SET status = 'finalized', voided_at = NULL WHERE id = %s", [invoice.pk])
    with pytest.raises(IntegrityError, match="void"):
        _raw(schema, "DELETE FROM billing_invoiceline WHERE invoice_id = %s", [invoice.pk])


# --- Concurrency (committed rows in a tenant of its own) -------------------------------------


def _in_thread(function: Any) -> Any:
    """Run ``function`` on another thread (its own, autocommitting database connection)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(function())
        except BaseException as exc:  # noqa: BLE001 (handed back to the test)
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def test_concurrent_finalizes_take_consecutive_numbers(world: World) -> None:
    from tenants.services.provisioning import tenant_create, tenant_delete

    system = Principal.system("tests")
    tenant = _in_thread(
        lambda: tenant_create(actor=system, slug="invoice-race", name="Race", owner_email="owner@race.test").tenant
    )
    try:
        periods = [f"2024-{month:02d}" for month in range(1, 11)]

        def draft_all() -> list[int]:
            fresh = Tenant.objects.get(pk=tenant.pk)
            with schema_context(fresh.schema_name):
                return [
                    invoice_draft(principal=Principal.system("tests", tenant=fresh), period=p).invoice.pk
                    for p in periods
                ]

        ids = _in_thread(draft_all)
        barrier = threading.Barrier(len(ids))
        numbers: list[int] = []
        errors: list[BaseException] = []

        def finalize(invoice_id: int) -> None:
            try:
                fresh = Tenant.objects.get(pk=tenant.pk)
                with schema_context(fresh.schema_name):
                    invoice = Invoice.objects.get(pk=invoice_id)
                    barrier.wait(timeout=30)
                    numbers.append(
                        invoice_finalize(principal=Principal.system("tests", tenant=fresh), invoice=invoice).number or 0
                    )
            except BaseException as exc:  # noqa: BLE001 (handed back to the test)
                errors.append(exc)
            finally:
                connections.close_all()

        threads = [threading.Thread(target=finalize, args=(invoice_id,)) for invoice_id in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert sorted(numbers) == list(range(1, len(ids) + 1))
    finally:
        _in_thread(lambda: tenant_delete(actor=system, tenant=Tenant.objects.get(pk=tenant.pk), confirm="invoice-race"))


# --- Documents ---------------------------------------------------------------------------------


def test_the_csv_the_api_and_the_pdf_carry_the_same_total(world: World, api_a: Client) -> None:
    schema = world.tenant_a.schema_name
    plan_set(world.tenant_a, fee="1234.50")
    for n in range(1, 6):
        event_at(
            schema,
            MARCH,
            quantity=1_234_567 * n,
            unit_price=Decimal("0.000001234567"),
            agent_id=n,
            metadata={"endpoint": f"ep-{n % 2}"},
        )
    event_at(schema, MARCH, kind=UsageEvent.Kind.TOOL_CALL, quantity=3, unit_price=Decimal("0.015"), model="")
    invoice = drafted(world.tenant_a, "2025-03")
    _finalize(api_a, invoice.pk)
    api_total = api_a.get(f"/api/v1/invoices/{invoice.pk}").json()["total"]

    csv_response = api_a.get(f"/api/v1/invoices/{invoice.pk}/csv")
    assert csv_response.status_code == 200 and csv_response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(csv_response.content.decode())))
    assert len(rows) == 7 + 1  # six usage lines and the plan fee, then the total row
    assert rows[-1]["kind"] == "total" and rows[-1]["amount"] == api_total
    assert sum(Decimal(row["amount"]) for row in rows[:-1]) == Decimal(api_total)

    pdf_response = api_a.get(f"/api/v1/invoices/{invoice.pk}/pdf")
    assert pdf_response.status_code == 200 and pdf_response["Content-Type"] == "application/pdf"
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf_response.content)).pages)
    assert f"Total USD {api_total}" in text.replace("\n", " ") or f"Total\nUSD {api_total}" in text
    assert "Invoice 1" in text and "Acme Corp" in text and "2025-03" in text and "USD 1234.50" in text

    console = host_client(HOST_A, world.user("owner"))
    assert console.get(f"/invoices/{invoice.pk}/csv/").content == csv_response.content
    assert console.get(f"/invoices/{invoice.pk}/pdf/")["Content-Type"] == "application/pdf"
    assert api_client(HOST_B, world.key_b).get(f"/api/v1/invoices/{invoice.pk}/pdf").status_code == 404


def test_a_draft_pdf_says_draft(world: World, api_a: Client) -> None:
    invoice = drafted(world.tenant_a, "2025-03")
    text = PdfReader(io.BytesIO(api_a.get(f"/api/v1/invoices/{invoice.pk}/pdf").content)).pages[0].extract_text()
    assert "Invoice DRAFT" in text and "No usage in this period." in text


# --- invoice_verify ----------------------------------------------------------------------------


def test_invoice_verify_exits_0_when_clean_and_1_naming_a_mismatch(
    world: World, api_a: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = world.tenant_a.schema_name
    event_at(schema, MARCH, quantity=4000, agent_id=5, metadata={"endpoint": "standard"})
    invoice = drafted(world.tenant_a, "2025-03")
    _finalize(api_a, invoice.pk)
    call_command("invoice_verify", "--tenant", "acme")
    assert "1 finalized invoice(s) checked, 0 mismatched" in capsys.readouterr().out
    # Usage events are append-only, but INSERT is allowed: one back-dated into the finalized month.
    event_at(schema, MARCH, quantity=4000, agent_id=5, metadata={"endpoint": "standard"})
    with pytest.raises(SystemExit) as exit_info:
        call_command("invoice_verify", "--all")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "tenant=acme invoice=1 period=2025-03" in err
    assert "llm.input_tokens" in err and "endpoint=standard agent=5" in err
    assert "stored quantity 4000 amount 0.01, recomputed quantity 8000 amount 0.02" in err
    assert "line: total: stored 0.01, recomputed 0.02" in err


# --- Beat --------------------------------------------------------------------------------------


def test_the_beat_task_drafts_last_month_in_the_tenants_timezone_and_skips_finalized(world: World) -> None:
    Tenant.objects.filter(pk=world.tenant_a.pk).update(time_zone="Pacific/Auckland")
    schema = world.tenant_a.schema_name
    now = dt.datetime.now(tz=dt.UTC)
    from billing.periods import month_before

    last = month_before(now, "Pacific/Auckland")
    with schema_context(schema):
        assert invoice_draft_last_month_task() == "drafted"
        assert Invoice.objects.get(period=last).status == "draft"
        assert invoice_draft_last_month_task() == "redrafted"
        invoice = Invoice.objects.get(period=last)
        invoice_finalize(
            principal=Principal.system("tests", tenant=Tenant.objects.get(pk=world.tenant_a.pk)), invoice=invoice
        )
        assert invoice_draft_last_month_task() == "skipped_finalized"
    entry = celery_app.conf.beat_schedule["billing-invoice-draft"]
    assert entry["task"] == "billing.invoice_draft_last_month" and "tenant_schemas" not in entry
    assert entry["schedule"].day_of_month == {1} and entry["schedule"].hour == {12}


def test_the_beat_task_skips_a_suspended_tenant(world: World) -> None:
    Tenant.objects.filter(pk=world.tenant_a.pk).update(status=Tenant.Status.SUSPENDED)
    with schema_context(world.tenant_a.schema_name):
        assert invoice_draft_last_month_task() == "skipped_inactive"
        assert not Invoice.objects.exists()


# --- Staff -------------------------------------------------------------------------------------


def test_the_staff_page_lists_every_tenants_invoices_and_month_to_date_spend(world: World) -> None:
    event_at(world.tenant_a.schema_name, dt.datetime.now(tz=dt.UTC), quantity=4000)
    drafted(world.tenant_a, "2025-03")
    drafted(world.tenant_b, "2025-02")
    page = verified_staff_client(world).get("/admin/billing/invoices/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="spend-acme"' in html and 'id="spend-globex"' in html
    assert "2025-03" in html and "2025-02" in html
    with schema_context(world.tenant_a.schema_name):
        a_id = Invoice.objects.get(period="2025-03").pk
    assert f'id="invoice-acme-{a_id}"' in html
    assert "/admin/billing/invoices/" in verified_staff_client(world).get("/admin/").content.decode()


def test_the_staff_page_is_for_verified_staff_only(world: World) -> None:
    unverified = host_client("localhost", world.user("staff"))
    assert unverified.get("/admin/billing/invoices/").status_code == 302
    member = host_client("localhost", world.user("owner"))
    response = member.get("/admin/billing/invoices/")
    assert response.status_code in {302, 403} and b"spend-acme" not in response.content
    assert host_client(HOST_A, world.user("owner")).get("/admin/billing/invoices/").status_code == 404
