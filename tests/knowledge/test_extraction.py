"""Text extraction from real files, and every bad input the issue names."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from knowledge.extraction import ExtractionError, UnsupportedFile, detect_kind, extract
from tests.knowledge.conftest import (
    docx_bomb,
    docx_bytes,
    docx_with_entries,
    lying_zip,
    pdf_with_stream,
    peak_mb,
    truncated,
)


def _extract(path: Path):  # type: ignore[no-untyped-def]
    data = path.read_bytes()
    return extract(detect_kind(path.name, data), data)


def test_a_pdf_keeps_its_pages(corpus: Path) -> None:
    result = _extract(corpus / "pdf" / "pdflatex-4-pages.pdf")
    assert result.page_count == 4
    assert result.page_at(0) == 1
    assert result.page_at(len(result.text) - 1) == 4
    assert "text without a meaning" in result.text


def test_a_pdf_outline_becomes_the_heading_path(corpus: Path) -> None:
    result = _extract(corpus / "pdf" / "pdflatex-outline.pdf")
    headings = [s.heading_path for s in result.sections if s.heading_path]
    assert ("Foo",) in headings and ("Bar",) in headings and ("Baz",) in headings
    foo = next(s for s in result.sections if s.heading_path == ("Foo",))
    assert result.text[foo.start:foo.end].startswith("Foo")


def test_a_long_german_pdf_with_nested_outline(corpus: Path) -> None:
    result = _extract(corpus / "pdf" / "GeoTopo-komprimiert.pdf")
    assert result.page_count == 117
    assert len(result.text) > 100_000
    assert any(len(s.heading_path) >= 2 for s in result.sections)
    assert "Topologische" in result.text


def test_a_password_protected_pdf_fails_clearly(corpus: Path) -> None:
    with pytest.raises(ExtractionError) as excinfo:
        _extract(corpus / "pdf" / "libreoffice-writer-password.pdf")
    assert excinfo.value.code == "encrypted_pdf"
    assert "password" in excinfo.value.message


def test_a_pdf_with_broken_cross_references_is_repaired(corpus: Path) -> None:
    result = _extract(corpus / "pdf" / "unreadablemetadata.pdf")
    assert "Potentiometer" in result.text
    assert any("damaged" in w for w in result.warnings)


def test_an_image_only_pdf_fails_with_no_text_layer(corpus: Path) -> None:
    with pytest.raises(ExtractionError) as excinfo:
        _extract(corpus / "pdf" / "imagemagick-images.pdf")
    assert excinfo.value.code == "no_text"
    assert "OCR" in excinfo.value.message


def test_an_arabic_pdf_yields_arabic_letters(corpus: Path) -> None:
    result = _extract(corpus / "pdf" / "habibi.pdf")
    assert any("\u0600" <= ch <= "\u06ff" for ch in result.text)
    assert "habibi" in result.text


def test_a_two_column_pdf_keeps_each_column_readable(corpus: Path) -> None:
    result = _extract(corpus / "pdf" / "multicolumn.pdf")
    assert result.page_count == 3
    # Sentences run on within a column instead of alternating between the two.
    assert "Two-Column Document with Lorem Ipsum" in result.text
    assert "filled with Lorem Ipsum text" in result.text.replace("\n", " ")


def test_a_docx_heading_becomes_the_heading_path(corpus: Path) -> None:
    result = _extract(corpus / "docx" / "par-known-paragraphs.docx")
    assert result.page_count is None
    assert any(s.heading_path for s in result.sections)


def test_docx_tables_are_read_row_by_row() -> None:
    import docx

    document = docx.Document()
    document.add_heading("Prices", level=1)
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Plan", "Price"
    table.cell(1, 0).text, table.cell(1, 1).text = "Team", "99 USD"
    import io

    buffer = io.BytesIO()
    document.save(buffer)
    result = extract("docx", buffer.getvalue())
    assert "Plan | Price" in result.text and "Team | 99 USD" in result.text
    assert result.sections[-1].heading_path == ("Prices",)


def test_a_docx_of_only_images_fails_with_no_text(corpus: Path) -> None:
    with pytest.raises(ExtractionError) as excinfo:
        _extract(corpus / "docx" / "having-images.docx")
    assert excinfo.value.code == "no_text"


def test_a_truncated_docx_fails_as_damaged(corpus: Path) -> None:
    data = truncated((corpus / "docx" / "test.docx").read_bytes())
    assert detect_kind("test.docx", data) == "docx"
    with pytest.raises(ExtractionError) as excinfo:
        extract("docx", data)
    assert excinfo.value.code == "damaged_file"
    assert "truncated" in excinfo.value.message


def test_a_one_byte_html_file_fails_with_no_text() -> None:
    assert detect_kind("page.html", b"<") == "html"
    with pytest.raises(ExtractionError) as excinfo:
        extract("html", b"<")
    assert excinfo.value.code == "no_text"


def test_html_headings_scripts_and_tables() -> None:
    html = (b"<html><head><title>Policies</title><script>var secret = 1;</script></head><body>"
            b"<h1>Travel</h1><p>Book economy.</p><h2>Meals</h2><p>Up to <b>40</b> EUR a day.</p>"
            b"<table><tr><td>City</td><td>Limit</td></tr></table></body></html>")
    result = extract("html", html)
    assert result.title == "Policies"
    assert "secret" not in result.text
    assert ("Travel", "Meals") in [s.heading_path for s in result.sections]
    assert "Up to 40 EUR a day." in result.text and "City | Limit" in result.text


def test_markdown_headings_nest_and_code_is_kept() -> None:
    md = b"# Handbook\n\nIntro.\n\n## Leave\n\nTwenty days.\n\n```\nkeep = True\n```\n\n# Other\n\nEnd."
    result = extract("markdown", md)
    paths = [s.heading_path for s in result.sections]
    assert ("Handbook", "Leave") in paths and ("Other",) in paths
    assert "keep = True" in result.text and "#" not in result.text


def test_text_in_a_legacy_encoding_is_decoded() -> None:
    result = extract("text", "Überstunden werden vergütet, übrigens auch am Sonntag.".encode("latin-1"))
    assert "Überstunden" in result.text


@pytest.mark.parametrize(("name", "data", "code"), [
    ("report.docx", b"%PDF-1.4\n...", "extension_mismatch"),
    ("scan.pdf", b"just some text pretending to be a PDF", "extension_mismatch"),
    ("photo.png", b"\x89PNG\r\n\x1a\n\x00\x00", "unsupported_media_type"),
    ("old.doc", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "unsupported_media_type"),
    ("blob.bin", b"\x00\x01\x02\x03" * 100, "unsupported_media_type"),
])
def test_unsupported_or_lying_files_are_refused(name: str, data: bytes, code: str) -> None:
    with pytest.raises(UnsupportedFile) as excinfo:
        detect_kind(name, data)
    assert excinfo.value.code == code
    assert name in excinfo.value.message


def test_content_decides_when_the_name_says_nothing(corpus: Path) -> None:
    assert detect_kind("download", (corpus / "pdf" / "minimal-document.pdf").read_bytes()) == "pdf"
    assert detect_kind("download", docx_bytes([("Normal", "x")])) == "docx"
    assert detect_kind("notes", b'{"_id": "1", "text": "a"}\n') == "jsonl"
    assert detect_kind("notes", b"<!doctype html><p>x</p>") == "html"


@pytest.mark.parametrize(("name", "message"), [
    ("setup.exe", "setup.exe is a program, which is not supported. Upload PDF, DOCX, HTML, Markdown, plain text "
                  "or JSONL."),
    ("memo.doc", "memo.doc is a legacy Word document, which is not supported. Save it as .docx."),
    ("photos.zip", "photos.zip is a ZIP archive, which is not supported. Upload the files inside it."),
])
def test_a_known_unsupported_format_is_named_with_what_to_do(name: str, message: str) -> None:
    with pytest.raises(UnsupportedFile) as excinfo:
        detect_kind(name, b"\x01\x02 not a document")
    assert excinfo.value.message == message


# --- Files that would exhaust the worker (decompression bombs, huge markup) -------------------
# Each is refused (or read) while Python's allocations stay far below what the file expands to.

def _refused(result: object, message: str) -> ExtractionError:
    assert isinstance(result, ExtractionError), result
    assert result.code == "too_large" and message in result.message, result.message
    assert "decompression bomb" in result.message
    return result


def test_a_docx_zip_bomb_is_refused_without_inflating_it() -> None:
    bomb = docx_bomb(300)  # document.xml: 300 MB of empty paragraphs in a file of about 300 KB
    assert detect_kind("bomb.docx", bomb) == "docx"
    result, peak = peak_mb(lambda: extract("docx", bomb))
    _refused(result, "unpacks to more than 100 times its packed size")
    assert peak < 10


def test_a_docx_is_refused_past_the_total_size_whatever_its_ratio(settings: Any) -> None:
    settings.KB_EXTRACT_MAX_RATIO = 100_000
    bomb = docx_bomb(150, paragraph=b"<w:p><w:r><w:t>" + b"a" * 2000 + b"</w:t></w:r></w:p>")
    result, peak = peak_mb(lambda: extract("docx", bomb))
    _refused(result, "unpacks to more than 100 MB")
    assert peak < 10


def test_a_zip_whose_headers_understate_the_size_is_not_inflated_whole(settings: Any) -> None:
    settings.KB_EXTRACT_MAX_RATIO = 100_000
    # zipfile trusts the stated size only after inflating what it read in one call.
    liar = lying_zip(docx_bomb(150, paragraph=b"<w:p><w:r><w:t>" + b"a" * 2000 + b"</w:t></w:r></w:p>"))
    assert zipfile.ZipFile(io.BytesIO(liar)).getinfo("word/document.xml").file_size == 1000
    result, peak = peak_mb(lambda: extract("docx", liar))
    assert isinstance(result, ExtractionError) and result.code == "damaged_file"
    assert peak < 10


def test_a_zip_with_too_many_entries_is_refused_before_it_is_listed(settings: Any) -> None:
    many = docx_with_entries(3000)
    assert detect_kind("many.docx", many) == "docx"  # the document row says why, not a 415
    result, peak = peak_mb(lambda: extract("docx", many))
    _refused(result, "has more than 1000 entries")
    settings.KB_EXTRACT_MAX_ENTRIES = 5000
    assert "Many parts" in extract("docx", many).text


def test_a_pdf_with_a_huge_flate_stream_is_refused_within_bounded_memory() -> None:
    bomb = pdf_with_stream(b"Hello", filler=b"0 0 m\n", repeat=40_000_000)  # 240 MB in 230 KB
    result, peak = peak_mb(lambda: extract("pdf", bomb))
    _refused(result, "has a stream that decompresses to more than 20 MB")
    assert peak < 60


def test_a_pdf_whose_streams_together_are_too_large_is_refused_by_page(settings: Any) -> None:
    settings.KB_EXTRACT_MAX_UNCOMPRESSED_MB = 30
    many = pdf_with_stream(b"Hello", filler=b"% a comment line\n", repeat=500_000, pages=8)  # 8 MB a page
    result, peak = peak_mb(lambda: extract("pdf", many))
    _refused(result, "decompresses to more than 30 MB by page 4")
    assert peak < 60


def test_a_damaged_pdf_bomb_is_refused_before_pdfminer_inflates_it() -> None:
    bomb = pdf_with_stream(b"Hello", filler=b"0 0 m\n", repeat=40_000_000)
    broken = bomb.replace(b"xref", b"xref_broken").replace(b"/Type /Catalog", b"/Type /Catalogue")
    result, peak = peak_mb(lambda: extract("pdf", broken))
    _refused(result, "decompresses to more than 20 MB")
    assert peak < 60


def test_a_normal_pdf_still_reads_under_the_limits() -> None:
    assert "Hello" in extract("pdf", pdf_with_stream(b"Hello there", filler=b"0 0 m\n", repeat=100_000)).text


def test_a_pdf_with_a_large_uncompressed_image_still_reads() -> None:
    """Raw bytes are no bomb: a stream's declared length past the decoded-stream limit is fine."""
    with override_settings(KB_EXTRACT_MAX_PDF_STREAM_MB=2):
        text = extract("pdf", pdf_with_stream(b"Hello image. " * 40, image_mb=3)).text
    assert "Hello image" in text


