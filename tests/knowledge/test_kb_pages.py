"""Console pages of the knowledge base."""

from __future__ import annotations

import re
from typing import Any

from django.core.files.uploadedfile import SimpleUploadedFile
from django_tenants.utils import schema_context

from knowledge.ingestion import ingest_documents
from knowledge.models import Collection, Document
from knowledge.services import collection_create
from tenants.principal import Principal
from tests.conftest import HOST_A, World, host_client


def _collection(world: World) -> Collection:
    with schema_context(world.tenant_a.schema_name):
        return collection_create(principal=Principal.system("t", tenant=world.tenant_a), name="Handbook")


def test_an_operator_creates_a_collection_and_uploads_several_files(world: World) -> None:
    client = host_client(HOST_A, world.user("operator"))
    created = client.post("/kb/", {"name": "Policies", "chunk_size_tokens": "200", "chunk_overlap_tokens": "32",
                                   "language": "english"})
    assert created.status_code == 302
    with schema_context(world.tenant_a.schema_name):
        collection = Collection.objects.get(name="Policies")
    response = client.post(f"/kb/collections/{collection.pk}/upload/", {"files": [
        SimpleUploadedFile("a.md", b"# A\n\nAlpha policy."),
        SimpleUploadedFile("b.txt", b"Beta policy."),
        SimpleUploadedFile("c.exe", b"MZ\x00\x00binary"),
    ]}, follow=True)
    html = response.content.decode()
    assert "2 document(s) queued for indexing" in html
    assert "c.exe" in html and "not supported" in html
    with schema_context(world.tenant_a.schema_name):
        assert sorted(Document.objects.values_list("original_filename", flat=True)) == ["a.md", "b.txt"]


def test_the_document_table_polls_only_while_indexing(world: World) -> None:
    collection = _collection(world)
    client = host_client(HOST_A, world.user("owner"))
    client.post(f"/kb/collections/{collection.pk}/upload/", {"files": [SimpleUploadedFile("a.md", b"# A\n\nText.")]})
    pending = client.get(f"/kb/collections/{collection.pk}/", HTTP_HX_REQUEST="true")
    assert b'hx-trigger="every 2s"' in pending.content and b'role="progressbar"' in pending.content
    assert b"<html" not in pending.content
    with schema_context(world.tenant_a.schema_name):
        ingest_documents(list(Document.objects.values_list("pk", flat=True)))
    done = client.get(f"/kb/collections/{collection.pk}/", HTTP_HX_REQUEST="true")
    assert b"every 2s" not in done.content and b"indexed" in done.content


def test_the_polled_table_refreshes_the_collection_summary_out_of_band(world: World) -> None:
    """The chunk count above the table is outside the polled fragment; each poll sends it again
    with ``hx-swap-oob`` so it does not stay at its value from before indexing."""
    collection = _collection(world)
    client = host_client(HOST_A, world.user("owner"))
    client.post(f"/kb/collections/{collection.pk}/upload/", {"files": [SimpleUploadedFile("a.md", b"# A\n\nText.")]})
    page = client.get(f"/kb/collections/{collection.pk}/").content.decode()
    summary = re.search(r'<p[^>]*id="collection-summary"[^>]*>(.*?)</p>', page, re.S)
    assert summary and "hx-swap-oob" not in summary.group(0)
    assert "1 document · 0 chunks" in summary.group(1) and not summary.group(1).strip().startswith("·")
    with schema_context(world.tenant_a.schema_name):
        ingest_documents(list(Document.objects.values_list("pk", flat=True)))
    done = client.get(f"/kb/collections/{collection.pk}/", HTTP_HX_REQUEST="true").content.decode()
    oob = re.search(r'<p[^>]*id="collection-summary"[^>]*hx-swap-oob="true"[^>]*>(.*?)</p>', done, re.S)
    assert oob and "1 document · 1 chunk" in oob.group(1)


def test_document_detail_shows_chunks_with_pages_and_headings(world: World) -> None:
    collection = _collection(world)
    client = host_client(HOST_A, world.user("owner"))
    client.post(f"/kb/collections/{collection.pk}/upload/",
                {"files": [SimpleUploadedFile("h.md", b"# Handbook\n\n## Leave\n\nTwenty-five days a year.")]})
    with schema_context(world.tenant_a.schema_name):
        document = Document.objects.get()
        ingest_documents([document.pk])
    html = client.get(f"/kb/documents/{document.pk}/").content.decode()
    assert "Handbook › Leave" in html and "Twenty-five days a year." in html
    assert 'data-testid="chunk-table"' in html


