"""Model output rendered for the chat page is inert: Markdown through markdown-it without raw
HTML, then nh3's allowlist. No database."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from agents.chat_html import event_fragment, render_markdown


def _elements(html: str) -> list[tuple[str, dict[str, str]]]:
    """The elements a browser would build from ``html``: (tag, attributes)."""
    found: list[tuple[str, dict[str, str]]] = []

    class Collector(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            found.append((tag, {k: v or "" for k, v in attrs}))

    Collector().feed(html)
    return found


def _assert_inert(html: str) -> None:
    for tag, attrs in _elements(html):
        assert tag not in {"script", "img", "iframe", "svg", "style", "object", "form", "input", "meta"}, html
        assert not [a for a in attrs if a.startswith("on") or a in {"style", "src"}], html
        if "href" in attrs:
            assert attrs["href"].split(":", 1)[0].lower() in {"http", "https", "mailto"}, html


@pytest.mark.parametrize("text", [
    "<script>alert(1)</script>",
    "Hi <script src=https://evil.example/x.js></script> there",
    "<SCRIPT>alert(1)</SCRIPT>",
    "```html\n<script>alert(1)</script>\n```",
])
def test_script_tags_never_become_elements(text: str) -> None:
    html = render_markdown(text)
    _assert_inert(html)
    assert "<script" not in html.lower()


@pytest.mark.parametrize("text", [
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "[click](javascript&#58;alert(1))",
    "[click]( javascript:alert(1) )",
    "<javascript:alert(1)>",
    "[click](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[click](vbscript:msgbox(1))",
])
def test_links_to_scripts_lose_their_target(text: str) -> None:
    html = render_markdown(text)
    _assert_inert(html)
    assert not [attrs for _, attrs in _elements(html) if "href" in attrs]


def test_safe_links_keep_their_target_and_get_rel() -> None:
    html = render_markdown("[docs](https://example.com/a?b=1)")
    assert 'href="https://example.com/a?b=1"' in html
    assert 'rel="noopener noreferrer nofollow"' in html


@pytest.mark.parametrize("text", [
    '<img src=x onerror="alert(1)">',
    "![x](https://evil.example/p.png)",
    '![x" onerror="alert(1)](x)',
    '<a href="https://example.com" onclick="alert(1)">x</a>',
    '<div style="background:url(javascript:alert(1))" onmouseover="alert(1)">x</div>',
])
def test_images_and_event_handlers_are_dropped(text: str) -> None:
    _assert_inert(render_markdown(text))


@pytest.mark.parametrize("raw", [
    "<iframe src=https://evil.example></iframe>",
    "<form action=https://evil.example><input name=p></form>",
    "<svg onload=alert(1)>",
    "<style>body{display:none}</style>",
    "<object data=x></object>",
    "<meta http-equiv=refresh content=0;url=https://evil.example>",
])
def test_raw_html_is_shown_as_text(raw: str) -> None:
    html = render_markdown(raw)
    _assert_inert(html)
    assert [tag for tag, _ in _elements(html)] == ["p"]
    assert "&lt;" in html  # kept as visible text, escaped


def test_markdown_still_renders() -> None:
    html = render_markdown("# Title\n\n**bold** and `code`\n\n- one\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    for tag in ("<h1>", "<strong>", "<code>", "<ul>", "<li>", "<table>", "<td>"):
        assert tag in html


def test_streamed_deltas_are_escaped() -> None:
    html = event_fragment({"event": "token.delta", "turn_id": 7, "offset": 0, "text": "<img src=x onerror=alert(1)>"})
    _assert_inert(html)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'id="turn-7-text"' in html


def test_a_completed_answer_is_rendered_sanitized() -> None:
    html = event_fragment({"event": "turn.completed", "turn_id": 7, "message_id": 1,
                           "content": "Done <script>alert(1)</script> [x](javascript:alert(1))",
                           "citations": [], "usage": {}})
    _assert_inert(html)
    assert "<script" not in html.lower()