def test_html_past_its_size_limit_is_refused_before_parsing(settings: Any) -> None:
    settings.KB_EXTRACT_MAX_HTML_MB = 1
    html = b"<p>word</p>" * 200_000
    result, peak = peak_mb(lambda: extract("html", html))
    _refused(result, "is 2.1 MB (the limit for HTML is 1 MB)")
    assert peak < 1


@pytest.mark.parametrize(("html", "expected"), [
    (b"<p>a" * 200_000, "a\n\na"),  # 800 KB of paragraphs: a document tree would take hundreds of MB
    (b"<div>" * 100_000 + b"deep text" + b"</div>" * 100_000, "deep text"),  # nesting a tree recurses into
    # Entities an internal subset declares are not expanded (HTML has none; only &amp; and the like).
    (b"<!DOCTYPE x [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;'>]><p>&b;&b;&amp;</p>" * 1000, "&b;&b;&"),
])
def test_dense_or_deep_html_is_read_in_memory_bounded_by_its_size(html: bytes, expected: str) -> None:
    result, peak = peak_mb(lambda: extract("html", html))
    assert not isinstance(result, Exception), result
    assert expected in result.text
    assert peak < 12 * len(html) / (1024 * 1024) + 5


def test_a_markdown_of_many_tiny_blocks_is_parsed_in_slices() -> None:
    # The fence's blank line falls just past the first 64 KiB slice, where a cut would split it.
    markdown = b"# Title\n\n" + b"word\n\n" * 10_921 + b"```\nfenced\n\ncode\n```\n\nend\n"
    result, peak = peak_mb(lambda: extract("markdown", markdown))
    assert not isinstance(result, Exception), result
    assert "fenced\ncode" in result.text  # one code block: the fence was not cut at its blank line
    assert peak < 60
