"""Model output as safe HTML, and turn events as htmx out-of-band fragments for the chat page.

Model output is untrusted. Markdown is parsed with markdown-it (raw HTML disabled, so ``<script>``
stays text) and the result is sanitized again with nh3 (ammonia): an allowlist of tags and
attributes, links only to http(s)/mailto, ``rel="noopener noreferrer nofollow"``. Two layers,
because either alone has had bypasses in the wild.
"""

from __future__ import annotations

import html
from typing import Any

import nh3
from django.template.loader import render_to_string
from markdown_it import MarkdownIt

_md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")

ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "code", "pre", "blockquote", "ul", "ol", "li", "a",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "sup", "del",
}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "th": {"align"}, "td": {"align"}, "ol": {"start"}}
URL_SCHEMES = {"http", "https", "mailto"}


def render_markdown(text: str) -> str:
    """``text`` (Markdown from a model or a user) as sanitized HTML safe to insert in a page."""
    raw = _md.render(text or "")
    return nh3.clean(raw, tags=ALLOWED_TAGS, attributes=ALLOWED_ATTRIBUTES, url_schemes=URL_SCHEMES,
                     link_rel="noopener noreferrer nofollow")


def event_fragment(event: dict[str, Any]) -> str:
    """The HTML that htmx's ws extension swaps in for one turn event ('' for none).

    Every fragment carries ``hx-swap-oob`` and targets ids inside ``agents/chat.html``; the
    streamed text is escaped (it is rendered as Markdown only once complete).
    """
    name = event.get("event", "")
    if name == "token.delta":
        return (f'<span id="turn-{int(event["turn_id"])}-text" hx-swap-oob="beforeend">'
                f'{html.escape(event["text"])}</span>')
    context: dict[str, Any] = {"event": event, "turn_id": event.get("turn_id")}
    if name == "turn.completed":
        context["content_html"] = render_markdown(event.get("content", ""))
    template = {
        "turn.queued": "agents/_chat_events.html#turn-started",
        "turn.started": "agents/_chat_events.html#turn-status",
        "turn.state": "agents/_chat_events.html#turn-state",
        "message.accepted": "agents/_chat_events.html#message-accepted",
        "citations": "agents/_chat_events.html#citations",
        "turn.completed": "agents/_chat_events.html#turn-completed",
        "turn.failed": "agents/_chat_events.html#turn-failed",
        "turn.cancelled": "agents/_chat_events.html#turn-cancelled",
        "error": "agents/_chat_events.html#error",
    }.get(name)
    if template is None:
        return ""
    return render_to_string(template, context)
