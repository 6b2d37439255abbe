"""Benchmark: drafting a month's invoice for a tenant with 1,000,000 usage events.

Prints figures; asserts nothing. Runs against a fresh database ``bench_invoice`` on the embedded
PostgreSQL (or on ``BENCH_DATABASE_URL``), so it never touches development or test data.

One tenant (timezone Europe/Berlin, a plan with a monthly fee); usage events inserted in SQL
(``INSERT ... SELECT generate_series``: 5 kinds, 3 models/endpoints, 20 agents, 4 unit prices,
spread over 2025-03 and a few days either side). ``invoice_draft`` is timed with 100,000 events
and again with 1,000,000 (redraft), with Python's peak traced memory (tracemalloc) and the
process's peak RSS, to show that drafting aggregates in SQL (memory flat in the event count).
Target: <= 10 s for 1,000,000 events.

Usage: ``make bench`` or ``.venv/bin/python tests/bench/bench_invoice.py [--events N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ["DEBUG"] = "false"
os.environ.setdefault("LOG_LEVEL", "WARNING")

from tests.bench.bench_retrieval import prepare_database  # noqa: E402  (after the environment is set)

INSERT_SQL = """
INSERT INTO billing_usageevent (kind, quantity, unit, model, agent_id, unit_price, cost, currency, user_id,
                                api_key_id, request_id, metadata, created_at)
SELECT k.kind, q.quantity, k.unit, 'model-' || (n %% 3), (n %% 20) + 1, p.price, p.price * q.quantity, 'USD', NULL,
       '', '', jsonb_build_object('endpoint', 'endpoint-' || (n %% 3)),
       %s::timestamptz + ((n * 2654435761) %% (%s::bigint * 1000)) * interval '1 millisecond'
FROM generate_series(%s::bigint, %s::bigint) AS n
CROSS JOIN LATERAL (SELECT (ARRAY['llm.input_tokens', 'llm.output_tokens', 'embedding.tokens', 'kb.query',
                                  'tool.call'])[(n %% 5) + 1] AS kind,
                           (ARRAY['token', 'token', 'token', 'query', 'call'])[(n %% 5) + 1] AS unit) AS k
CROSS JOIN LATERAL (SELECT ((n * 7919) %% 4000) + 1 AS quantity) AS q
CROSS JOIN LATERAL (SELECT (ARRAY[0.000000150000, 0.000000600000, 0.000002500000, 0.000100000000])[(n %% 4) + 1]
                           AS price) AS p
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="usage events in the end")
    args = parser.parse_args()

    prepare_database("bench_invoice", reuse=False)
    import django

    django.setup()
    import datetime as dt
    from decimal import Decimal

    from django.core.management import call_command
    from django.db import connection
    from django_tenants.utils import schema_context

    from billing.periods import month_bounds
    from billing.services.invoices import invoice_draft
    from tenants.models import Plan, Tenant
    from tenants.principal import Principal
    from tenants.services.provisioning import tenant_create

    print("Preparing bench_invoice (migrations, one tenant)...", flush=True)
    call_command("migrate_schemas", interactive=False, verbosity=0)
    system = Principal.system("bench")
    plan = Plan.objects.create(code="bench", name="Bench", monthly_fee=Decimal("99.00"))
    tenant = tenant_create(
        actor=system, slug="bench-inv", name="Bench", owner_email="owner@bench.test", plan=plan
    ).tenant
    Tenant.objects.filter(pk=tenant.pk).update(time_zone="Europe/Berlin")
    tenant = Tenant.objects.select_related("plan").get(pk=tenant.pk)
    start, end = month_bounds("2025-03", tenant.time_zone)
    first = start - dt.timedelta(days=3)
    span_s = int((end - start).total_seconds()) + 6 * 86400

    def insert(low: int, high: int) -> float:
        began = time.perf_counter()
        with schema_context(tenant.schema_name), connection.cursor() as cursor:
            cursor.execute(INSERT_SQL, [first, span_s, low, high])
            cursor.execute("ANALYZE billing_usageevent")
        return time.perf_counter() - began

    def draft() -> dict[str, float]:
        with schema_context(tenant.schema_name):
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            tracemalloc.start()
            began = time.perf_counter()
            invoice = invoice_draft(principal=Principal.system("bench", tenant=tenant), period="2025-03").invoice
            seconds = time.perf_counter() - began
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return {
                "seconds": round(seconds, 3),
                "events_in_month": invoice.events_count,
                "lines": invoice.lines.count(),
                "peak_traced_kib": round(peak / 1024, 1),
                "rss_growth_kib": rss_after - rss_before,
                "total": str(invoice.total),
            }

    small = min(100_000, args.events)
    print(f"Inserting {small:,} usage events...", flush=True)
    insert_small = insert(1, small)
    at_small = draft()
    print(f"  insert {insert_small:.1f} s; draft {at_small}", flush=True)
    print(f"Inserting {args.events - small:,} more...", flush=True)
    insert_rest = insert(small + 1, args.events)
    at_full = draft()
    print(f"  insert {insert_rest:.1f} s; redraft {at_full}", flush=True)
    summary = {
        "bench": "invoice_draft",
        "events": args.events,
        "target_seconds": 10,
        "draft_100k": at_small,
        "draft_full": at_full,
        "insert_seconds": round(insert_small + insert_rest, 1),
    }
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
