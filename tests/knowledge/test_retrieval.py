"""chunk_search on a small fixture: each mode orders results sensibly."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection

from billing.models import UsageEvent
from config.errors import ValidationFailed
from knowledge.ingestion import ingest_documents
from knowledge.models import Collection
from knowledge.retrieval import chunk_search
from knowledge.services import collection_create, document_upload
from tenants.principal import Principal
from tests.conftest import World

RECORDS = [
    ("leave", "Annual leave", "Employees receive twenty-five days of paid vacation each calendar year."),
    ("expenses", "Expense reports", "Submit expense reports with receipts within thirty days of the trip."),
    ("security", "Laptop security", "Lock your laptop screen whenever you leave your desk; use full-disk encryption."),
    ("parking", "Parking", "The company garage has forty parking spaces; bicycles park for free."),
    ("zeta", "Zeta protocol", "The zeta protocol governs how the quarterly inventory count is done."),
]


@pytest.fixture
def handbook(world: World, collection_a: Collection) -> Collection:
    lines = "\n".join(
        f'{{"_id": "{i}", "title": "{t}", "text": "{x}"}}' for i, t, x in RECORDS
    ).encode()
    principal = Principal.system("t", tenant=world.tenant_a)
    result = document_upload(principal=principal, collection=collection_a, filename="handbook.jsonl", data=lines,
                             queue=False)
    report = ingest_documents([d.pk for d in result.created])
    assert report.indexed == len(RECORDS)
    collection_a.refresh_from_db()
    return collection_a


def _ids(hits: list[Any]) -> list[str]:
    return [h.external_id for h in hits]


def test_vector_search_finds_paraphrases(handbook: Collection) -> None:
    hits = chunk_search(query="How many holidays do I get?", collections=[handbook], mode="vector", top_k=3)
    assert _ids(hits)[0] == "leave"
    assert hits[0].vector_score is not None and hits[0].keyword_score is None
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_keyword_search_ranks_by_bm25_with_stemming(handbook: Collection) -> None:
    hits = chunk_search(query="receipts for reporting expenses", collections=[handbook], mode="keyword", top_k=5)
    assert _ids(hits)[0] == "expenses"
    assert hits[0].keyword_score and hits[0].keyword_score > 0 and hits[0].vector_score is None


def test_a_rare_term_outweighs_a_common_one(handbook: Collection) -> None:
    # "leave" appears in two records, "zeta" in one: IDF must favour the rare term.
    hits = chunk_search(query="leave zeta", collections=[handbook], mode="keyword", top_k=5)
    assert _ids(hits)[0] == "zeta"


def test_keyword_search_needs_only_one_matching_term(handbook: Collection) -> None:
    # OR semantics: a query with words no document has still finds the one that matches.
    hits = chunk_search(query="bicycles spaceship quasar", collections=[handbook], mode="keyword", top_k=5)
    assert _ids(hits) == ["parking"]


def test_hybrid_scores_every_result_both_ways(handbook: Collection) -> None:
    hits = chunk_search(query="encryption of company laptops", collections=[handbook], mode="hybrid", top_k=5)
    assert _ids(hits)[0] == "security"
    assert all(h.vector_score is not None and h.keyword_score is not None for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].title == "Laptop security" and hits[0].text.startswith("Lock your laptop")


def test_hybrid_gives_a_chunk_only_the_vector_side_found_its_true_bm25(handbook: Collection) -> None:
    from knowledge.embeddings import embedder
    from knowledge.models import Chunk
    from knowledge.retrieval import KeywordSide, hybrid_rescore, keyword_side

    # The keyword side keeps only its best chunk (security); the dense side, asked with the
    # parking record's own vector, proposes parking, which also matches "parking": its BM25 comes
    # from its own postings and must equal what keyword search computes for it.
    full = keyword_side("laptop screen encryption parking", [handbook], 5)
    scores = dict(full.hits)
    parking = Chunk.objects.get(document__external_id="parking")
    assert full.hits[0][0] != parking.pk and scores[parking.pk] > 0
    vector = embedder().embed_query(parking.text)
    candidates = hybrid_rescore(vector, KeywordSide(full.hits[:1], full.idf), [handbook], 1)
    dense_only = [c for c in candidates if c.in_dense and not c.in_sparse]
    assert [c.chunk_id for c in dense_only] == [parking.pk]
    assert dense_only[0].bm25 == pytest.approx(scores[parking.pk])
    keyword_only = [c for c in candidates if c.in_sparse and not c.in_dense]
    assert [c.chunk_id for c in keyword_only] == [full.hits[0][0]] and keyword_only[0].cosine < dense_only[0].cosine


@pytest.mark.parametrize(("k1", "b"), [(0.9, 0.4), (1.2, 0.75), (2.0, 0.0)])
def test_keyword_scores_are_okapi_bm25_of_the_postings(handbook: Collection, k1: float, b: float) -> None:
    import math

    from knowledge.embeddings import embedder
    from knowledge.models import Posting
    from knowledge.retrieval import KeywordSide, hybrid_rescore, keyword_side

    # The module docstring's formula, computed here from the postings themselves: both
    # statements (the keyword side, and the dense side's scoring of its own candidates) must
    # give the same score for every chunk, whatever k1 and b are.
    query = "leave your laptop at the parking garage"
    side = keyword_side(query, [handbook], 10, k1=k1, b=b)
    postings = list(Posting.objects.filter(collection=handbook).values_list("chunk_id", "lexeme", "tf", "chunk_len"))
    n = handbook.chunk_count
    avglen = handbook.lexeme_total / n
    df: dict[str, int] = {}
    for _, lexeme, _, _ in postings:
        df[lexeme] = df.get(lexeme, 0) + 1
    assert set(side.idf) == {"leav", "laptop", "park", "garag"}
    expected: dict[int, float] = {}
    for chunk_id, lexeme, tf, length in postings:
        if lexeme in side.idf:
            idf = math.log(1 + (n - df[lexeme] + 0.5) / (df[lexeme] + 0.5))
            assert side.idf[lexeme] == pytest.approx(idf)
            expected[chunk_id] = expected.get(chunk_id, 0.0) + idf * tf * (k1 + 1) / (
                tf + k1 * (1 - b + b * length / avglen))
    assert dict(side.hits) == pytest.approx(expected) and len(expected) == 3
    # The dense side, given none of the keyword hits, scores its own candidates the same way.
    vector = embedder().embed_query(query)
    rescored = hybrid_rescore(vector, KeywordSide([], side.idf), [handbook], len(RECORDS), k1=k1, b=b)
    assert {c.chunk_id: c.bm25 for c in rescored if c.bm25 > 0} == pytest.approx(expected)


def test_bm25_is_computed_in_floating_point(handbook: Collection) -> None:
    from knowledge.embeddings import embedder
    from knowledge.retrieval import candidates

    # Parameters are bound on the client: an uncast k1 or b is a numeric literal, and PostgreSQL
    # then computes every posting's length normalization in (slow) numeric arithmetic.
    params = candidates._params("laptop parking", [handbook], 5, k1=None, b=None,
                               vector=embedder().embed_query("laptop parking"))
    params.update(lexemes=["laptop"], idfs=[1.0], sparse_ids=[], sparse_scores=[], feedback=3)
    for sql in (candidates._KEYWORD_SQL, candidates._HYBRID_SQL):
        with connection.cursor() as cursor:
            cursor.execute("EXPLAIN VERBOSE " + sql, params)
            plan = "\n".join(row[0] for row in cursor.fetchall())
        # Uncast, the plan reads ``(0.4 * (p.chunk_len)::numeric)``.
        assert "chunk_len" in plan and "chunk_len)::numeric" not in plan


def test_a_query_of_stop_words_only_is_ranked_by_vectors_alone(handbook: Collection) -> None:
    hits = chunk_search(query="the of and to", collections=[handbook], mode="hybrid", top_k=3, record_usage=False)
    assert len(hits) == 3
    assert all(h.keyword_score == 0 and h.keyword_rank is None for h in hits)
    assert [h.vector_score for h in hits] == sorted((h.vector_score for h in hits), reverse=True)


def test_rrf_fusion_is_available(handbook: Collection) -> None:
    hits = chunk_search(query="vacation days", collections=[handbook], mode="hybrid", fusion="rrf", top_k=3)
    assert _ids(hits)[0] == "leave"


def test_every_search_is_metered(handbook: Collection) -> None:
    chunk_search(query="parking", collections=[handbook], mode="keyword")
    event = UsageEvent.objects.get(kind="kb.query")
    assert event.metadata["mode"] == "keyword" and event.metadata["collections"] == [handbook.pk]


def test_search_is_limited_to_the_named_collections(world: World, handbook: Collection) -> None:
    other = collection_create(principal=Principal.system("t", tenant=world.tenant_a), name="Other")
    document_upload(principal=Principal.system("t", tenant=world.tenant_a), collection=other, filename="o.jsonl",
                    data=b'{"_id": "o1", "text": "Twenty-five days of paid vacation for contractors."}', queue=False)
    ingest_documents(list(other.documents.values_list("pk", flat=True)))
    other.refresh_from_db()
    only_other = chunk_search(query="paid vacation", collections=[other], mode="hybrid", top_k=10)
    assert _ids(only_other) == ["o1"]
    both = chunk_search(query="paid vacation", collections=[handbook, other], mode="hybrid", top_k=10)
    assert {"o1", "leave"} <= set(_ids(both))


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"query": "   "}, "empty_query"),
    ({"query": "x" * 2001}, "query_too_long"),
    ({"query": "x", "mode": "semantic"}, "invalid_mode"),
    ({"query": "x", "top_k": 0}, "invalid_top_k"),
    ({"query": "x", "top_k": 201}, "invalid_top_k"),
    ({"query": "x", "fusion": "max"}, "invalid_fusion"),
])
def test_bad_searches_are_rejected(handbook: Collection, kwargs: dict[str, Any], code: str) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        chunk_search(collections=[handbook], **kwargs)
    assert excinfo.value.code == code


def test_searching_an_empty_collection_returns_nothing(world: World, collection_a: Collection) -> None:
    empty = collection_create(principal=Principal.system("t", tenant=world.tenant_a), name="Empty")
    for mode in ("vector", "keyword", "hybrid"):
        assert chunk_search(query="anything", collections=[empty], mode=mode) == []


def test_the_hnsw_index_serves_vector_search(handbook: Collection) -> None:
    from knowledge.embeddings import embedder
    from knowledge.retrieval import candidates

    # Both statements that search by vector, as they run: the query vector comes from a CTE
    # through a sub-select, which the index scan must still take as its ORDER BY argument. On
    # five chunks the planner would rather sort them; without sorts and bitmap scans, only an
    # index that can order by distance is left.
    params = candidates._params("", [handbook], 5, k1=None, b=None, vector=embedder().embed_query("parking"))
    params.update(lexemes=[], idfs=[], sparse_ids=[], sparse_scores=[], feedback=3)
    # The hybrid statement searches twice: the feedback chunks, then the dense side.
    for sql, scans in ((candidates._VECTOR_SQL, 1), (candidates._HYBRID_SQL, 2)):
        with connection.cursor() as cursor, candidates._hnsw_settings(cursor, 5):
            cursor.execute("SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off")
            cursor.execute("EXPLAIN " + sql, params)
            plan = " ".join(row[0] for row in cursor.fetchall())
        assert plan.count("Index Scan using chunk_embedding_hnsw") == scans, plan


def _setting(cursor: Any, name: str) -> str:
    cursor.execute("SELECT current_setting(%s)", [name])
    return str(cursor.fetchone()[0])


def test_vector_queries_turn_sequential_scans_off_only_while_they_run(handbook: Collection) -> None:
    from django.db import DataError, transaction

    from knowledge.retrieval.candidates import _hnsw_settings

    with connection.cursor() as cursor:
        with _hnsw_settings(cursor, 300):
            assert _setting(cursor, "enable_seqscan") == "off"
            assert _setting(cursor, "hnsw.ef_search") == "300"
        # Back on for every other query; ef_search stays (only vector queries read it).
        assert _setting(cursor, "enable_seqscan") == "on"
        assert _setting(cursor, "hnsw.ef_search") == "300"
        # A failing vector query leaves nothing behind either.
        with pytest.raises(DataError), transaction.atomic(), _hnsw_settings(cursor, 10):
            cursor.execute("SELECT 1 / 0")
        assert _setting(cursor, "enable_seqscan") == "on"
    # And the search itself still works with the settings in place.
    assert chunk_search(query="vacation days", collections=[handbook], mode="vector", top_k=2)


def test_hits_carry_the_heading_path_and_page(world: World, collection_a: Collection) -> None:
    text = b"# Travel\n\n## Meals\n\nMeals on business trips are reimbursed up to forty euros per day.\n"
    principal = Principal.system("t", tenant=world.tenant_a)
    result = document_upload(principal=principal, collection=collection_a, filename="travel.md", data=text,
                             queue=False)
    ingest_documents([d.pk for d in result.created])
    for mode in ("vector", "keyword", "hybrid"):
        hits = chunk_search(query="meals reimbursed per day", collections=[collection_a], mode=mode, top_k=1)
        assert hits[0].heading_path == ["Travel", "Meals"], mode
        assert hits[0].title and hits[0].document_id == result.created[0].pk


def test_hybrid_feedback_searches_with_the_query_plus_its_nearest_chunks(handbook: Collection) -> None:
    import numpy as np

    from knowledge.embeddings import embedder
    from knowledge.models import Chunk
    from knowledge.retrieval import KeywordSide, hybrid_rescore

    # Rocchio on the dense side: the cosines hybrid reports must be those against
    # q + w * mean(the m chunks nearest q), computed here from the stored vectors.
    query = embedder().embed_query("where do I park my car")
    chunks = {c.pk: np.asarray(c.embedding, dtype=np.float64) for c in Chunk.objects.filter(collection=handbook)}
    nearest = sorted(chunks, key=lambda i: -float(chunks[i] @ query) / np.linalg.norm(chunks[i]))[:2]
    expanded = query + 0.5 * np.mean([chunks[i] for i in nearest], axis=0)
    expanded /= np.linalg.norm(expanded)

    def cosines(**feedback: Any) -> dict[int, float]:
        found = hybrid_rescore(query, KeywordSide([], {}), [handbook], len(chunks), **feedback)
        return {c.chunk_id: c.cosine for c in found}

    with_feedback = cosines(feedback=2, feedback_weight=0.5)
    assert set(with_feedback) == set(chunks)
    for chunk_id, vector in chunks.items():
        assert with_feedback[chunk_id] == pytest.approx(float(vector @ expanded) / np.linalg.norm(vector), abs=1e-5)
    plain = cosines(feedback=0)
    for chunk_id, vector in chunks.items():
        assert plain[chunk_id] == pytest.approx(float(vector @ query) / np.linalg.norm(vector), abs=1e-5)
    assert cosines(feedback=2, feedback_weight=0) == pytest.approx(plain)
    assert with_feedback != pytest.approx(plain, abs=1e-3), "the feedback moved the query"


def test_hybrid_feedback_on_an_empty_collection_finds_nothing_without_error(world: World,
                                                                           collection_a: Collection) -> None:
    empty = collection_create(principal=Principal.system("t", tenant=world.tenant_a), name="Empty")
    assert chunk_search(query="parking", collections=[empty], mode="hybrid", record_usage=False) == []


@pytest.mark.parametrize(("fusion", "feedback", "keyword_feedback"), [("convex", None, 7), ("rrf", 0, 0)])
def test_only_convex_fusion_searches_with_feedback(handbook: Collection, monkeypatch: pytest.MonkeyPatch,
                                                   fusion: str, feedback: int | None, keyword_feedback: int) -> None:
    from knowledge.retrieval import search

    seen: list[int | None] = []
    keyword_seen: list[int] = []
    rescore, keyword = search.hybrid_rescore, search.keyword_side

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("feedback"))
        return rescore(*args, **kwargs)

    def keyword_spy(*args: Any, **kwargs: Any) -> Any:
        keyword_seen.append(kwargs.get("feedback_chunks", 0))
        return keyword(*args, **kwargs)

    monkeypatch.setattr(search, "hybrid_rescore", spy)  # where chunk_search looks them up
    monkeypatch.setattr(search, "keyword_side", keyword_spy)
    hits = chunk_search(query="parking garage", collections=[handbook], mode="hybrid", fusion=fusion,
                        top_k=2, record_usage=False)
    assert seen == [feedback] and keyword_seen == [keyword_feedback] and hits[0].external_id == "parking"
    # keyword mode itself stays plain BM25 of the query's own terms
    plain = keyword("vacation", [handbook], 10)
    hits = chunk_search(query="vacation", collections=[handbook], mode="keyword", record_usage=False)
    assert [(h.chunk_id, h.keyword_score) for h in hits] == plain.hits and len(hits) == 1


def _rm3(collection: Collection, query_terms: set[str], chunks: int, terms: int, weight: float,
         k1: float = 0.9, b: float = 0.4) -> tuple[dict[str, float], dict[int, float]]:
    """RM3 as the package docstring gives it, from the postings: (term -> weight * IDF, chunk ->
    BM25 of the weighted expanded query)."""
    import math

    from knowledge.models import Posting

    postings = list(Posting.objects.filter(collection=collection).values_list("chunk_id", "lexeme", "tf",
                                                                             "chunk_len"))
    n, avglen = collection.chunk_count, collection.lexeme_total / collection.chunk_count
    df: dict[str, int] = {}
    for _, lexeme, _, _ in postings:
        df[lexeme] = df.get(lexeme, 0) + 1

    def idf(term: str) -> float:
        return math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))

    def bm25(term_idf: dict[str, float]) -> dict[int, float]:
        scores: dict[int, float] = {}
        for chunk_id, lexeme, tf, length in postings:
            if lexeme in term_idf:
                scores[chunk_id] = scores.get(chunk_id, 0.0) + term_idf[lexeme] * tf * (k1 + 1) / (
                    tf + k1 * (1 - b + b * length / avglen))
        return scores

    query = {t for t in query_terms if t in df}
    first = bm25({t: idf(t) for t in query})
    best = sorted(first, key=lambda c: (-first[c], c))[:chunks]
    share = {c: first[c] / sum(first[c] for c in best) for c in best}
    relevance: dict[str, float] = {}
    for chunk_id, lexeme, tf, length in postings:
        if chunk_id in share:
            relevance[lexeme] = relevance.get(lexeme, 0.0) + share[chunk_id] * tf / length
    top = sorted(relevance, key=lambda t: (-relevance[t], t))[:terms]
    total = sum(relevance[t] for t in top)
    weights = {t: weight / len(query) if t in query else 0.0 for t in query}
    for t in top:
        weights[t] = weights.get(t, 0.0) + (1 - weight) * relevance[t] / total
    weighted_idf = {t: w * idf(t) for t, w in weights.items()}
    return weighted_idf, bm25(weighted_idf)


def test_keyword_feedback_is_rm3_over_the_postings(handbook: Collection) -> None:
    from knowledge.retrieval import keyword_side

    # Expanding "paid vacation days" from its 2 best chunks by their 4 likeliest terms, with the
    # query's own terms at 0.6: every weighted IDF and every score must match RM3 computed here.
    side = keyword_side("paid vacation days", [handbook], 10, feedback_chunks=2, feedback_terms=4, query_weight=0.6)
    weighted_idf, scores = _rm3(handbook, {"paid", "vacat", "day"}, chunks=2, terms=4, weight=0.6)
    assert side.idf == pytest.approx(weighted_idf)
    assert len(weighted_idf) > 3, "the expansion added terms"
    assert dict(side.hits) == pytest.approx(scores)
    assert [s for _, s in side.hits] == sorted((s for _, s in side.hits), reverse=True)


def test_keyword_feedback_finds_a_chunk_that_shares_no_query_term(handbook: Collection) -> None:
    from knowledge.models import Chunk
    from knowledge.retrieval import keyword_side

    # "vacation" is only in the leave record; its other terms ("day", ...) bring in the expense
    # record ("within thirty days"), which plain BM25 of the query cannot reach.
    expenses = Chunk.objects.get(document__external_id="expenses").pk
    leave = Chunk.objects.get(document__external_id="leave").pk
    plain = keyword_side("vacation", [handbook], 10)
    assert [c for c, _ in plain.hits] == [leave]
    expanded = keyword_side("vacation", [handbook], 10, feedback_chunks=1, feedback_terms=10, query_weight=0.8)
    assert expanded.hits[0][0] == leave and expenses in dict(expanded.hits)
    assert "day" in expanded.idf and expanded.idf["vacat"] > expanded.idf["day"]
    # a query weight of 1 keeps the query's own terms only: the ranking of plain BM25
    only_query = keyword_side("vacation", [handbook], 10, feedback_chunks=1, feedback_terms=10, query_weight=1.0)
    assert [c for c, s in only_query.hits if s > 0] == [leave]


def test_keyword_feedback_with_no_matching_term_finds_nothing(handbook: Collection) -> None:
    from knowledge.retrieval import keyword_side

    side = keyword_side("spaceship quasar", [handbook], 10, feedback_chunks=3)
    assert side.hits == [] and side.idf == {}


@pytest.mark.parametrize(("weight", "terms"), [(1.5, 10), (-0.1, 10), (0.5, 0)])
def test_keyword_feedback_rejects_bad_settings(handbook: Collection, weight: float, terms: int) -> None:
    from knowledge.retrieval import keyword_side

    with pytest.raises(ValueError, match="query_weight|feedback_terms"):
        keyword_side("parking", [handbook], 10, feedback_chunks=2, feedback_terms=terms, query_weight=weight)


# Field collapsing on the document (max_chunks_per_document).

GARAGE_RULES = "\n\n".join(
    f"Parking rule {n}: parking permits for the parking garage are checked at the gate, parking "
    f"spaces are numbered and parking fees are paid monthly." for n in range(1, 13))


@pytest.fixture
def garage(world: World, handbook: Collection) -> Collection:
    """The handbook's five one-chunk records plus a twelve-chunk document about parking."""
    principal = Principal.system("t", tenant=world.tenant_a)
    collection = collection_create(principal=principal, name="Garage", chunk_size_tokens=32, chunk_overlap_tokens=0)
    document_upload(principal=principal, collection=collection, filename="handbook.jsonl", queue=False,
                    data="\n".join(f'{{"_id": "{i}", "title": "{t}", "text": "{x}"}}'
                                   for i, t, x in RECORDS).encode())
    document_upload(principal=principal, collection=collection, filename="garage.md", queue=False,
                    data=GARAGE_RULES.encode())
    from knowledge.models import Document

    report = ingest_documents(list(Document.objects.filter(collection=collection).values_list("pk", flat=True)))
    assert report.indexed == len(RECORDS) + 1
    collection.refresh_from_db()
    assert Document.objects.get(collection=collection, original_filename="garage.md").chunk_count >= 10
    return collection


