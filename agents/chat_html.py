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
from django.utils.safestring import mark_safe
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


# Each event's partial in ``agents/_chat_events.html``, and the status it shows the turn in.
_EVENT_TEMPLATES: dict[str, tuple[str, str]] = {
    "message.accepted": ("message-accepted", "queued"),
    "turn.queued": ("turn-started", "queued"),
    "turn.started": ("turn-status", "running"),
    "turn.state": ("turn-state", ""),
    "citations": ("citations", ""),
    "turn.completed": ("turn-completed", "completed"),
    "turn.failed": ("turn-failed", "failed"),
    "turn.cancelled": ("turn-cancelled", "cancelled"),
    "error": ("error", ""),
}


def event_fragment(event: dict[str, Any]) -> str:
    """The HTML that htmx's ws extension swaps in for one turn event ('' for none).

    Every fragment carries ``hx-swap-oob`` and targets ids of ``agents/_chat_events.html``
    (``chat-log``, ``turn-<id>-text``, ``-body``, ``-status``, ``-sources``). Streamed text is
    escaped and appended as it comes; the complete answer replaces it, rendered from Markdown
    and sanitized (``render_markdown``). No database access: the consumer calls this per event.
    """
    name = event.get("event", "")
    if name == "token.delta":
        # Offset 0 is the text from its start (a snapshot after a reconnect, or the first
        # delta): replace, so a client that reconnects mid-turn does not show it twice.
        swap = "innerHTML" if int(event.get("offset", 0)) == 0 else "beforeend"
        return (f'<span id="turn-{int(event["turn_id"])}-text" hx-swap-oob="{swap}">'
                f'{html.escape(event["text"])}</span>')
    entry = _EVENT_TEMPLATES.get(name)
    if entry is None:
        return ""
    partial, status = entry
    error = event.get("error") or {}
    context: dict[str, Any] = {
        "event": event, "turn_id": event.get("turn_id"), "oob": True, "status": status,
        "detail": event.get("endpoint", "") if name == "turn.started" else error.get("message", ""),
        "question": event.get("content", "") if name == "message.accepted" else "",
        "user_message_id": event.get("user_message_id"),
        "citations": event.get("citations") or [], "retrieved": event.get("retrieved") or [],
        "usage": event.get("usage"),
    }
    if name == "turn.completed":
        context["content_html"] = mark_safe(render_markdown(event.get("content", "")))  # noqa: S308 (sanitized by nh3)
    return render_to_string(f"agents/_chat_events.html#{partial}", context)
