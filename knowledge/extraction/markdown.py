"""Markdown, parsed with markdown-it-py (CommonMark + tables): headings become the heading path."""

from __future__ import annotations

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


def extract_markdown(data: bytes) -> ExtractedText:
    tokens = MarkdownIt("commonmark").enable("table").parse(decode(data))
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
