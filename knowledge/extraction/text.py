"""Plain text (any encoding charset-normalizer can identify)."""

from __future__ import annotations

import re

from knowledge.extraction.base import ExtractedText, ExtractionError, TextBuilder


def decode(data: bytes) -> str:
    """Decode ``data`` as UTF-8 (BOM allowed), else the encoding charset-normalizer finds.
    Raises ``ExtractionError`` when no text encoding fits."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        from charset_normalizer import from_bytes

        best = from_bytes(data).best()
        if best is None:
            raise ExtractionError("The file is not text in any encoding we recognize.", code="bad_encoding") from None
        return str(best)


def extract_text(data: bytes) -> ExtractedText:
    builder = TextBuilder()
    text = decode(data)
    for block in re.split(r"\n\s*\n", text):
        builder.paragraph(block)
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), None)
    return builder.build(title=first_line[:200] if first_line else None)
