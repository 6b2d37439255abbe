"""Benchmark: ``migrate_schemas`` over 1,000 tenant schemas, serial vs parallel executor.

Prints figures and a final ``SUMMARY {json}`` line; asserts nothing. Runs on its own embedded
PostgreSQL (``var/pg-bench-migrate``, or ``BENCH_DATABASE_URL``) in a fresh database
``bench_migrate``, so it never touches development or test data.

What it measures, each as ``python manage.py migrate_schemas --noinput`` in a subprocess (what the
Helm chart's migration Job runs), with ``DATABASE_POOL=false`` as in that Job:

1. Provisioning: ``tenant_create`` (the real service: schema from the tenant apps' migration SQL,
   domain, owner, audit events) for ``--tenants`` tenants. Every tenant schema holds the real
   tables; the script counts them per schema afterwards.
2. No-op: nothing to apply, ``--executor=standard`` (one schema after another) and
   ``--executor=multiprocessing`` (django-tenants' parallel executor: a pool of forked processes;
   django-tenants 4.0.1 has no executor named ``parallel``). Target: < 10 minutes.
3. One new migration: a throw-away tenant app ``benchmig`` (one model, in a temporary directory
   added through a settings module that extends ``config.settings``) gets migration 0002 (an
   ``AddField``); applied with the standard executor, rolled back to 0001, applied again with the
   multiprocessing executor. The column is checked in every tenant schema after each apply.

The machine's load (other processes) is printed with the figures: they are wall-clock times.

Usage: ``make bench`` or ``.venv/bin/python tests/bench/bench_migrate.py [--tenants N]
[--processes P] [--reuse]`` (``--reuse`` keeps an existing ``bench_migrate`` database with its
tenants and skips provisioning).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PG_DIR = ROOT / "var" / "pg-bench-migrate"
DATABASE = "bench_migrate"
APP = "benchmig"

APP_FILES_0001 = {
    "__init__.py": "",
    "apps.py": f"""
        from django.apps import AppConfig


        class BenchMigConfig(AppConfig):
            name = "{APP}"
            default_auto_field = "django.db.models.BigAutoField"
    """,
    "models.py": """
        from django.db import models


        class Marker(models.Model):
            name = models.CharField(max_length=40)
    """,
    "migrations/__init__.py": "",
    "migrations/0001_initial.py": """
        from django.db import migrations, models


        class Migration(migrations.Migration):
            initial = True
            dependencies = []
            operations = [
                migrations.CreateModel(
                    name="Marker",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True,
                                                   serialize=False, verbose_name="ID")),
                        ("name", models.CharField(max_length=40)),
                    ],
                ),
            ]
    """,
}

APP_FILES_0002 = {
    "models.py": """
        from django.db import models


        class Marker(models.Model):
            name = models.CharField(max_length=40)
            note = models.TextField(default="", blank=True)
    """,
    "migrations/0002_marker_note.py": """
        from django.db import migrations, models


        class Migration(migrations.Migration):
            dependencies = [("benchmig", "0001_initial")]
            operations = [
                migrations.AddField(model_name="marker", name="note",
                                    field=models.TextField(default="", blank=True)),
            ]
    """,
}

SETTINGS = f"""
    from config.settings import *  # noqa: F403

    # A throw-away tenant app, so that one new migration can be applied and rolled back.
    TENANT_APPS = [*TENANT_APPS, "{APP}"]  # noqa: F405
    INSTALLED_APPS = [*INSTALLED_APPS, "{APP}"]  # noqa: F405
"""

PROVISION = """
import sys, time
import django
django.setup()
from tenants.principal import Principal
from tenants.services.provisioning import tenant_create
count, start = int(sys.argv[1]), int(sys.argv[2])
system = Principal.system("bench")
started = time.perf_counter()
for n in range(start, count):
    tenant_create(actor=system, slug=f"mig-{n:04d}", name=f"Migrated {n}", owner_email=f"owner{n}@bench.example")
    if (n + 1) % 100 == 0:
        print(f"  {n + 1} tenants ({time.perf_counter() - started:.0f} s)", flush=True)
