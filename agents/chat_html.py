"""Model output as safe HTML, and turn events as htmx out-of-band fragments for the chat page.

Model output is untrusted. Markdown is parsed with markdown-it (raw HTML disabled, so ``<script>``
stays text) and the result is sanitized again with nh3 (ammonia): an allowlist of tags and
attributes, links only to http(s)/mailto, ``rel="noopener noreferrer nofollow"``. Two layers,
because either alone has had bypasses in the wild.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import re
from decimal import Decimal, InvalidOperation
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
    "tool.call": ("tool-call", ""),
    "tool.result": ("tool-result", ""),
    "approval.requested": ("approval-requested", "awaiting_approval"),
    "approval.decided": ("approval-decided", ""),
    "tools.state": ("tools-state", ""),
}

_SAFE_CALL_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def call_dom_id(turn_id: Any, call_id: Any) -> str:
    """The page id of a tool call's card: ``turn-<turn>-call-<call id>``, the call id as the model
    gave it when it is a safe id, else a digest of it (ids must be unique and valid HTML)."""
    text = str(call_id or "")
    safe = text if _SAFE_CALL_ID.match(text) else hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"turn-{int(turn_id)}-call-{safe}"


def _arguments_text(arguments: Any) -> str:
    if arguments is None:
        return ""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False, indent=2, sort_keys=True)


def _when(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    try:
        return dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _cost(usage: Any) -> dict[str, Any] | None:
    """The turn's cost as the status block shows it, from ``usage.cost`` (a decimal string) and
    ``usage.currency`` of a ``turn.completed`` event; ``None`` when the event has none."""
    if not isinstance(usage, dict) or usage.get("cost") in (None, ""):
        return None
    try:
        amount = Decimal(str(usage["cost"]))
    except InvalidOperation:
        return None
    return {"cost": amount, "currency": str(usage.get("currency") or "")}


def tool_card(*, turn_id: Any, call_id: Any, tool: Any, arguments: Any, status: str = "running",
              excerpt: str = "", approval: dict[str, Any] | None = None) -> dict[str, Any]:
    """A tool call as the chat's card templates read it (``agents/_chat_events.html#tool-card``):
    ``dom`` id, ``tool`` name, ``arguments`` as indented JSON text, ``status`` (``ok``,
    ``error``, ``rejected``, ``invalid``, ``awaiting_approval``, ``running``, ...), the result
    ``excerpt``, and its ``approval`` (``approval_card``) or ``None``."""
    return {"dom": call_dom_id(turn_id, call_id), "call_id": str(call_id or ""), "tool": str(tool or ""),
            "arguments": _arguments_text(arguments), "status": status, "excerpt": excerpt or "",
            "approval": approval}


def approval_card(*, approval_id: Any, tool: Any, status: str, expires_at: Any = None, decided_by: str = "",
                  reason: str = "") -> dict[str, Any]:
    """An approval request as the chat's approval block reads it (``#approval-block``)."""
    return {"id": int(approval_id), "tool": str(tool or ""), "status": status, "expires_at": _when(expires_at),
            "decided_by": decided_by or "", "reason": reason or ""}


def tool_cards_from_rows(calls: list[Any]) -> list[dict[str, Any]]:
    """``tool_card`` dicts of a turn's ``ToolCall`` rows (select ``approval`` with them)."""
    from django.core.exceptions import ObjectDoesNotExist

    cards: list[dict[str, Any]] = []
    for call in calls:
        try:
            request = call.approval
        except ObjectDoesNotExist:
            request = None
        approval = None if request is None else approval_card(
            approval_id=request.pk, tool=request.tool_name, status=request.status, expires_at=request.expires_at,
            decided_by=request.decided_by_label, reason=request.reason)
        arguments = call.arguments if call.arguments is not None else call.arguments_raw
        cards.append(tool_card(turn_id=call.turn_id, call_id=call.call_id, tool=call.tool_name, arguments=arguments,
                               status=call.status, excerpt=call.output_excerpt, approval=approval))
    return cards


def tool_events_from_rows(calls: list[Any]) -> list[dict[str, Any]]:
    """The tool events (``tool.call``, ``tool.result``, ``approval.requested``, ``approval.decided``)
    that a turn's ``ToolCall`` rows stand for, in order: what a JSON client missed before it
    connected."""
    from django.core.exceptions import ObjectDoesNotExist

    out: list[dict[str, Any]] = []
    for call in calls:
        base = {"turn_id": call.turn_id, "call_id": call.call_id}
        out.append({"event": "tool.call", **base, "tool": call.tool_name, "arguments": call.arguments})
        try:
            request = call.approval
        except ObjectDoesNotExist:
            request = None
        if request is not None:
            out.append({"event": "approval.requested", **base, "approval_id": request.pk, "tool": request.tool_name,
                        "arguments": request.arguments, "expires_at": request.expires_at.isoformat()})
            if request.status != "pending":
                out.append({"event": "approval.decided", **base, "approval_id": request.pk, "status": request.status,
                            "decided_by": request.decided_by_label, "reason": request.reason})
        if call.status in ("ok", "error", "rejected", "invalid"):
            status = "error" if call.status == "invalid" else call.status
            out.append({"event": "tool.result", **base, "status": status, "excerpt": call.output_excerpt})
    return out


def event_fragment(event: dict[str, Any], *, can_review: bool = False) -> str:
    """The HTML that htmx's ws extension swaps in for one turn event ('' for none).

    Tool calls become collapsible cards in ``turn-<id>-tools`` (``tool.call`` appends one,
    ``tool.result`` fills its status icon and result excerpt), ``approval.requested`` appends a
    "waiting for approval" block that ``approval.decided`` replaces; ``tools.state`` (sent on
    connect) replaces the turn's whole tool list. ``can_review``: the viewer reads approval
    requests (``approvals:read``), so the block links to the request's page.

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
        "usage": event.get("usage"), "cost": _cost(event.get("usage")),
    }
    if name == "tool.call":
        context["card"] = tool_card(turn_id=event.get("turn_id") or 0, call_id=event.get("call_id"),
                                    tool=event.get("tool"), arguments=event.get("arguments"))
    elif name == "tool.result":
        context["card"] = {"dom": call_dom_id(event.get("turn_id") or 0, event.get("call_id")),
                           "status": str(event.get("status") or ""), "excerpt": str(event.get("excerpt") or "")}
    elif name in ("approval.requested", "approval.decided"):
        context["approval"] = approval_card(
            approval_id=event["approval_id"], tool=event.get("tool", ""),
            status="pending" if name == "approval.requested" else str(event.get("status") or ""),
            expires_at=event.get("expires_at"), decided_by=str(event.get("decided_by") or ""),
            reason=str(event.get("reason") or ""))
        context["can_review"] = can_review
        context["detail"] = ""
    elif name == "tools.state":
        context["calls"] = event.get("calls") or []
        context["can_review"] = can_review
        context["status"] = str(event.get("status") or "")
    if name == "turn.completed":
        context["content_html"] = mark_safe(render_markdown(event.get("content", "")))  # noqa: S308 (sanitized by nh3)
    return render_to_string(f"agents/_chat_events.html#{partial}", context)
