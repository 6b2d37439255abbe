"""PDF with pypdf: text per page; the outline (bookmarks) gives the heading path.

Outline entries point at pages; an entry's title is looked up in its page's text so the
section starts where the heading is printed, not merely at the top of the page.

Streams are bounded (``knowledge.extraction.limits``): pypdf runs with its configuration's
per-stream output limits set to ``KB_EXTRACT_MAX_PDF_STREAM_MB`` and never calls the external
JBIG2 decoder; the decoded page contents, form XObjects and ToUnicode maps of all pages together
are counted against ``KB_EXTRACT_MAX_UNCOMPRESSED_MB`` before each page is read (pypdf keeps what it decoded); and
pdfminer.six, which has no limits, only gets a damaged file after ``_raw_streams_check`` has
inflated its streams within the limits.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog

from knowledge.extraction.base import ExtractedText, ExtractionError, TextBuilder, clean
from knowledge.extraction.limits import CHUNK_BYTES, MB, ExtractionLimits, extraction_limits, too_large

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


_WHAT = "The PDF"


@contextmanager
def _pypdf_limits(limits: ExtractionLimits) -> Iterator[None]:
    """Run pypdf with each stream's decoded output bounded by ``KB_EXTRACT_MAX_PDF_STREAM_MB`` (its
    own default is 75 MB) and without the external ``jbig2dec`` (images are not read). A stream's
    raw (declared) length is bounded by the upload limit only: raw bytes are not a bomb, and a
    genuine PDF may hold one large uncompressed image."""
    import pypdf
    from django.conf import settings

    per_stream = limits.max_pdf_stream_bytes
    with pypdf.apply_configuration(
        maximum_declared_stream_length=settings.KB_MAX_UPLOAD_MB * 1024 * 1024,
        array_based_stream_maximum_output_length=per_stream,
        zlib_maximum_output_length=per_stream,
        lzw_maximum_output_length=per_stream,
        run_length_maximum_output_length=per_stream,
        brotli_maximum_output_length=per_stream,
        jbig2_maximum_output_length=per_stream,
        jbig2dec_binary=None,
    ):
        yield


def _stream_bytes(holder: Any, seen: set[int], depth: int = 0) -> int:
    """Decoded bytes of the form XObjects and ToUnicode maps that ``holder`` (a page or a form)
    uses, not counting those in ``seen`` (ids of objects already counted), recursing into forms."""
    total = 0
    resources = holder.get("/Resources")
    resources = resources.get_object() if resources is not None else None
    if resources is None or depth > 20 or not hasattr(resources, "get"):
        return 0
    for key, kind in (("/XObject", "/Form"), ("/Font", None)):
        group = resources.get(key)
        group = group.get_object() if group is not None else None
        values = group.values() if group is not None and hasattr(group, "values") else []
        for value in values:
            item = value.get_object()
            if kind is None:  # a font: its ToUnicode map is decoded and parsed
                item = item.get("/ToUnicode") if hasattr(item, "get") else None
                item = item.get_object() if item is not None else None
            elif item.get("/Subtype") != kind:
                continue
            if item is None or id(item) in seen or not hasattr(item, "get_data"):
                continue
            seen.add(id(item))
            total += len(item.get_data())
            if kind is not None:
                total += _stream_bytes(item, seen, depth + 1)
    return total


def _page_stream_bytes(page: Any, seen: set[int]) -> int:
    """Decoded bytes pypdf holds for ``page`` once its text is extracted (its contents, forms and
    ToUnicode maps, each counted once per document through ``seen``)."""
    contents = page.get_contents()
    return (len(contents.get_data()) if contents is not None else 0) + _stream_bytes(page, seen)


def _open_with_pypdf(data: bytes, limits: ExtractionLimits) -> tuple[Any, list[str]]:
    """(reader, text of each page) with pypdf. Raises ``ExtractionError`` for encrypted files and
    files past the limits, pypdf's own errors for damaged ones."""
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, LimitReachedError

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
    decoded = 0
    seen: set[int] = set()
    for index, page in enumerate(reader.pages):
        try:
            decoded += _page_stream_bytes(page, seen)
            if decoded > limits.max_uncompressed_bytes:
                raise too_large(_WHAT, f"decompresses to more than {limits.max_uncompressed_bytes // MB} MB "
                                       f"by page {index + 1}")
            texts.append(page.extract_text() or "")
        except (ExtractionError, LimitReachedError):
            raise
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


