"""Benchmark: what budget enforcement adds to one model call (reserve + settle).

Prints figures; asserts nothing. Runs against a fresh database ``bench_budget`` on the embedded
PostgreSQL (or ``BENCH_DATABASE_URL``). One tenant with the counters a call usually meets: a
tenant budget, an agent budget and the plan's monthly token quota (three ``BudgetPeriod`` rows
locked per call, all calls contending for the same three rows).

``TURNS`` threads (default 50), each with its own database connection, run ``--rounds`` model
calls each, all released together per round by a barrier: ``budget_reserve`` (timed), a pause
standing in for the model's stream (``--stream-ms``, so that reservations overlap), then the
call's two usage events and ``budget_settle`` in one transaction (the settle and the commit
timed: the commit is where the row locks are held until). Reported per call: reserve, settle
and their sum, p50/p95 in milliseconds. Target: p95 of the sum <= 3 ms.

Usage: ``.venv/bin/python tests/bench/bench_budget.py [--turns N] [--rounds N] [--stream-ms MS]``.
The last line is ``SUMMARY {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ["DEBUG"] = "false"
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ.setdefault("DATABASE_POOL", "false")

from tests.bench.bench_retrieval import prepare_database  # noqa: E402  (after the environment is set)
from tests.bench.live import percentiles  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=50, help="concurrent turns (threads)")
    parser.add_argument("--rounds", type=int, default=20, help="model calls per turn")
    parser.add_argument("--stream-ms", type=float, default=20.0, help="pause between reserve and settle")
    args = parser.parse_args()

    prepare_database("bench_budget", reuse=False)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, connections, transaction
    from django_tenants.utils import schema_context

    from agents.services import agent_create
    from billing.models import Budget, BudgetPeriod
    from billing.services.budgets import budget_reserve, budget_settle
    from billing.services.usage import usage_event_record
    from tenants.models import Plan, Tenant
    from tenants.principal import Principal
    from tenants.services.provisioning import tenant_create

    print("Preparing bench_budget (migrations)...", flush=True)
    call_command("migrate_schemas", interactive=False, verbosity=0)
    tenant = tenant_create(actor=Principal.system("bench"), slug="budgets", name="Budgets",
                           owner_email="o@bench.example").tenant
    tenant.plan = Plan.objects.create(code="bench", name="Bench", monthly_token_quota=10**12)
    tenant.save()
    with schema_context(tenant.schema_name):
        agent_create(principal=Principal.system("bench", tenant=tenant), slug="bench-agent", name="Bench",
                     config={"system_prompt": "Hi."})
        Budget.objects.create(name="tenant", scope="tenant", period="month", limit_tokens=10**12,
                              limit_cost=Decimal("1e9"), action="block")
        Budget.objects.create(name="agent", scope="agent", agent="bench-agent", period="day",
                              limit_tokens=10**12, action="alert")
    connection.set_schema_to_public()
    tenant = Tenant.objects.select_related("plan").get(pk=tenant.pk)

    reserve_ms: list[float] = []
    settle_ms: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(args.turns)

    def turn(_: int) -> None:
        try:
            with schema_context(tenant.schema_name):
                for _round in range(args.rounds):
                    barrier.wait()
                    started = time.perf_counter()
                    hold = budget_reserve(tenant=tenant, tokens=600, cost=Decimal("0.0012"),
                                          agent_slug="bench-agent")
                    reserved = time.perf_counter()
                    time.sleep(args.stream_ms / 1000)
                    with transaction.atomic():
                        usage_event_record(kind="llm.input_tokens", quantity=90, unit_price=Decimal("0.000001"))
                        usage_event_record(kind="llm.output_tokens", quantity=40, unit_price=Decimal("0.000002"))
                        settle_started = time.perf_counter()
                        budget_settle(hold=hold, tokens=130, cost=Decimal("0.00017"))
                    settled = time.perf_counter()
                    with lock:
                        reserve_ms.append((reserved - started) * 1000)
                        settle_ms.append((settled - settle_started) * 1000)
        finally:
            connections.close_all()

    # One warm-up call creates the counters (a period's first call also seeds them).
    with schema_context(tenant.schema_name):
        budget_settle(hold=budget_reserve(tenant=tenant, tokens=1, cost=Decimal(0), agent_slug="bench-agent"),
                      tokens=1, cost=Decimal(0))
    connection.close()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.turns) as pool:
        list(pool.map(turn, range(args.turns)))
    wall = time.perf_counter() - started
    totals = [r + s for r, s in zip(reserve_ms, settle_ms, strict=True)]
    with schema_context(tenant.schema_name):
        rows = list(BudgetPeriod.objects.values_list("key", "spent_tokens", "reserved_tokens"))
    summary: dict[str, float | int] = {"turns": args.turns, "calls": len(totals), "wall_s": round(wall, 2)}
    for label, samples in (("reserve", reserve_ms), ("settle", settle_ms), ("reserve_plus_settle", totals)):
        p50, p95 = percentiles(samples)
        summary[f"{label}_p50_ms"] = round(p50, 3)
        summary[f"{label}_p95_ms"] = round(p95, 3)
        print(f"{label:>22}: p50 {p50:7.3f} ms   p95 {p95:7.3f} ms   max {max(samples):7.3f} ms", flush=True)
    print(f"counters after the run (key, spent, reserved): {rows}")
    print("target: reserve + settle p95 <= 3 ms")
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