def test_a_failed_document_shows_its_reason(world: World) -> None:
    collection = _collection(world)
    client = host_client(HOST_A, world.user("owner"))
    client.post(f"/kb/collections/{collection.pk}/upload/", {"files": [SimpleUploadedFile("t.html", b"<")]})
    with schema_context(world.tenant_a.schema_name):
        document = Document.objects.get()
        ingest_documents([document.pk])
    html = client.get(f"/kb/documents/{document.pk}/").content.decode()
    assert 'data-testid="error-message"' in html and "no text" in html


def test_the_playground_shows_vector_keyword_and_fused_scores(world: World) -> None:
    collection = _collection(world)
    client = host_client(HOST_A, world.user("viewer"))
    owner = host_client(HOST_A, world.user("owner"))
    owner.post(f"/kb/collections/{collection.pk}/upload/",
               {"files": [SimpleUploadedFile("h.md", b"# Leave\n\nTwenty-five days of paid vacation.")]})
    with schema_context(world.tenant_a.schema_name):
        ingest_documents(list(Document.objects.values_list("pk", flat=True)))
    html = client.get("/kb/search/", {"query": "vacation days", "collections": [collection.pk]}).content.decode()
    assert "Twenty-five days of paid vacation." in html
    assert "Fused" in html and "Vector (rank)" in html and "Keyword (rank)" in html
    assert 'name="max_chunks_per_document"' in html
    collapsed = client.get("/kb/search/", {"query": "vacation days", "collections": [collection.pk],
                                           "max_chunks_per_document": "1"}).content.decode()
    assert "Twenty-five days of paid vacation." in collapsed and '<option value="1" selected>' in collapsed
    bad = client.get("/kb/search/", {"query": "vacation", "max_chunks_per_document": "0"}).content.decode()
    assert "Select a valid choice" in bad
    fragment = client.get("/kb/search/", {"query": "vacation"}, HTTP_HX_REQUEST="true")
    assert b"<html" not in fragment.content and b"Twenty-five" in fragment.content


def test_search_this_collection_opens_the_form_with_the_collection_chosen_and_no_errors(world: World) -> None:
    collection = _collection(world)
    client = host_client(HOST_A, world.user("viewer"))
    detail = client.get(f"/kb/collections/{collection.pk}/").content.decode()
    link = re.search(r'href="(/kb/search/[^"]*)"[^>]*>Search this collection', detail)
    assert link is not None
    html = client.get(link.group(1).replace("&amp;", "&")).content.decode()
    assert "This field is required" not in html
    assert re.search(rf'value="{collection.pk}"[^>]*checked|checked[^>]*value="{collection.pk}"'
                     rf'|<option value="{collection.pk}" selected', html)
    # Sending the form with no query still says what is missing.
    assert "This field is required" in client.get("/kb/search/", {"query": ""}).content.decode()


def test_a_viewer_reads_but_cannot_upload_or_delete(world: World) -> None:
    collection = _collection(world)
    viewer = host_client(HOST_A, world.user("viewer"))
    page = viewer.get(f"/kb/collections/{collection.pk}/")
    assert page.status_code == 200 and b'name="files"' not in page.content
    assert viewer.post(f"/kb/collections/{collection.pk}/upload/",
                       {"files": [SimpleUploadedFile("a.md", b"# A")]}).status_code == 403
    assert viewer.post(f"/kb/collections/{collection.pk}/delete/", {"confirm": "Handbook"}).status_code == 403


def test_deleting_a_collection_needs_its_name(world: World) -> None:
    collection = _collection(world)
    client = host_client(HOST_A, world.user("owner"))
    client.post(f"/kb/collections/{collection.pk}/delete/", {"confirm": "wrong"})
    with schema_context(world.tenant_a.schema_name):
        assert Collection.objects.filter(pk=collection.pk).exists()
    client.post(f"/kb/collections/{collection.pk}/delete/", {"confirm": "Handbook"})
    with schema_context(world.tenant_a.schema_name):
        assert not Collection.objects.filter(pk=collection.pk).exists()


def test_knowledge_pages_keep_their_query_counts(world: World, django_assert_max_num_queries: Any) -> None:
    collection = _collection(world)
    client = host_client(HOST_A, world.user("owner"))
    client.post(f"/kb/collections/{collection.pk}/upload/", {"files": [SimpleUploadedFile("first.txt", b"one")]})
    with django_assert_max_num_queries(16) as few:
        client.get(f"/kb/collections/{collection.pk}/")
    baseline = len(few.captured_queries)  # read now: each request clears Django's query log
    for n in range(20):
        client.post(f"/kb/collections/{collection.pk}/upload/",
                    {"files": [SimpleUploadedFile(f"{n}.txt", f"text {n}".encode())]})
    with django_assert_max_num_queries(baseline):
        assert client.get(f"/kb/collections/{collection.pk}/").status_code == 200
    with django_assert_max_num_queries(16):
        assert client.get("/kb/").status_code == 200
