"""Benchmark: HNSW at 100,000 chunks in one tenant: latency and recall@10 against exact search.

Prints figures; asserts nothing. A fresh database ``bench_hnsw`` (embedded PostgreSQL, or
``BENCH_DATABASE_URL``) gets one tenant whose collection holds 100,000 chunks with synthetic
384-dimension unit vectors: a mixture of 2,000 clusters on the sphere with per-vector noise, so
neighbourhoods have structure like real embeddings rather than the uniform noise that makes every
index look bad. Rows are bulk-loaded with COPY, then the index is built, as a large import would.

For 500 queries drawn from the same distribution it measures the platform's vector query (the
SQL ``chunk_search`` runs, with the collection filter, ``hnsw.ef_search`` and iterative scans)
at several ``ef_search`` values, p50/p95 in milliseconds, and recall@10 against exact search
(the same query with index scans disabled).

Usage: ``make bench`` or ``.venv/bin/python tests/bench/bench_hnsw.py [--chunks N] [--queries N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ["DEBUG"] = "false"
os.environ.setdefault("LOG_LEVEL", "WARNING")

from tests.bench.bench_retrieval import percentiles, prepare_database  # noqa: E402

DIM = 384


def synthetic_vectors(n: int, rng: np.random.Generator, centroids: np.ndarray) -> np.ndarray:
    """``n`` unit vectors: a random centroid each, plus Gaussian noise (sigma 0.6 / sqrt(dim))."""
    picks = rng.integers(0, len(centroids), size=n)
    vectors = centroids[picks] + rng.normal(0, 0.6 / np.sqrt(DIM), size=(n, DIM)).astype(np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.6g}" for x in vector.tolist()) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=500)
    args = parser.parse_args()
    prepare_database("bench_hnsw", reuse=False)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction
    from django_tenants.utils import schema_context

    from knowledge.models import Collection, Document
    from knowledge.retrieval.candidates import _VECTOR_SQL, _params
    from knowledge.services import collection_create
    from tenants.principal import Principal
    from tenants.services.provisioning import tenant_create

    call_command("migrate_schemas", interactive=False, verbosity=0)
    tenant = tenant_create(actor=Principal.system("bench"), slug="hnsw", name="HNSW",
                           owner_email="bench@example.com").tenant
    rng = np.random.default_rng(20261122)
    centroids = rng.normal(size=(2000, DIM)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    with schema_context(tenant.schema_name):
        collection = collection_create(principal=Principal.system("bench", tenant=tenant), name="synthetic")
        other = collection_create(principal=Principal.system("bench", tenant=tenant), name="other")
        document = Document.objects.create(collection=collection, title="synthetic", mime_type="text/plain",
                                           size_bytes=0, sha256="0" * 64, status="indexed")
        vectors = synthetic_vectors(args.chunks, rng, centroids)
        print(f"loading {args.chunks:,} chunks with COPY...", flush=True)
        started = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute("DROP INDEX chunk_embedding_hnsw")
            raw = cursor.connection
            with raw.cursor() as pg, pg.copy(
                "COPY knowledge_chunk (collection_id, document_id, ordinal, text, heading_path, char_start, "
                "char_end, token_count, lexeme_count, embedding) FROM STDIN"
            ) as copy:
                for i, vector in enumerate(vectors):
                    # One chunk in ten belongs to another collection, so the filter has work to do.
                    owner = other.pk if i % 10 == 9 else collection.pk
                    copy.write_row((owner, document.pk, i, f"chunk {i}", "[]", 0, 0, 0, 0, literal(vector)))
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute("SET maintenance_work_mem = '1GB'")
            cursor.execute("CREATE INDEX chunk_embedding_hnsw ON knowledge_chunk USING hnsw "
                           "(embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)")
            cursor.execute("ANALYZE knowledge_chunk")
        build_s = time.perf_counter() - started
        Collection.objects.filter(pk=collection.pk).update(chunk_count=args.chunks)
        print(f"loaded in {load_s:.1f} s; HNSW index (m=16, ef_construction=64) built in {build_s:.1f} s")

        queries = synthetic_vectors(args.queries, rng, centroids)

        def run(vector: np.ndarray, *, ef_search: int | None) -> tuple[list[int], float]:
            # The statement vector search runs (knowledge.retrieval), with this ef_search.
            with transaction.atomic(), connection.cursor() as cursor:
                if ef_search is None:
                    cursor.execute("SET LOCAL enable_indexscan = off")
                else:
                    cursor.execute("SELECT set_config('hnsw.ef_search', %s, true), "
                                   "set_config('hnsw.iterative_scan', 'relaxed_order', true), "
                                   "set_config('enable_seqscan', 'off', true)", [str(ef_search)])
                started = time.perf_counter()
                cursor.execute(_VECTOR_SQL, _params("", [collection], 10, k1=None, b=None, vector=vector))
                ids = [r[0] for r in cursor.fetchall()]
                return ids, (time.perf_counter() - started) * 1000

        exact = []
        exact_ms = []
        for vector in queries:
            ids, ms = run(vector, ef_search=None)
            exact.append(set(ids))
            exact_ms.append(ms)
        p50, p95 = percentiles(exact_ms)
        print(f"\nexact search (sequential scan), {args.queries} queries: p50 {p50:.1f} ms, p95 {p95:.1f} ms")
        print(f"{'ef_search':>10} {'p50 ms':>8} {'p95 ms':>8} {'recall@10':>10}")
        for ef_search in (40, 100, 200):
            for vector in queries[:20]:
                run(vector, ef_search=ef_search)
            timings, recalls = [], []
            for vector, truth in zip(queries, exact, strict=True):
                ids, ms = run(vector, ef_search=ef_search)
                timings.append(ms)
                recalls.append(len(set(ids) & truth) / 10)
            p50, p95 = percentiles(timings)
            print(f"{ef_search:>10} {p50:8.2f} {p95:8.2f} {statistics.fmean(recalls):10.3f}", flush=True)
        print("(chunk_search uses ef_search = max(KB_HNSW_EF_SEARCH=100, the chunks it asks for per side))")


if __name__ == "__main__":
    main()