"""


def write_files(base: Path, files: dict[str, str]) -> None:
    """Write ``files`` (path relative to ``base/benchmig`` -> source, dedented) under ``base``."""
    for relative, source in files.items():
        path = base / APP / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source).lstrip())


def database_url(*, reuse: bool) -> tuple[str, bool]:
    """(libpq URL of ``bench_migrate``, whether it existed and is reused)."""
    if os.environ.get("BENCH_DATABASE_URL"):
        return os.environ["BENCH_DATABASE_URL"], reuse
    import psycopg

    sys.path.insert(0, str(ROOT))
    from config.pgembed import ensure_server

    server = ensure_server(PG_DIR.resolve())
    with psycopg.connect(
        host=server.socket_dir, port=server.port, user=server.user, dbname="postgres", autocommit=True
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is not None
        if not (reuse and exists):
            conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
    return server.url(DATABASE), reuse and exists


CPU_SECONDS: dict[str, float] = {}


def run(env: dict[str, str], args: list[str], *, label: str, log: Path) -> float:
    """Run ``python <args>`` in the project directory; return its wall time in seconds.

    The CPU time (user + system) of the process and of the pool processes it waited for is kept
    in ``CPU_SECONDS[label]``: unlike the wall time, it hardly depends on what else the machine
    runs. PostgreSQL's own CPU time is not in it.

    Output goes to ``log`` (migrate_schemas prints a few lines per schema). Raises
    ``RuntimeError`` with the log's tail when the process fails.
    """
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("a") as out:
        out.write(f"\n### {label}: {' '.join(args)}\n")
        out.flush()
        completed = subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env=env,
            stdout=out,  # noqa: S603
            stderr=subprocess.STDOUT,
            check=False,
        )
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS[label] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if completed.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{label} failed (exit {completed.returncode}):\n{tail}")
    print(f"{label}: {elapsed:.1f} s (CPU {CPU_SECONDS[label]:.1f} s)", flush=True)
    return elapsed


def schema_census(url: str) -> dict[str, int]:
    """Tenant schemas, the fewest and most tables in one, and schemas with the new column."""
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT n.nspname, count(c.oid) FROM pg_namespace n"
            " LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind IN ('r', 'p')"
            " WHERE n.nspname LIKE 't\\_mig\\_%' GROUP BY n.nspname"
        ).fetchall()
        with_column = conn.execute(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_schema LIKE 't\\_mig\\_%' AND table_name = 'benchmig_marker' AND column_name = 'note'"
        ).fetchone()
    tables = [count for _, count in rows]
    return {
        "schemas": len(rows),
        "min_tables": min(tables, default=0),
        "max_tables": max(tables, default=0),
        "with_new_column": int(with_column[0]) if with_column else 0,
    }


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="processes of the multiprocessing executor (TENANT_MULTIPROCESSING_MAX_PROCESSES)",
    )
    parser.add_argument("--chunks", type=int, default=2, help="TENANT_MULTIPROCESSING_CHUNKS")
    parser.add_argument("--reuse", action="store_true", help="keep an existing bench_migrate database")
    args = parser.parse_args()

    url, reused = database_url(reuse=args.reuse)
    work = Path(tempfile.mkdtemp(prefix="bench-migrate-"))
    (work / "bench_migrate_settings.py").write_text(textwrap.dedent(SETTINGS).lstrip())
    write_files(work, APP_FILES_0001)
    log = ROOT / "var" / "bench-migrate.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text("")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench_migrate_settings",
        "PYTHONPATH": os.pathsep.join([str(work), str(ROOT)]),
        "DATABASE_URL": url,
        # As in the chart's migration Job: no pool, one connection per migrating process.
        "DATABASE_POOL": "false",
        "DEBUG": "false",
        "LOG_LEVEL": "WARNING",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"),
        "CACHE_KEY_PREFIX": "bench-migrate",
        "TENANT_MULTIPROCESSING_MAX_PROCESSES": str(args.processes),
        "TENANT_MULTIPROCESSING_CHUNKS": str(args.chunks),
    }
    migrate = ["manage.py", "migrate_schemas", "--noinput"]
    print(
        f"bench_migrate: {args.tenants} tenants, multiprocessing executor with {args.processes} processes "
        f"(chunks {args.chunks}); {load()}; log in {log}",
        flush=True,
    )

    results: dict[str, float] = {}
    if not reused:
        results["public_migrate_s"] = run(
            env, [*migrate, "--executor=standard"], label="migrate (public schema, no tenants)", log=log
        )
    existing = schema_census(url)["schemas"]
    if existing < args.tenants:
        started = time.perf_counter()
        run(
            env,
            ["-c", PROVISION, str(args.tenants), str(existing)],
            label=f"provision {args.tenants - existing} tenants",
            log=log,
        )
        results["provision_s"] = time.perf_counter() - started
        results["provision_ms_per_tenant"] = results["provision_s"] * 1000 / (args.tenants - existing)
    census = schema_census(url)
    print(
        f"tenant schemas: {census['schemas']}, tables per schema "
        f"{census['min_tables']}..{census['max_tables']}; {load()}",
        flush=True,
    )

    results["noop_standard_s"] = run(env, [*migrate, "--executor=standard"], label="no-op, standard executor", log=log)
    results["noop_multiprocessing_s"] = run(
        env,
        [*migrate, "--executor=multiprocessing"],
        label=f"no-op, multiprocessing executor ({args.processes} processes)",
        log=log,
    )
    print(load(), flush=True)

    write_files(work, APP_FILES_0002)
    results["new_standard_s"] = run(
        env, [*migrate, "--executor=standard"], label="one new migration, standard executor", log=log
    )
    applied_standard = schema_census(url)["with_new_column"]
    results["rollback_multiprocessing_s"] = run(
        env,
        [*migrate, "--executor=multiprocessing", APP, "0001"],
        label="(roll back to 0001, multiprocessing executor)",
        log=log,
    )
    rolled_back = schema_census(url)["with_new_column"]
    results["new_multiprocessing_s"] = run(
        env,
        [*migrate, "--executor=multiprocessing"],
        label=f"one new migration, multiprocessing executor ({args.processes} processes)",
        log=log,
    )
    applied_parallel = schema_census(url)["with_new_column"]
    print(
        f"schemas with the new column: {applied_standard} after standard, {rolled_back} after the rollback, "
        f"{applied_parallel} after multiprocessing; {load()}",
        flush=True,
    )

    summary = {
        "tenants": census["schemas"],
        "tables_per_schema": census["max_tables"],
        "processes": args.processes,
        "chunks": args.chunks,
        "cpus": os.cpu_count(),
        "applied_standard": applied_standard,
        "applied_multiprocessing": applied_parallel,
        **{key: round(value, 1) for key, value in results.items()},
        "cpu_s": {label: round(value, 1) for label, value in CPU_SECONDS.items()},
    }
    print(
        f"\nno-op: standard {results['noop_standard_s'] / 60:.1f} min, multiprocessing "
        f"{results['noop_multiprocessing_s'] / 60:.1f} min (target < 10 min)"
    )
    print("SUMMARY " + json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
