"""The knowledge base in a real browser: upload, watch indexing, read chunks, search."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Portal, sign_in

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