# A stream keyword (not "endstream") and its end of line: the stream's bytes follow.
_STREAM_START = re.compile(rb"(?<!end)stream[ \t]*(?:\r\n|\r|\n)")
# Filters pdfminer.six decodes without an output bound and _raw_streams_check does not inflate.
_UNBOUNDED_FILTERS = re.compile(rb"/(?:LZWDecode|RunLengthDecode|LZW|RL)\b")


def _raw_streams_check(data: bytes, limits: ExtractionLimits) -> None:
    """Inflate every Flate stream of the PDF ``data``, found by its ``stream`` keyword rather than
    through a cross-reference table a damaged file lacks, ``CHUNK_BYTES`` at a time, keeping
    nothing. Raises ``too_large`` when the streams decode past the limits, ``ExtractionError``
    (``damaged_file``) for encrypted files and LZW or run-length filters, which only the parser
    that read the file could bound."""
    damaged = ExtractionError(
        "The PDF is damaged, and its structure cannot be rebuilt safely. Save or print it to PDF again "
        "and re-upload.", code="damaged_file")
    if b"/Encrypt" in data or _UNBOUNDED_FILTERS.search(data):
        raise damaged
    total = 0
    for match in _STREAM_START.finditer(data):
        inflater = zlib.decompressobj()
        position, inflated, tail = match.end(), 0, b""
        try:
            pending = data[position:position + CHUNK_BYTES]
            while pending and not inflater.eof:
                if inflated > limits.max_pdf_stream_bytes:
                    raise too_large(_WHAT, f"has a stream that decompresses to more than "
                                           f"{limits.max_pdf_stream_bytes // MB} MB")
                position += len(pending)
                out = inflater.decompress(pending, CHUNK_BYTES)
                while True:
                    inflated += len(out)
                    total += len(out)
                    if total > limits.max_uncompressed_bytes:
                        raise too_large(_WHAT, f"decompresses to more than {limits.max_uncompressed_bytes // MB} MB")
                    # Object streams hold dictionaries: a filter name may be inside one.
                    if _UNBOUNDED_FILTERS.search(tail + out):
                        raise damaged
                    tail = out[-32:]
                    if not inflater.unconsumed_tail or inflater.eof:
                        break
                    out = inflater.decompress(inflater.unconsumed_tail, CHUNK_BYTES)
                pending = b"" if inflater.eof else data[position:position + CHUNK_BYTES]
        except zlib.error:
            continue  # not a Flate stream (or its end): pdfminer reads it as it is


def extract_pdf(data: bytes) -> ExtractedText:
    """Text of the PDF ``data`` with its pages and outline. Raises ``ExtractionError``:
    ``encrypted_pdf``, ``too_large`` past the extraction limits, ``damaged_file``, ``no_text``."""
    limits = extraction_limits()
    with _pypdf_limits(limits):
        return _extract_pdf(data, limits)


def _extract_pdf(data: bytes, limits: ExtractionLimits) -> ExtractedText:
    from pypdf.errors import LimitReachedError

    reader = None
    warnings: list[str] = []
    try:
        reader, page_texts = _open_with_pypdf(data, limits)
    except ExtractionError:
        raise
    except LimitReachedError as exc:
        logger.info("pdf_limit_reached", error=str(exc))
        raise too_large(_WHAT, f"has a stream that decompresses to more than {limits.max_pdf_stream_bytes // MB} MB"
                        ) from exc
    except Exception as first_error:  # noqa: BLE001 - pypdf raises many types on damaged files
        logger.info("pdf_repair_attempt", error=str(first_error))
        _raw_streams_check(data, limits)
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
