"""PDF with pypdf: text per page; the outline (bookmarks) gives the heading path.

Outline entries point at pages; an entry's title is looked up in its page's text so the
section starts where the heading is printed, not merely at the top of the page.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import structlog

from knowledge.extraction.base import ExtractedText, ExtractionError, TextBuilder, clean

logger = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _OutlineEntry:
    level: int
    title: str
    page: int  # 0-based


def _flatten_outline(reader: Any, items: Any, level: int = 1) -> list[_OutlineEntry]:
    entries: list[_OutlineEntry] = []
    for item in items or []:
        if isinstance(item, list):
            entries.extend(_flatten_outline(reader, item, level + 1))
            continue
        try:
            page = reader.get_destination_page_number(item)
        except Exception:  # noqa: BLE001, S112 - a broken bookmark only loses that heading
            continue
        title = " ".join(str(getattr(item, "title", "") or "").split())
        if title and page is not None and page >= 0:
            entries.append(_OutlineEntry(level, title, page))
    return entries


def _find_heading(page_text: str, title: str, start: int) -> int:
    """Where ``title`` is printed in ``page_text`` (whitespace-insensitive), or -1."""
    words = [re.escape(w) for w in title.split()[:12]]
    if not words:
        return -1
    match = re.compile(r"\s+".join(words), re.IGNORECASE).search(page_text, start)
    return match.start() if match else -1


# A PDF with fewer letters and digits than this per page, on average, and images on its pages
# is a scan: its few characters are labels or stray marks, not the content.
SCANNED_CHARS_PER_PAGE = 25


def _open_with_pypdf(data: bytes) -> tuple[Any, list[str]]:
    """(reader, text of each page) with pypdf. Raises ``ExtractionError`` for encrypted files and
    pypdf's own errors for damaged ones."""
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError

    reader = PdfReader(io.BytesIO(data), strict=False)
    if reader.is_encrypted:
        try:
            # Many PDFs are "encrypted" with an empty user password (restrictions only).
            if not reader.decrypt(""):
                raise FileNotDecryptedError("user password required")
        except (FileNotDecryptedError, NotImplementedError) as exc:
            raise ExtractionError(
                "The PDF is password-protected. Remove the password (print to PDF or save "
                "without encryption) and upload it again.",
                code="encrypted_pdf",
            ) from exc
    texts = []
    for index, page in enumerate(reader.pages):
        try:
            texts.append(page.extract_text() or "")
        except Exception as exc:  # noqa: BLE001 - one unreadable page must not lose the others
            logger.warning("pdf_page_unreadable", page=index + 1, error=str(exc))
            texts.append("")
    return reader, texts


def _pages_with_pdfminer(data: bytes) -> list[str]:
    """Text of each page with pdfminer.six, which rebuilds broken cross-reference tables."""
    from pdfminer.high_level import extract_pages
    from pdfminer.layout import LTTextContainer

    return [
        "".join(element.get_text() for element in layout if isinstance(element, LTTextContainer))
        for layout in extract_pages(io.BytesIO(data))
    ]


def _has_images(reader: Any) -> bool:
    try:
        return any(len(page.images) for page in reader.pages)
    except Exception:  # noqa: BLE001 - if images cannot be listed, do not guess a scan
        return False


def extract_pdf(data: bytes) -> ExtractedText:
    reader = None
    warnings: list[str] = []
    try:
        reader, page_texts = _open_with_pypdf(data)
    except ExtractionError:
        raise
    except Exception as first_error:  # noqa: BLE001 - pypdf raises many types on damaged files
        logger.info("pdf_repair_attempt", error=str(first_error))
        try:
            page_texts = _pages_with_pdfminer(data)
        except Exception as exc:  # noqa: BLE001 - both parsers failed: the file is beyond repair
            raise ExtractionError(
                f"The PDF is damaged and could not be read ({first_error}).", code="damaged_file"
            ) from exc
        warnings.append(f"the PDF is damaged ({first_error}); its text was recovered by rebuilding its structure")

    alnum = sum(ch.isalnum() for text in page_texts for ch in text)
    if page_texts and alnum / len(page_texts) < SCANNED_CHARS_PER_PAGE and reader is not None and _has_images(reader):
        raise ExtractionError(
            f"The PDF has no text layer: {len(page_texts)} page(s) of images with {alnum} characters of "
            "text in all. It looks scanned; text recognition (OCR) is not supported.",
            code="no_text",
        )

    outline: list[_OutlineEntry] = []
    if reader is not None:
        try:
            outline = _flatten_outline(reader, reader.outline)
        except Exception:  # noqa: BLE001 - a broken outline only costs the headings
            outline = []
    by_page: dict[int, list[_OutlineEntry]] = {}
    for entry in outline:
        by_page.setdefault(entry.page, []).append(entry)

    builder = TextBuilder()
    for index, raw in enumerate(page_texts):
        builder.page_break()
        cursor = 0
        for entry in by_page.get(index, []):
            at = _find_heading(raw, entry.title, cursor)
            if at < 0:
                if not raw[cursor:].strip():
                    builder.heading(entry.level, entry.title)
                continue
            _paragraphs(builder, raw[cursor:at])
            builder.heading(entry.level, entry.title)
            cursor = at + len(entry.title)
            # Skip the rest of the printed heading line (page numbers in a table of contents).
            newline = raw.find("\n", cursor)
            cursor = newline + 1 if newline >= 0 and newline - cursor < 80 else cursor
        _paragraphs(builder, raw[cursor:])

    metadata_title = None
    if reader is not None:
        try:
            metadata_title = (reader.metadata.title or "").strip().replace("\x00", "") if reader.metadata else None
        except Exception:  # noqa: BLE001 - unreadable metadata (seen in the wild) is not fatal
            metadata_title = None
    result = builder.build(
        title=metadata_title or None,
        empty_message=(
            "The PDF has no text layer: it looks scanned or made of images. Text recognition (OCR) is "
            "not supported; upload a PDF with selectable text."
        ),
    )
    result.warnings.extend(warnings)
    # Without a metadata title the caller keeps the file name: a PDF's first line is too often
    # a running header or a table of contents to serve as a title.
    return result


def _paragraphs(builder: TextBuilder, text: str) -> None:
    """Split a page's text into paragraphs at blank lines or at lines ending a sentence
    followed by a short line (pypdf gives one line per printed line)."""
    text = clean(text)
    if not text:
        return
    paragraph: list[str] = []
    for line in text.split("\n"):
        paragraph.append(line)
        if line.endswith((".", "!", "?", ":")) and len(line) < 60:
            builder.paragraph(" ".join(paragraph))
            paragraph = []
    if paragraph:
        builder.paragraph(" ".join(paragraph))
