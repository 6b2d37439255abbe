"""The knowledge-base REST API: shapes, limits, permissions, isolation, query counts."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client
from django_tenants.utils import schema_context

from knowledge.ingestion import ingest_documents
from knowledge.models import Chunk, Collection, Document
from knowledge.services import collection_create, document_upload
from tenants.principal import Principal
from tenants.services.keys import api_key_create
from tests.conftest import HOST_A, HOST_B, World, api_client, host_client

SECRET_TEXT = "The acme launch code is PELICAN-SEVEN and only acme may know it."


def _collection(client: Client, name: str = "Policies", **extra: Any) -> dict[str, Any]:
    response = client.post("/api/v1/knowledge/collections", {"name": name, **extra}, content_type="application/json")
    assert response.status_code == 201, response.content
    return response.json()  # type: ignore[no-any-return]


def _upload(client: Client, collection_id: int, *files: tuple[str, bytes]) -> Any:
    return client.post(f"/api/v1/knowledge/collections/{collection_id}/documents",
                       {"files": [SimpleUploadedFile(name, data) for name, data in files]})


def _indexed_collection_in(world: World, tenant_attr: str, text: str) -> Collection:
    tenant = getattr(world, tenant_attr)
    with schema_context(tenant.schema_name):
        principal = Principal.system("t", tenant=tenant)
        collection = collection_create(principal=principal, name=f"secrets of {tenant.slug}")
        result = document_upload(principal=principal, collection=collection, filename="s.txt", data=text.encode(),
                                 queue=False)
        ingest_documents([d.pk for d in result.created])
        collection.refresh_from_db()
    return collection


def test_collections_are_created_listed_changed_and_deleted(world: World, api_a: Client) -> None:
    created = _collection(api_a, description="HR", chunk_size_tokens=128, chunk_overlap_tokens=16)
    assert created["embedding_model"] == "all-MiniLM-L6-v2" and created["embedding_dim"] == 384
    listed = api_a.get("/api/v1/knowledge/collections").json()["items"]
    assert [c["name"] for c in listed] == ["Policies"]
    changed = api_a.patch(f"/api/v1/knowledge/collections/{created['id']}", {"description": "People"},
                          content_type="application/json")
    assert changed.status_code == 200 and changed.json()["description"] == "People"
    assert api_a.delete(f"/api/v1/knowledge/collections/{created['id']}").status_code == 204
    assert api_a.get(f"/api/v1/knowledge/collections/{created['id']}").status_code == 404


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"name": ""}, 422, "invalid_name"),
    ({"name": "x", "chunk_size_tokens": 1000}, 422, "invalid_chunk_size"),
    ({"name": "x", "chunk_size_tokens": 64, "chunk_overlap_tokens": 40}, 422, "invalid_chunk_overlap"),
    ({"name": "x", "language": "klingon"}, 422, "invalid_language"),
])
def test_bad_collection_settings_are_rejected(world: World, api_a: Client, body: dict[str, Any], status: int,
                                              code: str) -> None:
    response = api_a.post("/api/v1/knowledge/collections", body, content_type="application/json")
    assert response.status_code == status and response.json()["error"]["code"] == code


def test_a_duplicate_collection_name_conflicts(world: World, api_a: Client) -> None:
    _collection(api_a)
    response = api_a.post("/api/v1/knowledge/collections", {"name": "POLICIES"}, content_type="application/json")
    assert response.status_code == 409


def test_upload_returns_created_and_duplicates(world: World, api_a: Client) -> None:
    collection = _collection(api_a)
    first = _upload(api_a, collection["id"], ("a.md", b"# A\n\nAlpha."), ("b.txt", b"Beta."))
    assert first.status_code == 201
    assert [d["status"] for d in first.json()["created"]] == ["pending", "pending"]
    again = _upload(api_a, collection["id"], ("a-copy.md", b"# A\n\nAlpha."))
    assert again.status_code == 200
    assert again.json()["duplicates"][0]["id"] == first.json()["created"][0]["id"]


def test_a_rejected_file_stores_none_of_the_upload(world: World, api_a: Client) -> None:
    collection = _collection(api_a)
    response = _upload(api_a, collection["id"], ("good.md", b"# Good\n\nText."), ("bad.pdf", b"not a pdf"))
    assert response.status_code == 415
    body = response.json()["error"]
    assert body["code"] == "extension_mismatch" and "bad.pdf" in body["message"]
    with schema_context(world.tenant_a.schema_name):
        assert not Document.objects.exists()


def test_jsonl_line_errors_are_reported_with_line_numbers(world: World, api_a: Client) -> None:
    collection = _collection(api_a)
    data = b'{"_id": "1", "text": "one"}\nnot json\n{"_id": "3", "text": "three"}\n'
    response = _upload(api_a, collection["id"], ("r.jsonl", data))
    assert response.status_code == 201
    assert len(response.json()["created"]) == 2
    errors = response.json()["line_errors"]
    assert [(e["file"], e["line"]) for e in errors] == [("r.jsonl", 2)] and "not valid JSON" in errors[0]["error"]


def test_an_upload_past_the_limit_gets_413_before_it_is_read(world: World, api_a: Client, settings: Any) -> None:
    settings.KB_MAX_UPLOAD_MB = 1
    collection = _collection(api_a)
    response = _upload(api_a, collection["id"], ("big.txt", b"x " * 700_000))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_an_empty_upload_gets_422(world: World, api_a: Client) -> None:
    collection = _collection(api_a)
    assert _upload(api_a, collection["id"], ("empty.txt", b"")).status_code == 422
    response = api_a.post(f"/api/v1/knowledge/collections/{collection['id']}/documents", {})
    assert response.status_code == 422


def test_document_status_chunks_reindex_and_delete(world: World, api_a: Client) -> None:
    collection = _collection(api_a)
    created = _upload(api_a, collection["id"], ("h.md", b"# Handbook\n\n## Leave\n\nTwenty days."))
    document_id = created.json()["created"][0]["id"]
    with schema_context(world.tenant_a.schema_name):
        ingest_documents([document_id])
    detail = api_a.get(f"/api/v1/knowledge/documents/{document_id}").json()
    assert detail["status"] == "indexed" and detail["progress"] == 100 and detail["chunk_count"] == 1
    chunks = api_a.get(f"/api/v1/knowledge/documents/{document_id}/chunks").json()["items"]
    assert chunks[0]["heading_path"] == ["Handbook", "Leave"] and chunks[0]["token_count"] > 0
    reindex = api_a.post(f"/api/v1/knowledge/documents/{document_id}/reindex")
    assert reindex.status_code == 202 and reindex.json()["status"] == "pending"
    assert api_a.delete(f"/api/v1/knowledge/documents/{document_id}").status_code == 204
    assert api_a.get(f"/api/v1/knowledge/documents/{document_id}").status_code == 404


def test_search_returns_cited_chunks(world: World, api_a: Client) -> None:
    collection = _indexed_collection_in(world, "tenant_a", SECRET_TEXT)
    response = api_a.post("/api/v1/knowledge/search", {"query": "launch code", "collection_ids": [collection.pk]},
                          content_type="application/json")
    assert response.status_code == 200, response.content
    hit = response.json()["results"][0]
    assert "PELICAN-SEVEN" in hit["text"]
    assert {"document_id", "external_id", "title", "page_number", "heading_path", "score", "vector_score",
            "keyword_score"} <= hit.keys()
    assert response.json()["timings_ms"]["total_ms"] > 0


def test_search_collapses_on_the_document_when_asked(world: World, api_a: Client) -> None:
    with schema_context(world.tenant_a.schema_name):
        principal = Principal.system("t", tenant=world.tenant_a)
        collection = collection_create(principal=principal, name="Rules", chunk_size_tokens=32,
                                       chunk_overlap_tokens=0)
        long_rules = "\n\n".join(f"Launch rule {n}: the launch code opens the launch bay doors." for n in range(8))
        for name, text in (("rules.txt", long_rules), ("secret.txt", SECRET_TEXT)):
            result = document_upload(principal=principal, collection=collection, filename=name, data=text.encode(),
                                     queue=False)
            ingest_documents([d.pk for d in result.created])

    def search(**extra: Any) -> Any:
        return api_a.post("/api/v1/knowledge/search", {"query": "launch code", "collection_ids": [collection.pk],
                                                       "top_k": 4, **extra}, content_type="application/json")

    chunks = [h["document_id"] for h in search().json()["results"]]
    assert len(chunks) == 4 and len(set(chunks)) < 4
    documents = search(max_chunks_per_document=1)
    assert documents.status_code == 200, documents.content
    assert len({h["document_id"] for h in documents.json()["results"]}) == len(documents.json()["results"]) == 2
    bad = search(max_chunks_per_document=0)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_max_chunks_per_document"


def test_searching_an_unknown_collection_is_not_found(world: World, api_a: Client) -> None:
    response = api_a.post("/api/v1/knowledge/search", {"query": "x", "collection_ids": [999999]},
                          content_type="application/json")
    assert response.status_code == 404 and response.json()["error"]["details"] == {"collection_ids": [999999]}


def test_tenant_b_cannot_reach_tenant_a_knowledge(world: World) -> None:
    a = _indexed_collection_in(world, "tenant_a", SECRET_TEXT)
    b = _indexed_collection_in(world, "tenant_b", "Globex keeps its own notes about parking.")
    with schema_context(world.tenant_a.schema_name):
        a_document = Document.objects.get(collection=a)
    b_on_a = api_client(HOST_A, world.key_b)
    for method, path in (("get", "/api/v1/knowledge/collections"), ("get", f"/api/v1/knowledge/collections/{a.pk}"),
                         ("get", f"/api/v1/knowledge/documents/{a_document.pk}"),
                         ("delete", f"/api/v1/knowledge/documents/{a_document.pk}")):
        assert getattr(b_on_a, method)(path).status_code == 401, path
    b_home = api_client(HOST_B, world.key_b)
    # On its own host B sees only its own rows: A's ids name nothing there (or B's own rows).
    listed = b_home.get("/api/v1/knowledge/collections").json()["items"]
    assert [c["name"] for c in listed] == ["secrets of globex"]
    for collection_id in {a.pk, b.pk}:
        response = b_home.post("/api/v1/knowledge/search", {"query": "launch code PELICAN",
                                                             "collection_ids": [collection_id], "mode": "keyword"},
                               content_type="application/json")
        results = response.json().get("results", [])
        assert not any("PELICAN" in hit["text"] for hit in results)
    if a_document.pk != b.pk:
        assert b_home.delete(f"/api/v1/knowledge/documents/{a_document.pk}").status_code in (204, 404)
    with schema_context(world.tenant_a.schema_name):
        assert Chunk.objects.filter(document=a_document).exists()


def test_permissions_for_reading_and_writing(world: World) -> None:
    viewer = host_client(HOST_A, world.user("viewer"))
    assert viewer.get("/api/v1/knowledge/collections").status_code == 200
    refused = viewer.post("/api/v1/knowledge/collections", {"name": "x"}, content_type="application/json")
    assert refused.status_code == 403
    operator = host_client(HOST_A, world.user("operator"))
    assert _collection(operator)["name"] == "Policies"


def test_list_endpoints_do_not_grow_their_query_count(world: World, api_a: Client,
                                                      django_assert_max_num_queries: Any) -> None:
    collection = _collection(api_a)
    _upload(api_a, collection["id"], ("1.txt", b"one"))
    with django_assert_max_num_queries(14) as few:
        api_a.get(f"/api/v1/knowledge/collections/{collection['id']}/documents")
    documents_baseline = len(few.captured_queries)  # read now: each request clears Django's query log
    with django_assert_max_num_queries(14) as few:
        api_a.get("/api/v1/knowledge/collections")
    collections_baseline = len(few.captured_queries)
    for n in range(2, 15):
        _upload(api_a, collection["id"], (f"{n}.txt", f"document {n}".encode()))
        _collection(api_a, name=f"c{n}")
    with django_assert_max_num_queries(documents_baseline):
        assert len(api_a.get(f"/api/v1/knowledge/collections/{collection['id']}/documents").json()["items"]) == 14
    with django_assert_max_num_queries(collections_baseline):
        assert len(api_a.get("/api/v1/knowledge/collections").json()["items"]) == 14


def test_a_write_only_key_is_refused_before_a_collection_is_created(world: World) -> None:
    """The answer is the collection read back, which needs ``kb:read``: the refusal must come
    before the write (it used to come after it, leaving a 403 and a new collection)."""
    key = api_key_create(principal=Principal.system("tests", tenant=world.tenant_a), tenant=world.tenant_a,
                         name="kb writer", scopes=["kb:write"]).secret
    connection.set_schema_to_public()
    response = api_client(HOST_A, key).post("/api/v1/knowledge/collections", {"name": "Ghost"},
                                            content_type="application/json")
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    with schema_context(world.tenant_a.schema_name):
        assert not Collection.objects.filter(name="Ghost").exists()
