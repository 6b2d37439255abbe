"""Property test (hypothesis): for random usage-event streams around the month's boundaries in
a non-UTC timezone, the drafted invoice equals an independent recomputation in Python, its lines
sum to its total, and ``invoice_mismatches`` (what ``invoice_verify`` runs) finds nothing."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.db import transaction
from django_tenants.utils import schema_context
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.models import UsageEvent
from billing.selectors.invoices import invoice_mismatches
from billing.services import UNITS
from billing.services.invoices import invoice_draft
from tenants.models import Tenant
from tenants.principal import Principal
from tests.conftest import World

PERIOD = "2025-03"  # holds a DST change in New York (March 9)
ZONES = ["America/New_York", "Asia/Kolkata", "Pacific/Chatham"]


class _Rollback(Exception):
    pass


_event = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(list(UNITS)),
        "quantity": st.integers(min_value=0, max_value=2_000_000),
        # Twelve decimal places, up to 0.01 per unit.
        "unit_price": st.integers(min_value=0, max_value=10_000_000_000).map(lambda n: Decimal(n).scaleb(-12)),
        "agent_id": st.sampled_from([None, 1, 2]),
        "model": st.sampled_from(["", "openai/a", "anthropic/b"]),
        "endpoint": st.sampled_from([None, "standard", "heavy"]),
        "boundary": st.sampled_from(["start", "end"]),
        "offset_s": st.integers(min_value=-36 * 3600, max_value=36 * 3600),
    }
)


def _expected(events: list[dict[str, Any]], start: dt.datetime, end: dt.datetime) -> dict[tuple[Any, ...], Any]:
    groups: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, Decimal(0)])
    for e in events:
        if start <= e["at"] < end:
            key = (e["kind"], e["model"], e["endpoint"] or "", e["agent_id"], e["unit_price"], UNITS[e["kind"]])
            groups[key][0] += e["quantity"]
            groups[key][1] += e["unit_price"] * e["quantity"]
    return {k: (q, c.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)) for k, (q, c) in groups.items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(_event, max_size=25), zone=st.sampled_from(ZONES))
def test_a_drafted_invoice_equals_its_recomputation_and_its_lines_sum_to_its_total(
    world: World, events: list[dict[str, Any]], zone: str
) -> None:
    tz = ZoneInfo(zone)
    start, end = dt.datetime(2025, 3, 1, tzinfo=tz), dt.datetime(2025, 4, 1, tzinfo=tz)
    for e in events:
        e["at"] = (start if e["boundary"] == "start" else end) + dt.timedelta(seconds=e["offset_s"])
    try:
        with transaction.atomic():
            Tenant.objects.filter(pk=world.tenant_a.pk).update(time_zone=zone, plan=None)
            tenant = Tenant.objects.get(pk=world.tenant_a.pk)
            with schema_context(tenant.schema_name):
                UsageEvent.objects.bulk_create(
                    [
                        UsageEvent(
                            kind=e["kind"],
                            quantity=e["quantity"],
                            unit=UNITS[e["kind"]],
                            model=e["model"],
                            agent_id=e["agent_id"],
                            unit_price=e["unit_price"],
                            cost=e["unit_price"] * e["quantity"],
                            currency="USD",
                            created_at=e["at"],
                            metadata={"endpoint": e["endpoint"]} if e["endpoint"] else {},
                        )
                        for e in events
                    ]
                )
                invoice = invoice_draft(principal=Principal.system("tests", tenant=tenant), period=PERIOD).invoice
                lines = list(invoice.lines.all())
                stored = {
                    (ln.kind, ln.model, ln.endpoint, ln.agent_id, ln.unit_price, ln.unit): (ln.quantity, ln.amount)
                    for ln in lines
                }
                assert stored == _expected(events, start, end)
                assert sum((ln.amount for ln in lines), Decimal(0)) == invoice.total == invoice.usage_total
                assert invoice.events_count == sum(start <= e["at"] < end for e in events)
                assert invoice_mismatches(tenant=tenant, invoice=invoice) == []
                raise _Rollback
    except _Rollback:
        pass
