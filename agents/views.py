"""Console pages for agents (``/agents/``) and chat (``/chat/``).

Reads work without JavaScript. The chat page talks to ``ws/chat/<id>/`` through htmx's ws
extension; without it, ``POST /chat/<id>/send`` and ``/cancel`` do the same and redirect back.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from agents import selectors, services
from agents.chat_html import render_markdown, tool_cards_from_rows
from agents.endpoints import model_endpoint_list
from agents.forms import AgentForm, AgentVersionForm, ChatMessageForm, ChatSessionForm
from agents.models import Agent, AgentVersion, ChatSession, Message, ToolCall, Turn
from config.errors import DomainError, ValidationFailed
from config.htmx import after_write, domain_errors_as_pages, render_page
from tenants.principal import Principal, request_principal


def _collection_choices(principal: Principal) -> list[tuple[int, str]]:
    from knowledge.selectors import collection_list

    if not principal.can("kb:read"):
        return []
    return [(c.pk, c.name) for c in collection_list(principal=principal)]


def _endpoint_choices(principal: Principal) -> list[tuple[int, str]]:
    return [(e.pk, f"{e.name} ({e.tier}{', platform' if e.tenant_id is None else ''})")
            for e in model_endpoint_list(principal=principal)]


def _tool_choices(principal: Principal) -> list[tuple[str, str]]:
    """(name, label) of the tenant's tools, the label giving the side effect and whether a call
    waits for approval."""
    from agents.tool_selectors import tool_list

    if not principal.can("tools:read"):
        return []
    return [(t.name, f"{t.name} ({t.side_effect}{', needs approval' if t.requires_approval else ''})")
            for t in tool_list(principal=principal)]


def _version_form(principal: Principal, data: Any = None, initial: dict[str, Any] | None = None) -> AgentVersionForm:
    return AgentVersionForm(data, initial=initial, collections=_collection_choices(principal),
                            endpoints=_endpoint_choices(principal), tools=_tool_choices(principal))


def _add_domain_error(form: AgentVersionForm, extra: AgentForm | None, exc: DomainError) -> None:
    """Show a service's error on the field it names, or above the form."""
    field = exc.details.get("field") if isinstance(exc, ValidationFailed) and exc.details else None
    if field and field in form.fields:
        form.add_error(field, exc.message)
    elif extra is not None and exc.code in ("invalid_slug", "duplicate_slug"):
        extra.add_error("slug", exc.message)
    elif extra is not None and exc.code == "invalid_name":
        extra.add_error("name", exc.message)
    else:
        form.add_error(None, exc.message)


# --- Agents -------------------------------------------------------------------------------

@require_GET
@domain_errors_as_pages
def agent_list(request: HttpRequest) -> HttpResponse:
    """Agents with their status and active version; ``?status=`` filters (htmx swaps the table)."""
    principal = request_principal(request)
    status = request.GET.get("status") or None
    if status not in Agent.Status.values:
        status = None
    return render_page(request, "agents/agent_list.html", {
        "agents": list(selectors.agent_list(principal=principal, status=status)),
        "status": status or "", "statuses": Agent.Status.choices, "can_write": principal.can("agents:write"),
    }, partial="agent-table")


@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def agent_create(request: HttpRequest) -> HttpResponse:
    """The new-agent form: identity and version 1; creates a draft and opens it."""
    principal = request_principal(request)
    principal.require("agents:write")
    agent_form = AgentForm(request.POST or None)
    version_form = _version_form(principal, request.POST or None, initial=AgentVersionForm.initial_from(None))
    del version_form.fields["note"]  # version 1's note is always "Initial version"
    if request.method == "POST" and agent_form.is_valid() & version_form.is_valid():
        try:
            agent = services.agent_create(principal=principal, config=version_form.config(), **agent_form.cleaned_data)
        except DomainError as exc:
            _add_domain_error(version_form, agent_form, exc)
        else:
            messages.success(request, f"Agent “{agent.name}” created as a draft. Publish version 1 to use it.")
            return redirect("agent_detail", agent_id=agent.pk)
    failed = request.method == "POST"
    return render(request, "agents/agent_create.html", {"agent_form": agent_form, "form": version_form},
                  status=422 if failed else 200)


def _detail_context(principal: Principal, agent_id: int) -> dict[str, Any]:
    agent = selectors.agent_get(principal=principal, agent_id=agent_id)
    versions = list(selectors.agent_version_list(principal=principal, agent=agent))
    active = agent.active_version
    for version in versions:
        version.action = _publish_action(agent, version)  # type: ignore[attr-defined]
    collections = dict(_collection_choices(principal))
    pinned = active.endpoint_id if active else None
    return {
        "agent": agent, "versions": versions, "active": active,
        # The pinned endpoint by name (its row lives in the public schema; only read when pinned).
        "active_endpoint": (dict(_endpoint_choices(principal)).get(pinned, f"#{pinned} (deleted)")
                            if pinned else ""),
        "active_collections": [collections.get(i, f"#{i} (deleted)")
                               for i in (active.collection_ids if active else [])],
        "can_write": principal.can("agents:write") and agent.status != Agent.Status.RETIRED,
        "status_actions": _status_actions(agent),
        "latest": versions[0] if versions else None,
    }


