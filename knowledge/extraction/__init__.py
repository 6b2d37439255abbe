"""Text extraction from uploaded files, keeping headings and page numbers.

``extract(kind, data)`` returns an ``ExtractedText``: the document's plain text, the sections
(each with its heading path and character span) and, for paged formats, where each page
starts. Every problem a user can cause (encrypted, damaged, truncated, image-only or empty
files) raises ``ExtractionError`` with a message meant for that user.
"""

from __future__ import annotations

from knowledge.extraction.base import ExtractedText, ExtractionError, Section
from knowledge.extraction.detect import KINDS, UnsupportedFile, detect_kind


def extract(kind: str, data: bytes) -> ExtractedText:
    """Extract text from ``data`` of the given ``kind`` (see ``KINDS``).

    Raises ``ExtractionError`` for content that cannot yield text and ``ValueError`` for an
    unknown kind.
    """
    if kind == "pdf":
        from knowledge.extraction.pdf import extract_pdf

        return extract_pdf(data)
    if kind == "docx":
        from knowledge.extraction.docx import extract_docx

        return extract_docx(data)
    if kind == "html":
        from knowledge.extraction.html import extract_html

        return extract_html(data)
    if kind == "markdown":
        from knowledge.extraction.markdown import extract_markdown

        return extract_markdown(data)
    if kind == "text":
        from knowledge.extraction.text import extract_text

        return extract_text(data)
    raise ValueError(f"no extractor for kind {kind!r}")


__all__ = ["KINDS", "ExtractedText", "ExtractionError", "Section", "UnsupportedFile", "detect_kind", "extract"]
