"""Shared types and the builder every extractor uses."""

from __future__ import annotations

import bisect
import re
import unicodedata
from dataclasses import dataclass, field

# Fewer letters or digits than this in a whole document means there is nothing to index.
MIN_TEXT_CHARS = 3


class ExtractionError(Exception):
    """The file cannot yield text; ``message`` says why in terms a user can act on."""

    def __init__(self, message: str, *, code: str = "extraction_failed") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Section:
    """A span of the text under one heading path (outermost heading first)."""

    heading_path: tuple[str, ...]
    start: int
    end: int


@dataclass
class ExtractedText:
    text: str
    sections: list[Section]
    page_starts: list[int] | None = None
    title: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def page_count(self) -> int | None:
        return len(self.page_starts) if self.page_starts is not None else None

    def page_at(self, offset: int) -> int | None:
        """1-based page number of character ``offset``, or ``None`` for unpaged formats."""
        if not self.page_starts:
            return None
        return max(1, bisect.bisect_right(self.page_starts, offset))


_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u202f\u205f\u3000]+")
_HYPHEN_BREAK = re.compile(r"(\w)-\n(\w)")


def clean(text: str) -> str:
    """Normalize a block of text: NFKC (ligatures and Arabic presentation forms become plain
    letters), words hyphenated across lines re-joined, runs of spaces collapsed, trimmed."""
    text = unicodedata.normalize("NFKC", text).replace("\x00", "")
    text = _HYPHEN_BREAK.sub(r"\1\2", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


class TextBuilder:
    """Accumulates headings, paragraphs and page breaks into an ``ExtractedText``."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._length = 0
        self._headings: list[tuple[int, str]] = []
        self._sections: list[Section] = []
        self._section_start = 0
        self._page_starts: list[int] | None = None

    def _path(self) -> tuple[str, ...]:
        return tuple(title for _, title in self._headings)

    def _close_section(self) -> None:
        if self._length > self._section_start:
            self._sections.append(Section(self._path(), self._section_start, self._length))
        self._section_start = self._length

    def heading(self, level: int, title: str) -> None:
        """Start a section under ``title`` at ``level`` (1 = outermost). The heading text is also
        part of the document text, so it is searchable."""
        title = clean(title).replace("\n", " ")
        if not title:
            return
        self._close_section()
        while self._headings and self._headings[-1][0] >= level:
            self._headings.pop()
        self._headings.append((level, title[:200]))
        self.paragraph(title)

    def paragraph(self, text: str) -> None:
        text = clean(text)
        if not text:
            return
        if self._parts:
            self._parts.append("\n\n")
            self._length += 2
            if self._section_start == self._length - 2:
                # A section opened just now starts at its text, not at the separator before it.
                self._section_start = self._length
        self._parts.append(text)
        self._length += len(text)

    def page_break(self) -> None:
        """Mark that the next paragraph starts a new page (the first call starts page 1)."""
        if self._page_starts is None:
            self._page_starts = []
        start = self._length + (2 if self._parts else 0)
        self._page_starts.append(start)

    def build(self, *, title: str | None = None, empty_message: str | None = None) -> ExtractedText:
        """The accumulated text. Raises ``ExtractionError`` when it holds (almost) no text."""
        self._close_section()
        text = "".join(self._parts)
        if sum(ch.isalnum() for ch in text) < MIN_TEXT_CHARS:
            raise ExtractionError(empty_message or "The file contains no text to index.", code="no_text")
        return ExtractedText(text=text, sections=self._sections, page_starts=self._page_starts, title=title)
