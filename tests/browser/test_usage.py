"""The usage page in a real browser: Chart.js draws every chart under the Content-Security-Policy
without a console error, the tables beside the charts hold the numbers, the period filter changes
the days shown, and the CSV link downloads the same view.

Usage events are append-only and committed here (the server must see them), so the test's own
events carry a unique model name and the expected totals are read back from the database for the
period, whatever earlier runs left in it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from decimal import Decimal
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.agents.conftest import committed
from tests.browser.conftest import Portal, sign_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db]

START, END = "2003-02-01", "2003-03-01"
PERIOD = f"/usage/?period=custom&start={START}&end={END}"

# Runs in every document before its own scripts (an init script is not subject to the page's policy).
RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(`${e.effectiveDirective} blocked ${e.blockedURI || "inline"}`);
});
"""


def _usage(portal: Portal, model: str) -> dict[str, Any]:
    """Commit usage of ``model`` on two days of February 2003 in tenant A; return the period's
    totals (all events of the period) and the model's, as the summary selector computes them."""
    from django_tenants.utils import schema_context

    from agents.models import Agent
    from billing.models import UsageEvent
    from billing.selectors.usage import usage_period, usage_summary
    from billing.services import usage_event_values
    from tenants.models import Membership
    from tenants.principal import Principal

    tenant = portal.world.tenant_a

    def write() -> dict[str, Any]:
        with schema_context(tenant.schema_name):
            agent = Agent.objects.create(slug=model, name=f"Agent {model}")
            for day, kind, quantity, price in (
                (3, "llm.input_tokens", 4000, "0.000002"),
                (3, "llm.output_tokens", 500, "0.00001"),
                (10, "llm.input_tokens", 1000, "0.000002"),
            ):
                values = usage_event_values(
                    kind=kind,
                    quantity=quantity,
                    unit_price=Decimal(price),
                    model=model,
                    agent_id=agent.pk,
                    user_id=None,
                    api_key_id="",
                )
                values["created_at"] = dt.datetime(2003, 2, day, 12, tzinfo=dt.UTC)
                UsageEvent.objects.create(**values)
            owner = Membership.objects.select_related("user", "tenant").get(
                user=portal.world.user("owner"), tenant=tenant
            )
            principal = Principal.for_member(owner)
            period = usage_period(principal=principal, start=dt.date(2003, 2, 1), end=dt.date(2003, 3, 1))
            totals = usage_summary(principal=principal, period=period, group_by="day")["totals"]
            mine = next(
                g
                for g in usage_summary(principal=principal, period=period, group_by="model")["groups"]
                if g["key"] == model
            )
            return {"totals": totals, "model": mine, "time_zone": period.zone.key}

    return committed(write)  # type: ignore[no-any-return]


def test_the_usage_page_draws_its_charts_and_exports_the_view(portal: Portal, new_page: Any) -> None:
    model = f"browser-{uuid.uuid4().hex[:10]}"
    expected = _usage(portal, model)
    page = new_page(accept_downloads=True)
    errors: list[str] = []

    def console(message: Any) -> None:
        # The portal serves no favicon; the browser's own request for it is not this page's.
        url = str(message.location.get("url") or "")
        if message.type == "error" and not url.endswith("/favicon.ico"):
            errors.append(f"console {message.type}: {message.text} ({url})")

    page.on("console", console)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.context.add_init_script(RECORD_VIOLATIONS)
    sign_in(page, portal, "owner@acme.test")

    page.goto(portal.url(path=PERIOD))
    expect(page.locator("main h1")).to_have_text("Usage")
    # Every grouping has a chart that Chart.js drew (the canvas is shown only once drawn).
    for name in ("day", "agent", "model", "member", "api_key"):
        canvas = page.locator(f"canvas[data-chart={name}]")
        expect(canvas).to_be_visible()
        assert page.evaluate(f"!!window.Chart.getChart(document.querySelector('canvas[data-chart={name}]'))")
    # The tables hold the same numbers as the database.
    totals = expected["totals"]
    expect(page.get_by_test_id("total-tokens")).to_have_text(f"{totals['tokens']:,}")
    expect(page.get_by_test_id("total-cost")).to_have_text(f"{totals['cost']:.6f}")
    row = page.get_by_test_id("usage-table-model").locator(f"tr[data-key='{model}']")
    expect(row).to_contain_text("5,000")  # input tokens
    expect(row).to_contain_text("5,500")  # tokens
    expect(row).to_contain_text(f"{expected['model']['cost']:.6f}")
    assert expected["model"]["cost"] == Decimal("0.015")
    if expected["time_zone"] == "UTC":  # noon UTC is 3 February in the zones near UTC
        expect(page.get_by_test_id("usage-table-day").locator("tr[data-key='2003-02-03']")).to_contain_text("4,500")
    expect(page.get_by_test_id("usage-table-day").locator("tbody tr")).to_have_count(28)
    chart_points = page.evaluate(
        "window.Chart.getChart(document.querySelector('canvas[data-chart=day]')).data.labels.length"
    )
    assert chart_points == 28

    # The CSV link downloads the view.
    with page.expect_download() as download_info:
        page.get_by_test_id("usage-csv").click()
    download = download_info.value
    assert download.suggested_filename == f"usage-{START}-{END}.csv"
    with open(download.path(), encoding="utf-8") as handle:
        rows = list(csv.DictReader(io.StringIO(handle.read())))
    model_rows = [r for r in rows if r["group_by"] == "model" and r["key"] == model]
    assert len(model_rows) == 1 and (model_rows[0]["input_tokens"], model_rows[0]["tokens"]) == ("5000", "5500")
    assert Decimal(model_rows[0]["cost"]) == Decimal("0.015")

    # The filter changes the period: a preset, then a custom range of one day.
    page.get_by_test_id("period-last_7_days").click()
    expect(page).to_have_url(portal.url(path="/usage/?period=last_7_days"))
    expect(page.get_by_test_id("period-last_7_days")).to_have_attribute("aria-current", "page")
    expect(page.get_by_test_id("usage-table-day").locator("tbody tr")).to_have_count(7)
    page.locator("#usage-start").fill("2003-02-10")
    page.locator("#usage-end").fill("2003-02-11")
    with page.expect_navigation():
        page.get_by_test_id("usage-filter").get_by_role("button", name="Show").click()
    expect(page.get_by_test_id("usage-period")).to_contain_text("2003-02-10 to 2003-02-10")
    expect(page.get_by_test_id("usage-table-day").locator("tbody tr")).to_have_count(1)
    expect(page.get_by_test_id("usage-table-model").locator(f"tr[data-key='{model}']")).to_contain_text("1,000")

    violations = page.evaluate("window.__cspViolations || []")
    assert violations == [] and errors == [], (violations, errors)


def test_without_javascript_the_tables_carry_the_numbers(portal: Portal, new_page: Any) -> None:
    model = f"nojs-{uuid.uuid4().hex[:10]}"
    expected = _usage(portal, model)
    page = new_page(java_script_enabled=False)
    sign_in(page, portal, "auditor@acme.test")
    page.goto(portal.url(path=PERIOD))
    expect(page.get_by_test_id("total-tokens")).to_have_text(f"{expected['totals']['tokens']:,}")
    expect(page.get_by_test_id("usage-table-model").locator(f"tr[data-key='{model}']")).to_contain_text("5,500")
    # Undrawn charts stay hidden rather than leaving empty boxes.
    expect(page.locator("canvas[data-chart=day]")).to_be_hidden()
