"""Benchmark: tenant provisioning time and host-routing overhead.

Prints figures; asserts nothing. Runs against a fresh database ``bench_portal`` on the embedded
PostgreSQL (or on ``BENCH_DATABASE_URL``), so it never touches development or test data.

1. Provisioning: ``tenant_create`` (schema cloned from the template, domain, owner, two audit
   events) for 20 tenants, and again for 20 more once 500 exist; p50/p95 in milliseconds.
   Target: <= 1 s per tenant.
2. Routing: ``GET /api/v1/me`` with an API key through the whole middleware stack (in-process
   Django test client, so network jitter does not hide the routing cost) with 1, 100 and 500
   tenants provisioned; p50/p95 in milliseconds over ``REQUESTS`` calls after a warm-up.
   Target: the 500-tenant figure within 1 ms of the 1-tenant figure.

Usage: ``make bench`` or ``.venv/bin/python tests/bench/bench_tenants.py [--requests N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ["DEBUG"] = "false"
os.environ.setdefault("LOG_LEVEL", "WARNING")

from tests.bench.bench_retrieval import prepare_database  # noqa: E402  (after the environment is set)


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p95) of ``samples`` (inclusive method, as numpy's default 'linear')."""
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[94]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per tenant-count level")
    args = parser.parse_args()

    prepare_database("bench_portal", reuse=False)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    from tenants.principal import Principal
    from tenants.services.keys import api_key_create
    from tenants.services.provisioning import tenant_create

    print("Preparing bench_portal (migrations)...", flush=True)
    call_command("migrate_schemas", interactive=False, verbosity=0)
    system = Principal.system("bench")

    def provision(n: int) -> float:
        started = time.perf_counter()
        tenant_create(actor=system, slug=f"prov-{n:03d}", name=f"Provisioned {n}",
                      owner_email=f"owner{n}@bench.example")
        return (time.perf_counter() - started) * 1000

    first = tenant_create(actor=system, slug="measured", name="Measured", owner_email="o@bench.example").tenant
    key = api_key_create(principal=Principal.system("bench", tenant=first), tenant=first, name="bench",
                         scopes=["tenant:read"]).secret
    client = Client(HTTP_HOST=f"{first.slug}.localhost", HTTP_AUTHORIZATION=f"Bearer {key}")

    def measure(level: int) -> tuple[float, float]:
        connection.set_schema_to_public()
        for _ in range(200):
            assert client.get("/api/v1/me").status_code == 200
        samples = []
        for _ in range(args.requests):
            started = time.perf_counter()
            response = client.get("/api/v1/me")
            samples.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
        p50, p95 = percentiles(samples)
        print(f"GET /api/v1/me with {level:>3} tenant(s): p50 {p50:.2f} ms, p95 {p95:.2f} ms "
              f"({args.requests} requests)", flush=True)
        return p50, p95

    results: dict[int, tuple[float, float]] = {1: measure(1)}

    # Provisioning time over the next 20 tenants.
    timings = [provision(n) for n in range(1, 21)]
    p50, p95 = percentiles(timings)
    print(f"\nprovisioning (20 tenants): p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {max(timings):.0f} ms "
          f"(target <= 1000 ms)\n", flush=True)

    provisioned = 21
    for level in (100, 500):
        started = time.perf_counter()
        for n in range(provisioned, level):
            provision(n)
        print(f"  (provisioned up to {level} tenants in {time.perf_counter() - started:.0f} s)", flush=True)
        provisioned = level
        results[level] = measure(level)
    # Provisioning again with 500 tenants present: clone_schema reads the catalogue, which grows.
    timings = [provision(n) for n in range(500, 520)]
    p50, p95 = percentiles(timings)
    print(f"provisioning with 500 tenants present (20 more): p50 {p50:.0f} ms, p95 {p95:.0f} ms, "
          f"max {max(timings):.0f} ms", flush=True)
    base = results[1][0]
    print(f"\nrouting overhead at 500 tenants vs 1: p50 {results[500][0] - base:+.2f} ms, "
          f"p95 {results[500][1] - results[1][1]:+.2f} ms "
          f"(ratio {results[500][0] / base:.3f}; target within 1 ms)")


if __name__ == "__main__":
    main()
