"""HTML, read as a stream of tags with the standard library's ``html.parser``: h1-h6 become the
heading path; scripts, styles and the head are dropped; table cells are joined with " | ".

No tree is built: a document tree costs memory per element (docs/perf/extraction-limits.md), so
a few megabytes of ``<p>`` would grow the worker by gigabytes; deep nesting costs nothing here. Only the
standard HTML character references are expanded (HTML has no user-defined entities), and files
past ``KB_EXTRACT_MAX_HTML_MB`` are refused before they are decoded.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from knowledge.extraction.base import ExtractedText, TextBuilder
from knowledge.extraction.limits import MB, extraction_limits, too_large
from knowledge.extraction.text import decode

_BLOCKS = frozenset(("p", "div", "li", "tr", "pre", "blockquote", "section", "article", "table", "ul", "ol", "dd",
                     "dt", "figcaption", "header", "footer", "main", "aside", "nav", "br", "hr", "td", "th"))
_CELLS = frozenset(("td", "th"))
# Elements whose content is not text a reader sees.
_SKIPPED = frozenset(("script", "style", "noscript", "template", "svg", "iframe", "head"))
# What a <head> holds; any other element ends an unclosed head, as in browsers.
_HEAD_CONTENT = frozenset(("title", "meta", "link", "style", "script", "base", "noscript", "template"))
_HEADINGS = {f"h{level}": level for level in range(1, 7)}
_HEADING = "\x00H"


class _TextCollector(HTMLParser):
    """Collects the text with blank lines between blocks and headings marked, as events arrive."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self._skipping: list[str] = []  # open skipped elements, innermost last
        self._in_title = False
        self._heading: tuple[int, list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skipping and self._skipping[-1] == "head" and tag not in _HEAD_CONTENT:
            self._skipping.pop()
        if tag == "title":
            self._in_title = True
        if tag in _SKIPPED:
            self._skipping.append(tag)
            return
        if self._skipping:
            return
        if tag in _HEADINGS:
            self._end_heading()
            self._heading = (_HEADINGS[tag], [])
        elif tag in _BLOCKS and tag not in _CELLS and self._heading is None:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/>, <hr/>, <svg/>: a void element opens nothing.
        if tag in _BLOCKS and not self._skipping and self._heading is None:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if self._skipping:
            if tag in self._skipping:
                while self._skipping.pop() != tag:
                    pass
            return
        if tag in _HEADINGS:
            self._end_heading()
        elif tag in _BLOCKS and self._heading is None:
            self.parts.append(" | " if tag in _CELLS else "\n\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
        if self._skipping or self._in_title:
            return
        if self._heading is not None:
            self._heading[1].append(data)
        else:
            self.parts.append(data)

    def _end_heading(self) -> None:
        if self._heading is None:
            return
        level, pieces = self._heading
        self._heading = None
        text = " ".join(" ".join(pieces).split())
        self.parts.append(f"\n\n{_HEADING}{level}:{text}\n\n")

    def close(self) -> None:
        super().close()
        self._end_heading()


def extract_html(data: bytes) -> ExtractedText:
    """Text of the HTML page ``data``. Raises ``ExtractionError``: ``too_large`` past
    ``KB_EXTRACT_MAX_HTML_MB``, ``no_text`` for pages without text, ``bad_encoding``."""
    limit = extraction_limits().max_html_bytes
    if len(data) > limit:
        raise too_large("The HTML file", f"is {len(data) / MB:.1f} MB (the limit for HTML is {limit // MB} MB)")
    collector = _TextCollector()
    collector.feed(decode(data))
    collector.close()
    title = " ".join("".join(collector.title_parts).split()) or None
    builder = TextBuilder()
    for block in re.split(r"\n\s*\n", "".join(collector.parts)):
        block = block.strip().strip("|").strip()
        if block.startswith(_HEADING):
            level_text, _, heading_text = block[len(_HEADING):].partition(":")
            builder.heading(int(level_text), heading_text)
            title = title or heading_text
        else:
            builder.paragraph(" ".join(block.split()))
    return builder.build(title=title, empty_message="The HTML page contains no text to index.")
