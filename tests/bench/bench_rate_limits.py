"""Benchmark: the cost of one plan rate-limit check (``config.ratelimit.rate_limit_hit``).

Prints figures; asserts nothing. Needs only Redis (``REDIS_URL``): the tenant and its plan are
unsaved objects, so no database is touched. Three cases, ``--calls`` each, p50/p95/max in
milliseconds per check:

- ``accepted``: a plan of ``--limit`` requests per minute, hits 1..limit (the moving window's
  list grows to its full length), repeated over fresh callers until ``--calls`` are done;
- ``refused``: the same caller past its limit (``TooManyRequests`` built and raised);
- ``unlimited``: a plan without the limit (no Redis call).

Results go to docs/perf/2026-12-07-rate-limits.md.

Usage: ``.venv/bin/python tests/bench/bench_rate_limits.py [--calls N] [--limit N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
# Settings start the embedded PostgreSQL when no DATABASE_URL is set; this bench never connects.
os.environ.setdefault("DATABASE_URL", "postgresql://unused@127.0.0.1:1/unused")


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return (
        f"p50 {statistics.median(ordered) * 1000:.3f} ms  p95 {p95 * 1000:.3f} ms  "
        f"max {ordered[-1] * 1000:.3f} ms  (n={len(ordered)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--limit", type=int, default=600)
    args = parser.parse_args()

    import django

    django.setup()
    from config import ratelimit
    from config.errors import TooManyRequests
    from config.redis import redis_client
    from tenants.models import ApiKey, Plan, Tenant
    from tenants.principal import Principal

    ratelimit.KEY_PREFIX = f"ratelimit-bench-{uuid.uuid4().hex[:8]}"
    limited = Tenant(
        schema_name="bench_rl",
        slug="bench_rl",
        plan=Plan(pk=-1, code="bench", name="Bench", api_requests_per_minute=args.limit),
    )
    unlimited = Tenant(schema_name="bench_rl_free", slug="bench_rl_free", plan=Plan(pk=-2, code="free", name="Free"))

    def caller() -> Principal:
        return Principal(
            kind="api_key", tenant=limited, permissions=frozenset(), api_key=ApiKey(key_id=uuid.uuid4().hex[:12])
        )

    def timed(call: Callable[[], object]) -> float:
        start = time.perf_counter()
        with contextlib.suppress(TooManyRequests):
            call()
        return time.perf_counter() - start

    def hit(tenant: Tenant, principal: Principal) -> Callable[[], object]:
        return lambda: ratelimit.rate_limit_hit(tenant=tenant, principal=principal, limit="api_requests_per_minute")

    try:
        timed(hit(limited, caller()))  # connect and load the Lua scripts
        accepted: list[float] = []
        while len(accepted) < args.calls:
            principal = caller()
            accepted += [timed(hit(limited, principal)) for _ in range(min(args.limit, args.calls - len(accepted)))]
        full = caller()
        for _ in range(args.limit):
            hit(limited, full)()
        refused = [timed(hit(limited, full)) for _ in range(args.calls)]
        free = [timed(hit(unlimited, caller())) for _ in range(args.calls)]
    finally:
        keys = list(redis_client().scan_iter(f"{ratelimit.KEY_PREFIX}:*"))
        if keys:
            redis_client().delete(*keys)
    print(
        f"rate limit check, moving window on {redis_client().connection_pool.connection_kwargs.get('host')}, "
        f"limit {args.limit}/min"
    )
    print(f"  accepted   {_ms(accepted)}")
    print(f"  refused    {_ms(refused)}")
    print(f"  unlimited  {_ms(free)}")


if __name__ == "__main__":
    main()
