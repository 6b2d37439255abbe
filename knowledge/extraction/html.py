"""HTML, parsed with BeautifulSoup: h1-h6 become the heading path; scripts and styles dropped."""

from __future__ import annotations

import re

from bs4 import BeautifulSoup, NavigableString

from knowledge.extraction.base import ExtractedText, TextBuilder
from knowledge.extraction.text import decode

_BLOCKS = ("p", "div", "li", "tr", "pre", "blockquote", "section", "article", "table", "ul", "ol", "dd", "dt",
           "figcaption", "header", "footer", "main", "aside", "nav", "br", "hr", "td", "th")
_HEADING = "\x00H"


def extract_html(data: bytes) -> ExtractedText:
    soup = BeautifulSoup(decode(data), "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg", "iframe"]):
        tag.decompose()
    title_tag = soup.find("title")
    title = title_tag.get_text(" ", strip=True) if title_tag else None
    if soup.head:
        soup.head.decompose()
    for level in range(1, 7):
        for heading in soup.find_all(f"h{level}"):
            text = " ".join(heading.get_text(" ").split())
            heading.replace_with(NavigableString(f"\n\n{_HEADING}{level}:{text}\n\n"))
    for tag in soup.find_all(_BLOCKS):
        tag.insert_after(NavigableString("\n\n" if tag.name not in ("td", "th") else " | "))
    builder = TextBuilder()
    for block in re.split(r"\n\s*\n", soup.get_text()):
        block = block.strip().strip("|").strip()
        if block.startswith(_HEADING):
            level_text, _, heading_text = block[len(_HEADING):].partition(":")
            builder.heading(int(level_text), heading_text)
            title = title or heading_text
        else:
            builder.paragraph(" ".join(block.split()))
    return builder.build(title=title, empty_message="The HTML page contains no text to index.")