@pytest.mark.parametrize("mode", ["keyword", "vector", "hybrid"])
def test_one_chunk_per_document_ranks_documents_by_their_best_chunk(garage: Collection, mode: str) -> None:
    query = "parking garage permits"
    chunks = chunk_search(query=query, collections=[garage], mode=mode, top_k=200, record_usage=False)
    assert len({h.document_id for h in chunks[:6]}) < 6, "the long document fills the chunk ranking"
    by_best_chunk = list(dict.fromkeys(h.document_id for h in chunks))
    documents = chunk_search(query=query, collections=[garage], mode=mode, top_k=4, max_chunks_per_document=1,
                             record_usage=False)
    # The first chunk of every document in the uncollapsed ranking, in that order (MaxP).
    assert [h.document_id for h in documents] == by_best_chunk[:4]
    first_chunk = {}
    for hit in chunks:
        first_chunk.setdefault(hit.document_id, hit.chunk_id)
    assert [h.chunk_id for h in documents] == [first_chunk[d] for d in by_best_chunk[:4]]
    assert documents[0].title and documents[0].text


def test_a_collapsed_search_widens_its_candidates_until_it_has_top_k_documents(
        garage: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    from knowledge.retrieval import search

    pools: list[int] = []
    candidates = search.keyword_candidates

    def spy(query: str, collections: list[Collection], pool: int, **kwargs: Any) -> Any:
        pools.append(pool)
        return candidates(query, collections, pool, **kwargs)

    monkeypatch.setattr(search, "keyword_candidates", spy)
    # "parking" is in the garage document's twelve chunks and in one handbook record: the first
    # six candidates (2 x top_k) are all the garage's, one document; doubling finds the record.
    hits = chunk_search(query="parking", collections=[garage], mode="keyword", top_k=3, max_chunks_per_document=1,
                        record_usage=False)
    assert len(hits) == 2 and hits[1].external_id == "parking" and hits[0].document_id != hits[1].document_id
    # Doubled while every list came back full; stopped at the first short one (all that match).
    assert pools[:2] == [6, 12] and all(b == 2 * a for a, b in zip(pools, pools[1:], strict=False))


def test_up_to_two_chunks_per_document(garage: Collection) -> None:
    hits = chunk_search(query="parking garage permits", collections=[garage], mode="hybrid", top_k=5,
                        max_chunks_per_document=2, record_usage=False)
    per_document: dict[int, int] = {}
    for hit in hits:
        per_document[hit.document_id] = per_document.get(hit.document_id, 0) + 1
    assert len(hits) == 5 and max(per_document.values()) == 2
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_collapsing_asks_for_no_more_than_the_collections_hold(garage: Collection) -> None:
    hits = chunk_search(query="parking", collections=[garage], mode="vector", top_k=50, max_chunks_per_document=1,
                        record_usage=False)
    assert len(hits) == len(RECORDS) + 1  # every document once, and no error past the chunk count


@pytest.mark.parametrize("value", [0, -1])
def test_max_chunks_per_document_below_one_is_rejected(handbook: Collection, value: int) -> None:
    with pytest.raises(ValidationFailed) as excinfo:
        chunk_search(query="parking", collections=[handbook], max_chunks_per_document=value)
    assert excinfo.value.code == "invalid_max_chunks_per_document"
