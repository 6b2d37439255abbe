"""demo_seed's part of the invoices demo: usage events in the previous month, added once, from
which last month's invoice drafts and finalizes."""

from __future__ import annotations

import io
from pathlib import Path

from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone
from django_tenants.utils import schema_context

from billing.models import UsageEvent
from billing.periods import month_before, month_bounds
from tenants.models import Tenant
from tests.conftest import World, api_client


def test_demo_seed_adds_last_months_usage_once_and_its_invoice_finalizes(world: World, tmp_path: Path) -> None:
    with override_settings(VAR_DIR=tmp_path):
        call_command("demo_seed", stdout=io.StringIO())
        call_command("demo_seed", stdout=io.StringIO())
    tenant = Tenant.objects.get(slug="demo")
    period = month_before(timezone.now(), tenant.time_zone)
    start, end = month_bounds(period, tenant.time_zone)
    with schema_context(tenant.schema_name):
        events = UsageEvent.objects.filter(created_at__gte=start, created_at__lt=end)
        assert events.count() == 7 * 6  # seven days, six events a day, added by the first run only
        assert events.exclude(agent_id=None).count() == events.count()
    demo = api_client("demo.localhost", (tmp_path / "demo-api-key").read_text().strip())
    drafted = demo.post("/api/v1/invoices/draft", {"period": period}, content_type="application/json")
    assert drafted.status_code == 201, drafted.content
    assert drafted.json()["plan_code"] == "team" and drafted.json()["lines"][-1]["amount"] == "99.00"
    finalized = demo.post(f"/api/v1/invoices/{drafted.json()['id']}/finalize")
    assert finalized.status_code == 200 and finalized.json()["number"] == 1
