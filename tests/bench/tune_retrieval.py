"""Choose the retrieval defaults on SciFact's *train* queries, then report them on the test queries.

Needs the database ``bench_retrieval.py`` ingested (run it first). For every query the candidate
lists are fetched once per BM25 parameter pair (``hybrid_candidates``, both scores for every
candidate), and fusion variants are then scored offline, so the grid costs little more than one
pass of queries per (k1, b). Prints the best settings on train and their test figures; choosing
on train and reporting on test keeps the test queries out of the tuning.

``--feedback`` instead scores the dense side's pseudo-relevance feedback (chunks m, weight w) at
the other defaults, and picks by the same first rule (best train nDCG@10). Measured on
2026-12-04 (pool 200): no feedback train 0.7427 / 0.9588, test 0.7351 / 0.9627 (nDCG@10 /
recall@100); the best train nDCG@10, m 3 and w 0.5, train 0.7455 / 0.9613, test 0.7379 / 0.9667.
Every setting of the grid raised train recall@100 (0.9600 to 0.9662) at a train nDCG@10 within
0.005; the test recall@100 of the grid spans 0.9633 to 0.9733, differences of one to three of
300 queries, so the rule, not the best test figure, sets the default.

``--keyword-feedback`` scores the keyword side's RM3 feedback (chunks d, terms t, query weight
l) the same way. Measured on 2026-12-06 (pool 200, 28 settings): none, train 0.7454 / 0.9613,
test 0.7381 / 0.9667; the best train nDCG@10 is a tie of d 7, t 15, l 0.7 (0.74731) and l 0.8
(0.74727), same train recall@100 0.9644; the default takes l 0.8, the one that moves the query
less: test 0.7332 / 0.9767 (l 0.7: 0.7258 / 0.9767). Train recall@100 rose in 21 of the 27
settings (paired gain at the default +0.0031, standard error 0.0019), test recall@100 in all 27
(0.9693 to 0.9793); test nDCG@10 fell in 24 (by up to 0.022), train nDCG@10 moved within 0.013.

Usage: ``.venv/bin/python tests/bench/tune_retrieval.py [--pool 200] [--feedback | --keyword-feedback]``.
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
    parser.add_argument("--feedback", action="store_true", help="tune the dense side's feedback instead")
    parser.add_argument("--keyword-feedback", action="store_true", help="tune the keyword side's RM3 instead")
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

    if args.feedback:
        tune_feedback(args.pool)
        return
    if args.keyword_feedback:
        tune_keyword_feedback(args.pool)
        return

    grid_k1b = [(0.9, 0.4), (1.2, 0.75), (1.2, 0.4), (0.9, 0.6), (1.5, 0.6)]
    alphas = [round(0.3 + 0.025 * i, 3) for i in range(21)]  # 0.3 to 0.8
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
    for key in sorted(train, key=lambda k: -train[k][0])[:30]:  # the 30 best of the grid
        k1, b, fusion, alpha = key
        print(f"{k1:>4} {b:>5} {fusion:>7} {alpha if alpha is not None else '-':>5} | {train[key][0]:10.3f} "
              f"{train[key][1]:6.3f} | {test[key][0]:9.3f} {test[key][1]:6.3f}")
    convex = [k for k in train if k[2].startswith("convex")]
    for label, best in (("best train nDCG@10", max(convex, key=lambda k: train[k][0])),
                        (f"best train recall@100 within {NDCG_TOLERANCE} of the best train nDCG@10",
                         choose(convex, train))):
        print(f"\n{label}: k1={best[0]} b={best[1]} {best[2]} alpha={best[3]}: train nDCG@10 "
              f"{train[best][0]:.4f}, recall@100 {train[best][1]:.4f}; test nDCG@10 {test[best][0]:.4f}, "
              f"recall@100 {test[best][1]:.4f}")


def _score_grid(grid: list[Any], pool: int, settings_of: Any) -> dict[str, dict[Any, tuple[float, float]]]:
    """Mean (nDCG@10, recall@100) of every setting of ``grid`` per split: each query's keyword side
    and hybrid candidates come from ``settings_of(setting)``, a (keyword_side kwargs,
    hybrid_rescore kwargs) pair, at the other defaults."""
    from django_tenants.utils import schema_context

    from knowledge.embeddings import embedder
    from knowledge.models import Chunk, Collection
    from knowledge.retrieval import fuse, hybrid_rescore, keyword_side

    results: dict[str, dict[Any, tuple[float, float]]] = {}
    with schema_context("t_scifact"):
        collections = list(Collection.objects.all())
        doc_of = dict(Chunk.objects.values_list("id", "document__external_id"))
        model = embedder()
        for split in ("train", "test"):
            queries, qrels = load_queries(split)
            scores: dict[Any, list[tuple[float, float]]] = {}
            for qid, text in queries.items():
                vector = model.embed_query(text)
                for setting in grid:
                    keyword_kwargs, rescore_kwargs = settings_of(setting)
                    keyword = keyword_side(text, collections, pool, **keyword_kwargs)
                    candidates = hybrid_rescore(vector, keyword, collections, pool, **rescore_kwargs)
                    ranking = _doc_ranking(fuse(candidates), doc_of)
                    scores.setdefault(setting, []).append((ndcg_at(ranking, qrels[qid]),
                                                           recall_at(ranking, qrels[qid])))
            results[split] = {key: (statistics.fmean(s[0] for s in v), statistics.fmean(s[1] for s in v))
                              for key, v in scores.items()}
            print(f"  {split}: done", flush=True)
    return results


def _print_grid(grid: list[Any], results: dict[str, dict[Any, tuple[float, float]]], label: str) -> None:
    train, test = results["train"], results["test"]
    print(f"\n{label:>14} | {'train nDCG':>10} {'R@100':>6} | {'test nDCG':>9} {'R@100':>6}")
    for key in grid:
        print(f"{key!s:>14} | {train[key][0]:10.4f} {train[key][1]:6.4f} | {test[key][0]:9.4f} {test[key][1]:6.4f}")
    best = max(grid, key=lambda k: train[k][0])
    print(f"\nbest train nDCG@10: {best}: train {train[best][0]:.5f} / {train[best][1]:.4f}, "
          f"test {test[best][0]:.4f} / {test[best][1]:.4f}")


def tune_feedback(pool: int) -> None:
    """Score the dense side's feedback grid (chunks m, weight w; m = 0 is none) on train and test
    at the other defaults (the keyword side without feedback, as when it was chosen); print every
    setting and the one the first rule picks."""
    grid = [(0, 0.0)] + [(m, w) for m in (3, 5, 10) for w in (0.25, 0.5, 1.0)]
    results = _score_grid(grid, pool, lambda s: ({}, {"feedback": s[0], "feedback_weight": s[1]}))
    _print_grid(grid, results, "m, w")


def tune_keyword_feedback(pool: int) -> None:
    """Score the keyword side's RM3 grid (feedback chunks d, terms t, query weight l; None is no
    feedback) on train and test at the other defaults; print every setting and the first rule's."""
    grid: list[tuple[int, int, float] | None] = [None] + [
        (d, t, w) for d in (3, 5, 7) for t in (5, 10, 15) for w in (0.6, 0.7, 0.8)]
    results = _score_grid(grid, pool, lambda s: ({} if s is None else {
        "feedback_chunks": s[0], "feedback_terms": s[1], "query_weight": s[2]}, {}))
    _print_grid(grid, results, "d, t, l")


# The defaults follow the first rule: the best train nDCG@10. The second rule also weighs the
# recall@100 target: among the settings within NDCG_TOLERANCE of the best train nDCG@10, the best
# train recall@100 (ties: the better nDCG@10). Measured on 2026-11-30 (before the dense side's
# feedback) it picks k1 0.9, b 0.6,
# min-max, alpha 0.675: train recall@100 0.9615 (first rule 0.9588), test 0.956 (first rule
# 0.963). Train recall@100 differences of this size (two or three of 809 queries) do not carry to
# the test queries, so the defaults stay on the first rule; the line is printed so that a change
# of data or model can be judged on both targets.
NDCG_TOLERANCE = 0.005


def choose(keys: list[tuple[Any, ...]], train: dict[tuple[Any, ...], tuple[float, float]]) -> tuple[Any, ...]:
    """The setting the rule above picks from ``keys`` by their train (nDCG@10, recall@100)."""
    best_ndcg = max(train[k][0] for k in keys)
    eligible = [k for k in keys if train[k][0] >= best_ndcg - NDCG_TOLERANCE]
    return max(eligible, key=lambda k: (train[k][1], train[k][0]))


if __name__ == "__main__":
    main()
