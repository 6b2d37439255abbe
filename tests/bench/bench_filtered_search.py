"""Benchmark: vector search of one collection among near-duplicate ones, exact against HNSW.

Prints figures; asserts nothing. A fresh database ``bench_filtered`` (embedded PostgreSQL, or
``BENCH_DATABASE_URL``) gets one tenant with ``--others`` collections of ``--chunks`` synthetic
384-dimension unit vectors each, every one a near-duplicate of the same base vectors (clustered as
in ``bench_hnsw``, plus a small per-collection perturbation), loaded with the HNSW index in place
as imports write them; then the collection under test, the same way.

For ``--queries`` queries near base vectors it prints, per candidate-list size (10 and 100), the
recall against exact search (numpy over the collection's vectors) and p50/p95 milliseconds of:
the index statement (what ``vector_candidates`` runs above ``KB_VECTOR_EXACT_MAX_CHUNKS``, with
the collection index ruled out so that HNSW serves it) at several ``ef_search``, with relaxed and
strict iterative scans, and the exact statement (below the threshold), plus the exact statement
over 1..all collections (its cost per searched chunk), which sets the threshold. Results go to
docs/perf/filtered-vector-search.md.

Usage: ``.venv/bin/python tests/bench/bench_filtered_search.py [--chunks N] [--others N] [--queries N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ["DEBUG"] = "false"
os.environ.setdefault("LOG_LEVEL", "WARNING")

from tests.bench.bench_hnsw import DIM, literal  # noqa: E402
from tests.bench.bench_retrieval import percentiles, prepare_database  # noqa: E402


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=2000, help="chunks per collection")
    parser.add_argument("--others", type=int, default=5, help="near-duplicate collections besides the searched one")
    parser.add_argument("--duplicate-noise", type=float, default=0.05, help="norm of each copy's perturbation")
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    prepare_database("bench_filtered", reuse=False)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction
    from django_tenants.utils import schema_context

    from knowledge.models import Collection, Document
    from knowledge.retrieval import candidates
    from knowledge.services import collection_create
    from tenants.principal import Principal
    from tenants.services.provisioning import tenant_create

    call_command("migrate_schemas", interactive=False, verbosity=0)
    tenant = tenant_create(actor=Principal.system("bench"), slug="filtered", name="Filtered",
                           owner_email="bench@example.com").tenant
    rng = np.random.default_rng(20261207)
    centroids = unit(rng.normal(size=(max(args.chunks // 10, 10), DIM)))
    base = unit(centroids[rng.integers(0, len(centroids), args.chunks)]
                + rng.normal(0, 0.6 / np.sqrt(DIM), (args.chunks, DIM)))

    def copy() -> np.ndarray:
        return unit(base + rng.normal(0, args.duplicate_noise / np.sqrt(DIM), base.shape))

    def load(collection: Collection, vectors: np.ndarray) -> None:
        document = Document.objects.create(collection=collection, title="synthetic", mime_type="text/plain",
                                           size_bytes=0, sha256="0" * 64, status="indexed")
        with connection.cursor() as cursor, cursor.connection.cursor() as pg, pg.copy(
            "COPY knowledge_chunk (collection_id, document_id, ordinal, text, heading_path, char_start, "
            "char_end, token_count, lexeme_count, embedding) FROM STDIN"
        ) as stream:
            for i, vector in enumerate(vectors):
                stream.write_row((collection.pk, document.pk, i, f"chunk {i}", "[]", 0, 0, 0, 0, literal(vector)))
        Collection.objects.filter(pk=collection.pk).update(chunk_count=len(vectors))
        collection.refresh_from_db()

    with schema_context(tenant.schema_name):
        principal = Principal.system("bench", tenant=tenant)
        started = time.perf_counter()
        everything = []
        for k in range(args.others):
            other = collection_create(principal=principal, name=f"copy {k}")
            load(other, copy())
            everything.append(other)
        target = collection_create(principal=principal, name="searched")
        target_vectors = copy()
        load(target, target_vectors)
        everything.insert(0, target)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE knowledge_chunk")
            cursor.execute("SELECT id FROM knowledge_chunk WHERE collection_id = %s ORDER BY ordinal", [target.pk])
            ids = np.array([row[0] for row in cursor.fetchall()])
        print(f"{args.others + 1} collections x {args.chunks:,} chunks loaded with the index in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        queries = unit(base[rng.integers(0, args.chunks, args.queries)]
                       + rng.normal(0, 0.5 / np.sqrt(DIM), (args.queries, DIM)))

        def statement(sql: str, collections: list[Collection], *, ef_search: int | None = None,
                      order: str = "relaxed_order") -> Callable[[np.ndarray, int], list[int]]:
            def run(vector: np.ndarray, pool: int) -> list[int]:
                with transaction.atomic(), connection.cursor() as cursor, candidates._hnsw_settings(cursor, pool):
                    if ef_search is not None:
                        cursor.execute("SELECT set_config('hnsw.ef_search', %s, true), "
                                       "set_config('hnsw.iterative_scan', %s, true)", [str(ef_search), order])
                    cursor.execute(sql, candidates._params("", collections, pool, k1=None, b=None, vector=vector))
                    return [row[0] for row in cursor.fetchall()]
            return run

        def measure(label: str, run: Callable[[np.ndarray, int], list[int]], pool: int, *, recall: bool) -> None:
            for vector in queries[:10]:
                run(vector, pool)
            timings, recalls = [], []
            for vector in queries:
                started = time.perf_counter()
                got = run(vector, pool)
                timings.append((time.perf_counter() - started) * 1000)
                if recall:
                    truth = set(ids[np.argsort(-(target_vectors @ vector))[:pool]].tolist())
                    recalls.append(len(truth & set(got)) / pool)
            p50, p95 = percentiles(timings)
            shown = f"{statistics.fmean(recalls):6.3f} {min(recalls):6.2f}" if recall else f"{'':6} {'':6}"
            print(f"{label:44} {pool:5} {shown} {p50:8.1f} {p95:8.1f}", flush=True)

        print(f"\n{'statement':44} {'pool':>5} {'recall':>6} {'min':>6} {'p50 ms':>8} {'p95 ms':>8}")
        # The planner may take the collection index (exact) for the index statement; without it
        # (``collection_id + 0``) HNSW is all that is left.
        forced = candidates._VECTOR_SQL.replace("WHERE collection_id", "WHERE collection_id + 0")
        for pool in (10, 100):
            for order in ("relaxed_order", "strict_order"):
                for ef_search in (max(100, pool), 400, 1000):
                    measure(f"HNSW, {order}, ef_search {ef_search}",
                            statement(forced, [target], ef_search=ef_search, order=order), pool, recall=True)
            measure("exact", statement(candidates._EXACT_VECTOR_SQL, [target]), pool, recall=True)
        for n in range(1, len(everything) + 1):
            measure(f"exact over {n * args.chunks:,} chunks", statement(
                candidates._EXACT_VECTOR_SQL, everything[:n]), 10, recall=False)


if __name__ == "__main__":
    main()
