"""Benchmark: the scrape-time tenant state of ``/metrics`` (``config.metrics.tenant_state_read``).

Prints figures; asserts nothing. Runs against a fresh database ``bench_metrics`` on the embedded
PostgreSQL (or on ``BENCH_DATABASE_URL``). Tenants are not provisioned through the portal (1,000
would take a quarter of an hour): each is a ``tenants_tenant`` row and a schema holding the two
tables the read touches, with the columns it reads, ``DOCUMENTS`` documents spread over the four
statuses and ``APPROVALS`` approval requests (half pending). For 1, 100, 500 and 1,000 tenants it
times ``tenant_state_read`` (``RUNS`` runs after a warm-up; p50 and max in milliseconds), and
reports the relation locks one statement holds (two per schema).

Usage: ``.venv/bin/python tests/bench/bench_metrics_state.py [--documents N]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ["DEBUG"] = "false"
os.environ.setdefault("LOG_LEVEL", "WARNING")

from tests.bench.bench_retrieval import percentiles, prepare_database  # noqa: E402

RUNS = 20
APPROVALS = 4
LEVELS = (1, 100, 500, 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=50, help="documents per tenant")
    args = parser.parse_args()

    prepare_database("bench_metrics", reuse=False)
    import django

    django.setup()
    from django.db import connection

    from agents.models import ApprovalRequest
    from config.metrics import SCHEMAS_PER_STATEMENT, tenant_state_read
    from knowledge.models import Document

    documents, approvals = Document._meta.db_table, ApprovalRequest._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE public.tenants_tenant (id serial PRIMARY KEY, schema_name text UNIQUE)")
        cursor.execute("SHOW max_locks_per_transaction")
        locks = cursor.fetchone()[0]
    made = 0
    print(f"tenants  documents  p50_ms  max_ms  statements  locks_per_statement  (max_locks_per_transaction={locks})")
    for level in LEVELS:
        with connection.cursor() as cursor:
            for n in range(made, level):
                schema = f"t_bench_{n:05d}"
                cursor.execute(f'CREATE SCHEMA "{schema}"')
                cursor.execute(f'CREATE TABLE "{schema}"."{documents}" (id bigserial PRIMARY KEY,'
                               " status varchar(16) NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
                cursor.execute(f'CREATE TABLE "{schema}"."{approvals}" (id bigserial PRIMARY KEY,'
                               " status varchar(10) NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
                cursor.execute(f'CREATE INDEX ON "{schema}"."{approvals}" (status)')
                # Names made above, not input.
                fill_documents = (f'INSERT INTO "{schema}"."{documents}" (status) SELECT (ARRAY[\'pending\','  # noqa: S608
                                  "'processing','indexed','failed'])[1 + g %% 4] FROM generate_series(1, %s) g")
                fill_approvals = (f'INSERT INTO "{schema}"."{approvals}" (status) SELECT (ARRAY[\'pending\','  # noqa: S608
                                  "'approved'])[1 + g %% 2] FROM generate_series(1, %s) g")
                cursor.execute(fill_documents, [args.documents])
                cursor.execute(fill_approvals, [APPROVALS])
                cursor.execute("INSERT INTO public.tenants_tenant (schema_name) VALUES (%s)", [schema])
            cursor.execute("ANALYZE")
        made = level
        tenant_state_read()  # warm-up: catalog caches of this connection
        samples = []
        for _ in range(RUNS):
            started = time.perf_counter()
            state = tenant_state_read()
            samples.append((time.perf_counter() - started) * 1000)
        assert state.approvals_pending == level * APPROVALS // 2
        p50, _ = percentiles(samples)
        statements = -(-level // SCHEMAS_PER_STATEMENT)
        print(f"{level:7d}  {sum(state.documents.values()):9d}  {p50:6.1f}  {max(samples):6.1f}  {statements:10d}"
              f"  {2 * min(level, SCHEMAS_PER_STATEMENT):19d}", flush=True)


if __name__ == "__main__":
    main()
