"""Benchmark: what budget enforcement adds to one model call (reserve + settle + fold).

Prints figures; asserts nothing. Runs against a fresh database ``bench_budget`` on the embedded
PostgreSQL (or ``BENCH_DATABASE_URL``). One tenant with the counters a call usually meets: a
tenant budget, an agent budget and the plan's monthly token quota (three ``BudgetPeriod`` rows
locked per call, all calls contending for the same three rows).

Two scenarios, ``--turns`` threads (default 50) each with its own database connection:

- ``spaced`` (the issue's scenario): each thread starts at a random instant of the first second
  and makes ``--rounds`` model calls as a turn does: ``budget_reserve``, a model stream of a
  random 0.3-1.5 s (``--stream-min``/``--stream-max``), then the meter transaction (the call's
  two usage events, ``budget_settle``, commit), then ``budget_fold``. ``--calls-per-turn`` calls share one
  ``budget_holds_guard`` (one turn: its first call loads the budgets in scope).
- ``burst`` (stress row): ``--burst-rounds`` rounds, every thread's reservation released at the
  same instant by a barrier, a 20 ms stream, then the meter transaction and the fold.

Reported per scenario, p50/p95 in milliseconds: ``reserve``; ``settle`` (the settle statement
inside the meter transaction: how much longer budgets make that transaction, lock waits
included); ``commit`` (the meter transaction's commit, which happens without budgets too);
``fold`` (the fold statement after that commit, its own transaction); ``settle_with_commit``;
``reserve_plus_settle`` (reserve + settle + fold: the overhead per model call, target p95 <= 3
ms) and ``reserve_plus_settle_with_commit``.

Usage: ``.venv/bin/python tests/bench/bench_budget.py [--turns N] [--rounds N] [--burst-rounds N]``.
The last line is ``SUMMARY {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
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
    parser.add_argument("--rounds", type=int, default=20, help="model calls per thread (spaced scenario)")
    parser.add_argument("--calls-per-turn", type=int, default=2, help="model calls per turn (spaced scenario)")
    parser.add_argument("--stream-min", type=float, default=0.3, help="shortest model stream, seconds")
    parser.add_argument("--stream-max", type=float, default=1.5, help="longest model stream, seconds")
    parser.add_argument("--burst-rounds", type=int, default=10, help="barrier rounds (burst scenario; 0: none)")
    args = parser.parse_args()

    prepare_database("bench_budget", reuse=False)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, connections, transaction
    from django_tenants.utils import schema_context

    from agents.services import agent_create
    from billing.models import Budget, BudgetPeriod, BudgetReservation
    from billing.services.budgets import budget_fold, budget_holds_guard, budget_reserve, budget_settle
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

    def meter(hold: object) -> tuple[float, float, float]:
        """The call's meter transaction and the fold after it: (settle ms, commit ms, fold ms)."""
        with transaction.atomic():
            usage_event_record(kind="llm.input_tokens", quantity=90, unit_price=Decimal("0.000001"))
            usage_event_record(kind="llm.output_tokens", quantity=40, unit_price=Decimal("0.000002"))
            settle_started = time.perf_counter()
            budget_settle(hold=hold, tokens=130, cost=Decimal("0.00017"))  # type: ignore[arg-type]
            settled = time.perf_counter()
        committed = time.perf_counter()
        budget_fold(hold=hold)  # type: ignore[arg-type]
        folded = time.perf_counter()
        return (settled - settle_started) * 1000, (committed - settled) * 1000, (folded - committed) * 1000

    def reserve() -> tuple[object, float]:
        started = time.perf_counter()
        hold = budget_reserve(tenant=tenant, tokens=600, cost=Decimal("0.0012"), agent_slug="bench-agent")
        return hold, (time.perf_counter() - started) * 1000

    Sample = tuple[float, float, float, float]  # reserve, settle, commit, fold (ms)

    def scenario(name: str, turn: Callable[[int, list[Sample]], None]) -> dict[str, float]:
        samples: list[Sample] = []

        def thread(n: int) -> None:
            try:
                with schema_context(tenant.schema_name):
                    turn(n, samples)
            finally:
                connections.close_all()

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.turns) as pool:
            list(pool.map(thread, range(args.turns)))
        wall = time.perf_counter() - started
        series = {
            "reserve": [r for r, _, _, _ in samples],
            "settle": [s for _, s, _, _ in samples],
            "commit": [c for _, _, c, _ in samples],
            "fold": [f for _, _, _, f in samples],
            "settle_with_commit": [s + c for _, s, c, _ in samples],
            "reserve_plus_settle": [r + s + f for r, s, _, f in samples],
            "reserve_plus_settle_with_commit": [r + s + c + f for r, s, c, f in samples],
        }
        result: dict[str, float] = {"calls": len(samples), "wall_s": round(wall, 2)}
        print(f"--- {name}: {args.turns} turns, {len(samples)} calls, {wall:.1f} s", flush=True)
        for label, values in series.items():
            p50, p95 = percentiles(values)
            result[f"{label}_p50_ms"] = round(p50, 3)
            result[f"{label}_p95_ms"] = round(p95, 3)
            print(f"{label:>32}: p50 {p50:7.3f} ms   p95 {p95:7.3f} ms   max {max(values):7.3f} ms", flush=True)
        return result

    def spaced(n: int, samples: list[Sample]) -> None:
        rng = random.Random(n)
        time.sleep(rng.uniform(0, 1))
        done = 0
        while done < args.rounds:
            with budget_holds_guard():  # one turn
                for _call in range(min(args.calls_per_turn, args.rounds - done)):
                    hold, reserve_ms = reserve()
                    time.sleep(rng.uniform(args.stream_min, args.stream_max))
                    settle_ms, commit_ms, fold_ms = meter(hold)
                    with lock:
                        samples.append((reserve_ms, settle_ms, commit_ms, fold_ms))
                    done += 1

    barrier = threading.Barrier(args.turns)

    def burst(_: int, samples: list[Sample]) -> None:
        with budget_holds_guard():
            for _round in range(args.burst_rounds):
                barrier.wait()
                hold, reserve_ms = reserve()
                time.sleep(0.02)
                settle_ms, commit_ms, fold_ms = meter(hold)
                with lock:
                    samples.append((reserve_ms, settle_ms, commit_ms, fold_ms))

    lock = threading.Lock()
    # One warm-up call creates the counters (a period's first call also seeds them).
    with schema_context(tenant.schema_name):
        warm = budget_reserve(tenant=tenant, tokens=1, cost=Decimal(0), agent_slug="bench-agent")
        budget_settle(hold=warm, tokens=1, cost=Decimal(0))
        budget_fold(hold=warm)
    connection.close()
    summary: dict[str, object] = {"turns": args.turns}
    summary["spaced"] = scenario("spaced", spaced)
    if args.burst_rounds:
        summary["burst"] = scenario("burst", burst)
    with schema_context(tenant.schema_name):
        rows = list(BudgetPeriod.objects.values_list("key", "spent_tokens", "reserved_tokens"))
        open_reservations = BudgetReservation.objects.count()
    print(f"counters after the run (key, spent, reserved): {rows}; open reservations: {open_reservations}")
    print("target: reserve + settle (+ fold) p95 <= 3 ms")
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
