"""Bounds on what one upload may expand to while its text is extracted (decompression bombs).

An upload is small (``KB_MAX_UPLOAD_MB``), but a ZIP-based format (DOCX) or a PDF stream can
inflate a thousandfold, and markup can turn each few bytes into a parser object. The ingest
worker serves every tenant, so a file that would grow it past these bounds fails (an
``ExtractionError`` with code ``too_large``) before it takes the memory:

- ``KB_EXTRACT_MAX_UNCOMPRESSED_MB``: all the bytes a document may decompress to (a ZIP's entries
  together; a PDF's decoded streams together);
- ``KB_EXTRACT_MAX_RATIO``: how much larger than its compressed form one entry may become;
- ``KB_EXTRACT_MAX_ENTRIES``: entries in one ZIP;
- ``KB_EXTRACT_MAX_PDF_STREAM_MB``: the decoded size of one PDF stream;
- ``KB_EXTRACT_MAX_HTML_MB``: the largest HTML file that is parsed.

ZIP headers can state any size, so sizes are counted on the bytes as they are inflated, in
``CHUNK_BYTES`` steps, never taken from ``ZipInfo.file_size``.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

from django.conf import settings

from knowledge.extraction.base import ExtractionError

MB = 1024 * 1024
# Bytes inflated per step while counting: the most one step holds in memory.
CHUNK_BYTES = 64 * 1024
# Entries smaller than this are not held to the ratio: tiny, repetitive parts (an empty
# settings.xml) compress far better than a hundredfold without harm. Apache POI's ZipSecureFile
# uses the same grace (GRACE_ENTRY_SIZE, 100 KiB).
RATIO_GRACE_BYTES = 100 * 1024
# The signature that starts each central-directory record (APPNOTE.TXT 4.3.12).
_CENTRAL_DIRECTORY_SIGNATURE = b"PK\x01\x02"


@dataclass(frozen=True)
class ExtractionLimits:
    """The limits in force (from settings), in bytes and plain numbers."""

    max_uncompressed_bytes: int
    max_ratio: float
    max_entries: int
    max_pdf_stream_bytes: int
    max_html_bytes: int


def extraction_limits() -> ExtractionLimits:
    """The limits from settings (read on each call, so a changed setting applies at once)."""
    return ExtractionLimits(
        max_uncompressed_bytes=settings.KB_EXTRACT_MAX_UNCOMPRESSED_MB * MB,
        max_ratio=float(settings.KB_EXTRACT_MAX_RATIO),
        max_entries=settings.KB_EXTRACT_MAX_ENTRIES,
        max_pdf_stream_bytes=settings.KB_EXTRACT_MAX_PDF_STREAM_MB * MB,
        max_html_bytes=settings.KB_EXTRACT_MAX_HTML_MB * MB,
    )


def too_large(what: str, detail: str) -> ExtractionError:
    """The ``ExtractionError`` for a file past a limit: ``what`` is the format ("The DOCX file"),
    ``detail`` the limit it broke."""
    return ExtractionError(
        f"{what} {detail}, more than this knowledge base extracts from one file; it was not indexed "
        "(such files are usually decompression bombs). Split it into smaller files if it is genuine.",
        code="too_large",
    )


def zip_entry_count_exceeds(data: bytes, limit: int) -> bool:
    """Whether ``data`` (a ZIP) may hold more than ``limit`` entries, judged before ``zipfile``
    parses its central directory into one object per entry.

    Counts central-directory signatures, an upper bound on the entries ``zipfile`` reads
    whatever the end record claims (a stored member could contain the signature too, which only
    errs towards refusing).
    """
    return data.count(_CENTRAL_DIRECTORY_SIGNATURE) > limit


def zip_check(data: bytes, *, what: str) -> None:
    """Inflate every entry of the ZIP ``data`` in ``CHUNK_BYTES`` steps, keeping nothing, and
    raise ``too_large`` (an ``ExtractionError``) past the entry count, the total uncompressed
    bytes or an entry's compression ratio. ``what`` names the format in the message.

    Entries must be stored or deflated (what Office writes): bzip2 and LZMA entries are refused
    because ``zipfile`` inflates their reads without an output bound. Damaged archives raise
    ``zipfile.BadZipFile`` (also on a CRC mismatch, when a header understates a size).
    """
    limits = extraction_limits()
    if zip_entry_count_exceeds(data, limits.max_entries):
        raise too_large(what, f"has more than {limits.max_entries} entries")
    total = 0
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for entry in archive.infolist():
            if entry.is_dir():
                continue
            if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ExtractionError(
                    f"{what} uses a compression method ({entry.compress_type}) that Office does not "
                    "write. Save it again from Word and re-upload.",
                    code="damaged_file",
                )
            inflated = 0
            with archive.open(entry) as stream:
                while chunk := stream.read(CHUNK_BYTES):
                    inflated += len(chunk)
                    total += len(chunk)
                    if total > limits.max_uncompressed_bytes:
                        raise too_large(what, f"unpacks to more than {limits.max_uncompressed_bytes // MB} MB")
                    # compress_size may lie too; it cannot exceed the upload, so a lie only
                    # loosens the ratio up to the total bound above.
                    if inflated > RATIO_GRACE_BYTES and inflated > limits.max_ratio * max(entry.compress_size, 1):
                        raise too_large(
                            what,
                            f"has a part ({entry.filename[:100]}) that unpacks to more than "
                            f"{limits.max_ratio:g} times its packed size",
                        )
