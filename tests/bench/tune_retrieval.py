"""Choose the retrieval defaults on SciFact's *train* queries, then report them on the test queries.

Needs the database ``bench_retrieval.py`` ingested (run it first). For every query the candidate
lists are fetched once per BM25 parameter pair (``hybrid_candidates``, both scores for every
candidate), and fusion variants are then scored offline, so the grid costs little more than one
pass of queries per (k1, b). Prints the best settings on train and their test figures; choosing
on train and reporting on test keeps the test queries out of the tuning.

Usage: ``.venv/bin/python tests/bench/tune_retrieval.py [--pool 200]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_retrieval import (  # noqa: E402  (path set above)
    load_queries,
    ndcg_at,
    prepare_database,
    recall_at,
)


def _doc_ranking(ranked: list[Any], doc_of: dict[int, str]) -> list[str]:
    return list(dict.fromkeys(doc_of[c.chunk_id] for c, *_ in ranked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", type=int, default=200)
    parser.add_argument("--database", default="bench_kb")
    args = parser.parse_args()
    if not prepare_database(args.database, reuse=True):
        print("Run tests/bench/bench_retrieval.py first: it ingests SciFact into bench_kb.")
        return
    import django

    django.setup()
    from django_tenants.utils import schema_context

    from knowledge.embeddings import embedder
    from knowledge.models import Chunk, Collection
    from knowledge.retrieval import fuse, hybrid_candidates

    grid_k1b = [(0.9, 0.4), (1.2, 0.75), (1.2, 0.4), (0.9, 0.6), (1.5, 0.6)]
    alphas = [0.3, 0.4, 0.5, 0.6, 0.7]
    with schema_context("t_scifact"):
        collections = list(Collection.objects.all())
        doc_of = dict(Chunk.objects.values_list("id", "document__external_id"))
        model = embedder()
        results: dict[str, dict[tuple[Any, ...], tuple[float, float]]] = {}
        for split in ("train", "test"):
            queries, qrels = load_queries(split)
            vectors = {qid: model.embed_query(text) for qid, text in queries.items()}
            scores: dict[tuple[Any, ...], list[tuple[float, float]]] = {}
            for k1, b in grid_k1b:
                for qid, text in queries.items():
                    candidates = hybrid_candidates(text, vectors[qid], collections, args.pool, k1=k1, b=b)
                    variants = [("convex", a, n) for a in alphas for n in ("minmax", "zscore")]
                    for fusion, alpha, norm in [*variants, ("rrf", None, None)]:
                        ranking = _doc_ranking(fuse(candidates, fusion=fusion, alpha=alpha, normalization=norm),
                                               doc_of)
                        key = (k1, b, f"{fusion}-{norm}" if norm else fusion, alpha)
                        scores.setdefault(key, []).append((ndcg_at(ranking, qrels[qid]),
                                                           recall_at(ranking, qrels[qid])))
                    keyword_only = sorted((c for c in candidates if c.in_sparse), key=lambda c: -c.bm25)
                    ranking = list(dict.fromkeys(doc_of[c.chunk_id] for c in keyword_only))
                    scores.setdefault((k1, b, "bm25", None), []).append(
                        (ndcg_at(ranking, qrels[qid]), recall_at(ranking, qrels[qid])))
                print(f"  {split}: k1={k1} b={b} done", flush=True)
            results[split] = {key: (statistics.fmean(s[0] for s in v), statistics.fmean(s[1] for s in v))
                              for key, v in scores.items()}
    train, test = results["train"], results["test"]
    print(f"\n{'k1':>4} {'b':>5} {'fusion':>7} {'alpha':>5} | {'train nDCG':>10} {'R@100':>6} | "
          f"{'test nDCG':>9} {'R@100':>6}")
    for key in sorted(train, key=lambda k: -train[k][0]):
        k1, b, fusion, alpha = key
        print(f"{k1:>4} {b:>5} {fusion:>7} {alpha if alpha is not None else '-':>5} | {train[key][0]:10.3f} "
              f"{train[key][1]:6.3f} | {test[key][0]:9.3f} {test[key][1]:6.3f}")
    # The rule, fixed before looking at test figures: the best train nDCG@10.
    best = max((k for k in train if k[2].startswith("convex")), key=lambda k: train[k][0])
    print(f"\nchosen on train: k1={best[0]} b={best[1]} {best[2]} alpha={best[3]}: train nDCG@10 "
          f"{train[best][0]:.3f}, recall@100 {train[best][1]:.3f}; test nDCG@10 {test[best][0]:.3f}, "
          f"recall@100 {test[best][1]:.3f}")


if __name__ == "__main__":
    main()
