"""DOCX with python-docx: paragraphs and tables in document order; Heading styles become the
heading path. Headers and footers are left out (page furniture, repeated on every page).

python-docx reads every part of the package into memory, so the archive is first inflated
chunk by chunk against the limits of ``knowledge.extraction.limits`` (entries, total size,
ratio), counting real bytes rather than trusting the ZIP headers."""

from __future__ import annotations

import io
import re
import zipfile
from typing import Any

from knowledge.extraction.base import ExtractedText, ExtractionError, TextBuilder
from knowledge.extraction.limits import zip_check

_HEADING_STYLE = re.compile(r"^(?:heading|überschrift|titre|título|titolo)\s*(\d)$", re.IGNORECASE)


def _heading_level(paragraph: Any) -> int | None:
    name = (paragraph.style.name if paragraph.style is not None else "") or ""
    if name.lower() == "title":
        return 1
    match = _HEADING_STYLE.match(name.strip())
    return int(match.group(1)) + 1 if match else None


def extract_docx(data: bytes) -> ExtractedText:
    """Text of the DOCX ``data``. Raises ``ExtractionError``: ``too_large`` past the extraction
    limits, ``damaged_file`` for archives that cannot be read, ``no_text`` for documents without text."""
    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        zip_check(data, what="The DOCX file")
        document = docx.Document(io.BytesIO(data))
    except ExtractionError:
        raise
    except (zipfile.BadZipFile, PackageNotFoundError, KeyError, ValueError) as exc:
        raise ExtractionError(
            "The DOCX file is damaged or truncated and cannot be opened. Save it again from Word and re-upload.",
            code="damaged_file",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - lxml and python-docx raise many types on bad XML
        raise ExtractionError(f"The DOCX file could not be read ({type(exc).__name__}).", code="damaged_file") from exc

    builder = TextBuilder()
    title = (document.core_properties.title or "").strip() or None
    body = document.element.body
    for child in body.iterchildren():
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "p":
            paragraph = Paragraph(child, document)
            level = _heading_level(paragraph)
            if level is not None:
                builder.heading(level, paragraph.text)
                title = title or paragraph.text.strip() or None
            else:
                builder.paragraph(paragraph.text)
        elif tag == "tbl":
            table = Table(child, document)
            for row in table.rows:
                cells: list[str] = []
                for cell in row.cells:
                    text = " ".join(cell.text.split())
                    if text and (not cells or cells[-1] != text):  # merged cells repeat
                        cells.append(text)
                if cells:
                    builder.paragraph(" | ".join(cells))
    return builder.build(
        title=title,
        empty_message="The DOCX file contains no text (only images or empty pages?); nothing to index.",
    )