def _publish_action(agent: Agent, version: AgentVersion) -> str:
    """'' for the active version, else 'publish' (newer or nothing active) or 'rollback'."""
    active = agent.active_version
    if active is None:
        return "publish"
    if active.pk == version.pk:
        return "" if agent.status == Agent.Status.ACTIVE else "publish"
    return "rollback" if version.number < active.number else "publish"


def _status_actions(agent: Agent) -> list[tuple[str, str, str]]:
    """(status, button label, Bootstrap colour) of the transitions open to ``agent``."""
    actions: list[tuple[str, str, str]] = []
    if agent.status == Agent.Status.ACTIVE:
        actions.append((Agent.Status.PAUSED, "Pause", "warning"))
    if agent.status == Agent.Status.PAUSED and agent.active_version_id is not None:
        actions.append((Agent.Status.ACTIVE, "Resume", "success"))
    if agent.status != Agent.Status.RETIRED:
        actions.append((Agent.Status.RETIRED, "Retire", "danger"))
    return actions


@require_GET
@domain_errors_as_pages
def agent_detail(request: HttpRequest, agent_id: int) -> HttpResponse:
    """An agent: status, the active version's settings, every version with publish / rollback."""
    return render_page(request, "agents/agent_detail.html", _detail_context(request_principal(request), agent_id),
                       partial="agent-state")


