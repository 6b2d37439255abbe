"""Markdown, parsed with markdown-it-py (CommonMark + tables): headings become the heading path.

The source is parsed in slices of about ``SLICE_CHARS``, cut at blank lines outside fenced code:
markdown-it holds several token objects per paragraph, so a file of one-letter paragraphs would
otherwise cost hundreds of bytes per byte of source.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from markdown_it import MarkdownIt

from knowledge.extraction.base import ExtractedText, TextBuilder
from knowledge.extraction.text import decode


def _inline_text(token: Any) -> str:
    parts: list[str] = []
    for child in token.children or []:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append("\n")
        elif child.type == "image":
            parts.append(child.content)
    return "".join(parts)


SLICE_CHARS = 64 * 1024
# A blank line followed by an unindented line: a block boundary that a list item or indented
# code does not continue across.
_CUT = re.compile(r"\n[ \t]*\n(?=[^ \t\n])")
_FENCE_LINE = re.compile(r"^ {0,3}(`{3,}|~{3,})", re.MULTILINE)


def _slices(text: str) -> Iterator[str]:
    """``text`` in consecutive pieces of at least ``SLICE_CHARS`` (but the last), each ending at a
    block boundary outside fenced code, so that each parses as it would in the whole."""
    start = scanned = 0
    fence: str | None = None  # the open fence's marker while inside fenced code
    while len(text) - start > SLICE_CHARS:
        for cut in _CUT.finditer(text, start + SLICE_CHARS):
            for line in _FENCE_LINE.finditer(text, scanned, cut.start()):
                marker = line.group(1)
                if fence is None:
                    fence = marker
                elif marker[0] == fence[0] and len(marker) >= len(fence):
                    fence = None
            scanned = cut.start()
            if fence is None:
                yield text[start:cut.end()]
                start = cut.end()
                break
        else:
            break
    yield text[start:]


def _tokens(text: str) -> Iterator[Any]:
    parser = MarkdownIt("commonmark").enable("table")
    for piece in _slices(text):
        yield from parser.parse(piece)


def extract_markdown(data: bytes) -> ExtractedText:
    """Text of the Markdown ``data``. Raises ``ExtractionError`` (``no_text``, ``bad_encoding``)."""
    tokens = _tokens(decode(data))
    builder = TextBuilder()
    title = None
    heading_level: int | None = None
    in_cell = False
    row: list[str] = []
    for token in tokens:
        kind = token.type
        if kind == "heading_open":
            heading_level = int(token.tag[1])
        elif kind in ("th_open", "td_open"):
            in_cell = True
        elif kind in ("th_close", "td_close"):
            in_cell = False
        elif kind == "tr_close":
            if any(cell.strip() for cell in row):
                builder.paragraph(" | ".join(cell.strip() for cell in row))
            row = []
        elif kind == "inline":
            text = _inline_text(token)
            if heading_level is not None:
                builder.heading(heading_level, text)
                title = title or text.strip()
                heading_level = None
            elif in_cell:
                row.append(text)
            else:
                builder.paragraph(text)
        elif kind in ("fence", "code_block"):
            builder.paragraph(token.content)
    return builder.build(title=title)
