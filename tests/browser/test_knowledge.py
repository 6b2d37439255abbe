"""The knowledge base in a real browser: upload, watch indexing, read chunks, search."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Portal, sign_in
from tests.live import LIVE_KB_MAX_UPLOAD_MB

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
pytestmark = [pytest.mark.browser, pytest.mark.django_db]


@pytest.fixture
def corpus() -> Path:
    if not CORPUS.exists():
        pytest.skip(f"the shared corpus is not at {CORPUS}")
    return CORPUS


def test_upload_pdfs_and_a_docx_watch_them_index_and_search(portal: Portal, ingest_worker: Path, page: Any,
                                                            corpus: Path) -> None:
    sign_in(page, portal, "owner@acme.test")
    page.goto(portal.url(path="/kb/"))
    name = f"Library {uuid.uuid4().hex[:6]}"
    page.locator("input[name=name]").fill(name)
    with page.expect_navigation():
        page.get_by_role("button", name="Create collection").click()
    assert page.locator("h1").inner_text() == name

    page.locator("input[name=files]").set_input_files([
        str(corpus / "pdf" / "pdflatex-outline.pdf"),
        str(corpus / "pdf" / "multicolumn.pdf"),
        str(corpus / "pdf" / "libreoffice-writer-password.pdf"),
        str(corpus / "docx" / "par-known-paragraphs.docx"),
    ])
    with page.expect_navigation():
        page.get_by_role("button", name="Upload", exact=True).click()
    assert "4 document(s) queued for indexing" in page.content()
    page.evaluate("window.__notReloaded = true")
    table = page.locator("[data-testid=document-table]")
    # htmx polls the table while anything is pending; wait for every row to settle.
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=progress]') "
        "&& document.querySelectorAll('[data-testid=document-table] tbody tr').length === 4",
        timeout=180_000,
    )
    assert page.evaluate("window.__notReloaded") is True, "statuses updated in place"
    text = table.inner_text()
    assert text.count("indexed") == 3 and "failed" in text and "password-protected" in text
    chunk_cells = table.locator("tbody tr td:nth-child(5)").all_inner_texts()
    summary = page.locator("[data-testid=collection-summary]").inner_text()
    assert f"4 documents · {sum(int(c) for c in chunk_cells)} chunks" in summary, "the summary follows the polls"

    with page.expect_navigation():
        page.get_by_role("link", name="pdflatex-outline").click()
    chunks = page.locator("[data-testid=chunk-table]").inner_text()
    assert "Foo" in chunks and "Bar" in chunks
    assert page.locator("[data-testid=chunk-table] tbody tr").count() >= 4

    page.goto(portal.url(path="/kb/search/?query=Lorem+ipsum+two+columns"))
    results = page.locator("[data-testid=search-results]")
    results.wait_for()
    assert "multicolumn" in results.inner_text()
    assert "Fused" in results.inner_text()


def _collection_page(page: Any, portal: Portal) -> str:
    sign_in(page, portal, "owner@acme.test")
    page.goto(portal.url(path="/kb/"))
    page.locator("input[name=name]").fill(f"Limits {uuid.uuid4().hex[:6]}")
    with page.expect_navigation():
        page.get_by_role("button", name="Create collection").click()
    return str(page.url)


def _file(name: str, megabytes: float) -> dict[str, Any]:
    return {"name": name, "mimeType": "text/plain", "buffer": b"word " * int(megabytes * 1048576 / 5)}


def test_a_selection_past_the_upload_limit_is_stopped_in_the_page(portal: Portal, page: Any) -> None:
    url = _collection_page(page, portal)
    assert f"up to {LIVE_KB_MAX_UPLOAD_MB} MB per upload" in page.content()
    page.evaluate("window.__notReloaded = true")
    page.locator("input[name=files]").set_input_files([_file("small.txt", 0.5), _file("huge.txt", 4.5)])
    page.get_by_role("button", name="Upload", exact=True).click()
    alert = page.locator("[data-upload-error]")
    alert.wait_for(state="visible")
    assert "huge.txt (4.5 MB) is larger than the 4.0 MB limit" in alert.inner_text()
    assert page.evaluate("window.__notReloaded") is True and page.url == url, "nothing was sent"

    page.locator("input[name=files]").set_input_files([_file(f"part{i}.txt", 1.5) for i in range(3)])
    assert alert.is_hidden(), "a new selection clears the old reason"
    page.get_by_role("button", name="Upload", exact=True).click()
    alert.wait_for(state="visible")
    assert "These 3 files total 4.5 MB" in alert.inner_text()
    assert "No documents" in page.locator("[data-testid=document-table]").inner_text()


def test_without_javascript_an_upload_past_the_limit_returns_to_the_page_with_the_reason(
        portal: Portal, new_page: Any) -> None:
    page = new_page(java_script_enabled=False)
    url = _collection_page(page, portal)
    page.locator("input[name=files]").set_input_files([_file("huge.txt", 4.5)])
    with page.expect_navigation():
        page.get_by_role("button", name="Upload", exact=True).click()
    assert page.url == url
    reason = page.locator(".alert-danger:not([data-upload-error])").inner_text()
    assert f"one upload takes at most {LIVE_KB_MAX_UPLOAD_MB} MB" in reason
    assert "No documents" in page.locator("[data-testid=document-table]").inner_text()