@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def agent_version_new(request: HttpRequest, agent_id: int) -> HttpResponse:
    """Edit an agent: a form prefilled from its latest version that saves a new (unpublished) one."""
    principal = request_principal(request)
    principal.require("agents:write")
    agent = selectors.agent_get(principal=principal, agent_id=agent_id)
    latest = selectors.agent_version_list(principal=principal, agent=agent).first()
    initial = AgentVersionForm.initial_from(latest)
    initial["note"] = ""
    form = _version_form(principal, request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            version = services.agent_version_create(principal=principal, agent=agent, config=form.config(),
                                                    note=form.cleaned_data["note"])
        except DomainError as exc:
            _add_domain_error(form, None, exc)
        else:
            messages.success(request, f"Version {version.number} saved. Publish it to make it active.")
            return redirect("agent_detail", agent_id=agent.pk)
    return render(request, "agents/agent_version_new.html", {"agent": agent, "latest": latest, "form": form},
                  status=422 if request.method == "POST" else 200)


@require_POST
@domain_errors_as_pages
def agent_version_publish(request: HttpRequest, agent_id: int, number: int) -> HttpResponse:
    """Publish a version, or roll back to an older one; re-renders the agent's state for htmx."""
    principal = request_principal(request)
    agent = selectors.agent_get(principal=principal, agent_id=agent_id)
    version = selectors.agent_version_get(principal=principal, agent=agent, number=number)
    previous = agent.active_version
    services.agent_version_publish(principal=principal, version=version)
    verb = "Rolled back to" if previous is not None and number < previous.number else "Published"
    return after_write(request, message=f"{verb} version {number}.",
                       fragment=lambda: render(request, "agents/agent_detail.html#agent-state",
                                               _detail_context(principal, agent_id)),
                       redirect_to=reverse("agent_detail", kwargs={"agent_id": agent_id}))


@require_POST
@domain_errors_as_pages
def agent_status(request: HttpRequest, agent_id: int) -> HttpResponse:
    """Pause, resume or retire an agent (``status`` = paused, active or retired)."""
    principal = request_principal(request)
    agent = selectors.agent_get(principal=principal, agent_id=agent_id)
    agent = services.agent_status_set(principal=principal, agent=agent, status=request.POST.get("status", ""))
    return after_write(request, message=f"“{agent.name}” is now {agent.get_status_display().lower()}.",
                       fragment=lambda: render(request, "agents/agent_detail.html#agent-state",
                                               _detail_context(principal, agent_id)),
                       redirect_to=reverse("agent_detail", kwargs={"agent_id": agent_id}))


@dataclasses.dataclass
class FieldDiff:
    """One version field compared: ``rows`` are (tag, old lines, new lines) from difflib's
    opcodes, tag one of equal, replace, delete, insert."""

    name: str
    label: str
    changed: bool
    old: str
    new: str
    rows: list[tuple[str, list[str], list[str]]]


DIFF_LABELS = {
    "system_prompt": "System prompt", "rules": "Rules", "tier": "Tier", "endpoint_id": "Pinned endpoint",
    "temperature": "Temperature", "max_output_tokens": "Max output tokens", "history_window": "History window",
    "collection_ids": "Knowledge collections", "retrieval_top_k": "Retrieval top-k",
    "retrieval_mode": "Retrieval mode", "retrieval_max_chunks_per_document": "Chunks per document",
    "output_format": "Output format", "output_schema": "Output JSON Schema",
    "tools": "Tools", "tool_choice": "Tool choice", "note": "Note",
}


def _field_text(name: str, value: Any, collections: dict[int, str], endpoints: dict[int, str]) -> str:
    if name == "collection_ids":
        return "\n".join(collections.get(i, f"#{i}") for i in value or []) or "(none)"
    if name == "endpoint_id":
        return endpoints.get(value, f"#{value}") if value else "(none: use the tier)"
    if name == "retrieval_max_chunks_per_document":
        return str(value) if value else "(no limit)"
    if name == "tools":
        return "\n".join(value or []) or "(none)"
    if name == "output_schema":
        return json.dumps(value, indent=2, sort_keys=True) if value is not None else "(none)"
    return str(value)


def version_diff(a: AgentVersion, b: AgentVersion, *, collections: dict[int, str],
                 endpoints: dict[int, str]) -> list[FieldDiff]:
    """Every version field of ``a`` and ``b`` compared line by line with ``difflib.SequenceMatcher``
    (collections and endpoints shown by name)."""
    out: list[FieldDiff] = []
    for name in (*services.VERSION_FIELDS, "note"):
        old = _field_text(name, getattr(a, name), collections, endpoints)
        new = _field_text(name, getattr(b, name), collections, endpoints)
        old_lines, new_lines = old.splitlines() or [""], new.splitlines() or [""]
        matcher = difflib.SequenceMatcher(a=old_lines, b=new_lines, autojunk=False)
        rows: list[tuple[str, list[str], list[str]]] = [
            (tag, old_lines[i1:i2], new_lines[j1:j2]) for tag, i1, i2, j1, j2 in matcher.get_opcodes()]
        out.append(FieldDiff(name=name, label=DIFF_LABELS.get(name, name), changed=old != new, old=old, new=new,
                             rows=rows))
    return out


@require_GET
@domain_errors_as_pages
def agent_version_diff(request: HttpRequest, agent_id: int) -> HttpResponse:
    """Two versions side by side (``?a=1&b=3``): changed fields as line diffs, the rest collapsed."""
    principal = request_principal(request)
    agent = selectors.agent_get(principal=principal, agent_id=agent_id)
    versions = list(selectors.agent_version_list(principal=principal, agent=agent))
    numbers = [v.number for v in versions]
    try:
        a_number = int(request.GET.get("a") or (numbers[1] if len(numbers) > 1 else numbers[0]))
        b_number = int(request.GET.get("b") or numbers[0])
    except (ValueError, IndexError):
        return render(request, "errors/error.html", {"status": 400, "message": "a and b are version numbers."},
                      status=400)
    a = selectors.agent_version_get(principal=principal, agent=agent, number=a_number)
    b = selectors.agent_version_get(principal=principal, agent=agent, number=b_number)
    fields = version_diff(a, b, collections=dict(_collection_choices(principal)),
                         endpoints=dict(_endpoint_choices(principal)))
    return render(request, "agents/agent_version_diff.html", {
        "agent": agent, "a": a, "b": b, "numbers": numbers,
        "tools_added": [n for n in b.tools if n not in a.tools],
        "tools_removed": [n for n in a.tools if n not in b.tools],
        "changed": [f for f in fields if f.changed], "unchanged": [f for f in fields if not f.changed],
    })


# --- Chat ---------------------------------------------------------------------------------

@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def chat_session_list(request: HttpRequest) -> HttpResponse:
    """The caller's own chat sessions; POST opens a new one and goes to it."""
    principal = request_principal(request)
    agents = [(a.pk, a.name) for a in selectors.agent_chat_list(principal=principal)]
    form = ChatSessionForm(request.POST or None, agents=agents)
    if request.method == "POST" and form.is_valid():
        try:
            agent = selectors.agent_for_chat(principal=principal, agent_id=form.cleaned_data["agent"])
            session = services.chat_session_create(principal=principal, agent=agent,
                                                   title=form.cleaned_data["title"])
        except DomainError as exc:
            form.add_error(None, exc.message)
        else:
            return redirect("chat_session_detail", session_id=session.pk)
    return render_page(request, "agents/chat_session_list.html", {
        "sessions": list(selectors.session_list(principal=principal)[:200]), "form": form,
    }, partial="session-table", status=422 if form.errors else 200)


@dataclasses.dataclass
class ChatEntry:
    """One row of the chat history: a question with its turn and answer, or a lone message."""

    message: Message
    turn: Turn | None = None
    answer: Message | None = None
    answer_html: str = ""
    calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # chat_html.tool_card dicts
    cost: dict[str, Any] | None = None  # {"cost": Decimal, "currency": str} of the turn's usage events

    @property
    def citations(self) -> list[dict[str, Any]]:
        """The numbered sources: the answer's, else those retrieved so far for the turn."""
        if self.answer is not None and self.answer.citations:
            return list(self.answer.citations)
        return list(self.turn.retrieved) if self.turn is not None else []


def chat_entries(messages_: list[Message]) -> list[ChatEntry]:
    """Pair each question with its turn and the message that answered it; answers are rendered
    from Markdown to sanitized HTML (``chat_html.render_markdown``). Messages without a turn
    (history sent along over the OpenAI-compatible API) stand alone."""
    by_id = {m.pk: m for m in messages_}
    answered: set[int] = set()
    entries: list[ChatEntry] = []
    for message in messages_:
        turn = getattr(message, "turn", None) if message.role == Message.Role.USER else None
        if turn is not None:
            answer = by_id.get(turn.assistant_message_id) if turn.assistant_message_id else None
            if answer is not None:
                answered.add(answer.pk)
            entries.append(ChatEntry(message=message, turn=turn, answer=answer,
                                     answer_html=mark_safe(render_markdown(answer.content)) if answer else ""))  # noqa: S308 (sanitized by nh3)
        elif message.pk not in answered:
            html = render_markdown(message.content) if message.role == Message.Role.ASSISTANT else ""
            entries.append(ChatEntry(message=message, answer_html=mark_safe(html)))  # noqa: S308 (sanitized by nh3)
    return entries


def _chat_context(principal: Principal, session: ChatSession) -> dict[str, Any]:
    entries = chat_entries(list(selectors.message_page_list(principal=principal, session=session)))
    calls: dict[int, list[ToolCall]] = {}
    for call in selectors.tool_call_list(principal=principal, session=session):
        calls.setdefault(call.turn_id, []).append(call)
    costs = selectors.turn_cost_map(principal=principal, session=session,
                                    turn_ids=[e.turn.pk for e in entries if e.turn is not None])
    for entry in entries:
        if entry.turn is not None and entry.turn.pk in calls:
            entry.calls = tool_cards_from_rows(calls[entry.turn.pk])
        if entry.turn is not None:
            entry.cost = costs.get(entry.turn.pk)
    return {"session": session, "entries": entries, "form": ChatMessageForm(),
            "can_review": principal.can("approvals:read"),
            "ws_url": f"/ws/chat/{session.pk}/",
            "send_url": reverse("chat_message_send", kwargs={"session_id": session.pk}),
            "cancel_url": reverse("chat_turn_cancel", kwargs={"session_id": session.pk}),
            "runnable": session.agent.status == Agent.Status.ACTIVE and session.agent.active_version_id is not None}


@require_GET
@domain_errors_as_pages
def chat_session_detail(request: HttpRequest, session_id: int) -> HttpResponse:
    """The chat page: history, and a form that sends over the session's WebSocket."""
    principal = request_principal(request)
    session = selectors.session_get(principal=principal, session_id=session_id)
    return render(request, "agents/chat_session_detail.html", _chat_context(principal, session))


@require_POST
@domain_errors_as_pages
def chat_message_send(request: HttpRequest, session_id: int) -> HttpResponse:
    """Without JavaScript: send the message (as the socket would) and come back to the page."""
    principal = request_principal(request)
    session = selectors.session_get(principal=principal, session_id=session_id)
    form = ChatMessageForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Write a message first.")
    else:
        try:
            services.chat_message_send(principal=principal, session=session, content=form.cleaned_data["content"])
        except DomainError as exc:
            messages.error(request, exc.message)
    return redirect("chat_session_detail", session_id=session_id)


@require_POST
@domain_errors_as_pages
def chat_turn_cancel(request: HttpRequest, session_id: int) -> HttpResponse:
    """Without JavaScript: stop the turn ``turn_id`` and come back to the page."""
    principal = request_principal(request)
    session = selectors.session_get(principal=principal, session_id=session_id)
    try:
        turn_id = int(request.POST.get("turn_id", ""))
    except ValueError:
        messages.error(request, "Which answer should stop?")
        return redirect("chat_session_detail", session_id=session_id)
    turn = selectors.turn_get(principal=principal, session=session, turn_id=turn_id)
    services.turn_cancel(principal=principal, turn=turn)
    return redirect("chat_session_detail", session_id=session_id)
