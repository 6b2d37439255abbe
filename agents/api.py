"""REST endpoints for agents, versions, chat sessions and messages (``/api/v1/``).

Agents and versions need ``agents:read`` to read and ``agents:write`` to change. Sessions are
private to the principal (API key or member) that opened them and need ``chat``; another
principal gets 404.

``POST /sessions/{id}/messages`` starts a turn. With ``"stream": true`` the answer comes as
Server-Sent Events (``text/event-stream``), one per turn event of ``agents.runtime.events``::

    event: token.delta
    data: {"event": "token.delta", "turn_id": 7, "offset": 0, "text": "The"}

in the order ``turn.queued``, ``turn.started``, ``citations`` (when the agent retrieves),
``token.delta``..., then one of ``turn.completed`` / ``turn.failed`` / ``turn.cancelled``, after
which the stream ends. The deltas concatenate to the final ``content``. If the turn outlives
its deadline the stream ends with ``event: error`` (code ``stream_timeout``).

When the agent calls tools, ``tool.call`` (``call_id``, ``tool``, ``arguments``) and
``tool.result`` (``call_id``, ``status`` ok/error/rejected, ``excerpt``) come between the deltas.
A call of a tool that requires approval parks the turn: the stream then ends after
``approval.requested`` (``approval_id``, ``call_id``, ``tool``, ``arguments``, ``expires_at``).
The turn is not final; after the decision it resumes in the same session: follow it with
``GET /sessions/{id}/turns/{turn_id}`` (``status``, ``tool_calls``, ``approval_id``).

Without ``stream`` the call waits up to ``CHAT_SYNC_WAIT_SECONDS`` and answers with the
assistant message (200); a failed turn answers 502 with the turn's error code, a cancelled
one 409 (``turn_cancelled``), and a turn still unfinished 504 (``turn_not_finished``, with
``details.turn_id`` to poll ``GET /sessions/{id}/turns/{turn_id}``); a turn that parked for an
approval answers 202 with the turn (``TurnOut``, status ``awaiting_approval``).
"""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from ninja import Query, Router, Schema, Status

from agents import selectors, services
from agents.models import Agent, AgentVersion, ChatSession, Message, Turn
from agents.schemas import (
    AgentIn,
    AgentOut,
    AgentPage,
    AgentPatch,
    AgentStatusIn,
    MessageIn,
    MessageOut,
    MessagePage,
    SessionIn,
    SessionOut,
    SessionPage,
    TurnOut,
    VersionIn,
    VersionOut,
    VersionPage,
)
from agents.streaming import PAUSE_EVENTS, new_turn_options, sse_response, turn_sse, turn_wait
from config.api import error_response, keyset_page, principal_of
from config.errors import ValidationFailed
from tenants.principal import Principal

router = Router(tags=["agents"])

# Time an SSE stream waits past the turn's deadline for the sweeper to fail a lost turn.
STREAM_GRACE_SECONDS = 15.0


class PageParams(Schema):
    limit: int = 50
    cursor: str | None = None


class AgentFilters(PageParams):
    status: str | None = None


class SessionFilters(PageParams):
    agent_id: int | None = None


def agent_out(agent: Agent) -> dict[str, Any]:
    """An agent as ``AgentOut`` (expects ``active_version`` selected)."""
    version = agent.active_version
    return {"id": agent.pk, "slug": agent.slug, "name": agent.name, "description": agent.description,
            "status": agent.status, "active_version_number": version.number if version else None,
            "created_at": agent.created_at, "updated_at": agent.updated_at}


def version_out(version: AgentVersion, *, active_version_id: int | None) -> dict[str, Any]:
    """A version as ``VersionOut``; ``is_active`` compares with the agent's active version id."""
    return {"id": version.pk, "agent_id": version.agent_id, "number": version.number,
            "is_active": version.pk == active_version_id,
            **{name: getattr(version, name) for name in services.VERSION_FIELDS},
            "note": version.note, "created_by": version.created_by, "created_at": version.created_at}


def session_out(session: ChatSession) -> dict[str, Any]:
    """A session as ``SessionOut`` (expects ``agent`` selected)."""
    return {"id": session.pk, "agent_id": session.agent_id, "agent_slug": session.agent.slug, "title": session.title,
            "channel": session.channel, "created_at": session.created_at, "updated_at": session.updated_at}


def _turn_id_of(message: Message) -> int | None:
    for related in ("turn", "answered_turn"):
        try:
            return int(getattr(message, related).pk)
        except ObjectDoesNotExist:
            continue
    return None


def message_out(message: Message) -> dict[str, Any]:
    """A message as ``MessageOut`` (select ``turn`` and ``answered_turn`` to avoid a query each)."""
    return {"id": message.pk, "session_id": message.session_id, "role": message.role, "content": message.content,
            "citations": message.citations or [], "input_tokens": message.input_tokens,
            "output_tokens": message.output_tokens, "turn_id": _turn_id_of(message),
            "created_at": message.created_at}


def turn_out(turn: Turn) -> dict[str, Any]:
    """A turn as ``TurnOut``; ``error`` is set for failed turns only, ``approval_id`` while the
    turn awaits an approval. Two queries: the turn's tool calls, and its pending approval."""
    from agents.models import ApprovalRequest

    error = {"code": turn.error_code, "message": turn.error_message} if turn.status == Turn.Status.FAILED else None
    calls = [{"call_id": c.call_id, "tool": c.tool_name,
              "arguments": c.arguments if c.arguments is not None else c.arguments_raw, "status": c.status,
              "error_code": c.error_code, "output_excerpt": c.output_excerpt, "duration_ms": c.duration_ms}
             for c in turn.tool_calls.order_by("sequence")]
    approval_id = None
    if turn.status == Turn.Status.AWAITING_APPROVAL:
        approval_id = (ApprovalRequest.objects.filter(turn_id=turn.pk, status=ApprovalRequest.Status.PENDING)
                       .order_by("-pk").values_list("pk", flat=True).first())
    return {"tool_calls": calls, "approval_id": approval_id,
            "id": turn.pk, "session_id": turn.session_id, "status": turn.status,
            "agent_version_id": turn.agent_version_id, "user_message_id": turn.user_message_id,
            "assistant_message_id": turn.assistant_message_id, "cancel_requested": turn.cancel_requested,
            "model": turn.model, "endpoint_name": turn.endpoint_name, "input_tokens": turn.input_tokens,
            "output_tokens": turn.output_tokens, "error": error, "queued_at": turn.queued_at,
            "started_at": turn.started_at, "first_token_at": turn.first_token_at, "finished_at": turn.finished_at}


# --- Agents and versions ---------------------------------------------------------------------

@router.get("/agents", response=AgentPage, summary="Agents, oldest first")
def agent_list(request: HttpRequest, filters: Query[AgentFilters]) -> dict[str, Any]:
    agents = selectors.agent_list(principal=principal_of(request), status=filters.status)
    rows, cursor = keyset_page(agents, cursor=filters.cursor, limit=filters.limit, descending=False)
    return {"items": [agent_out(a) for a in rows], "next_cursor": cursor}


@router.post("/agents", response={201: AgentOut}, summary="Create a draft agent with its version 1")
def agent_create(request: HttpRequest, payload: AgentIn) -> Status[dict[str, Any]]:
    principal = principal_of(request)
    # The answer reads the agent back, which needs agents:read: refuse before anything is written.
    principal.require("agents:read")
    config = payload.config.dict(exclude_unset=True) if payload.config else {}
    agent = services.agent_create(principal=principal, slug=payload.slug, name=payload.name,
                                  description=payload.description, config=config)
    return Status(201, agent_out(selectors.agent_get(principal=principal, agent_id=agent.pk)))


@router.get("/agents/{agent_id}", response=AgentOut, summary="One agent")
def agent_get(request: HttpRequest, agent_id: int) -> dict[str, Any]:
    return agent_out(selectors.agent_get(principal=principal_of(request), agent_id=agent_id))


@router.patch("/agents/{agent_id}", response=AgentOut, summary="Rename or re-describe an agent")
def agent_update(request: HttpRequest, agent_id: int, payload: AgentPatch) -> dict[str, Any]:
    principal = principal_of(request)
    agent = selectors.agent_get(principal=principal, agent_id=agent_id)
    services.agent_update(principal=principal, agent=agent, **payload.dict(exclude_unset=True))
    return agent_out(selectors.agent_get(principal=principal, agent_id=agent_id))


@router.post("/agents/{agent_id}/status", response=AgentOut,
             summary="Pause, resume (active) or retire an agent")
def agent_status_set(request: HttpRequest, agent_id: int, payload: AgentStatusIn) -> dict[str, Any]:
    principal = principal_of(request)
    agent = selectors.agent_get(principal=principal, agent_id=agent_id)
    services.agent_status_set(principal=principal, agent=agent, status=payload.status)
    return agent_out(selectors.agent_get(principal=principal, agent_id=agent_id))


@router.get("/agents/{agent_id}/versions", response=VersionPage, summary="An agent's versions, newest first")
def agent_version_list(request: HttpRequest, agent_id: int, page: Query[PageParams]) -> dict[str, Any]:
    principal = principal_of(request)
    agent = selectors.agent_get(principal=principal, agent_id=agent_id)
    rows, cursor = keyset_page(selectors.agent_version_list(principal=principal, agent=agent), cursor=page.cursor,
                               limit=page.limit, key="number")
    return {"items": [version_out(v, active_version_id=agent.active_version_id) for v in rows],
            "next_cursor": cursor}


@router.post("/agents/{agent_id}/versions", response={201: VersionOut},
             summary="A new version: the latest one's fields overridden by config (not yet active)")
def agent_version_create(request: HttpRequest, agent_id: int, payload: VersionIn) -> Status[dict[str, Any]]:
    principal = principal_of(request)
    agent = selectors.agent_get(principal=principal, agent_id=agent_id)
    version = services.agent_version_create(principal=principal, agent=agent,
                                            config=payload.config.dict(exclude_unset=True), note=payload.note)
    return Status(201, version_out(version, active_version_id=agent.active_version_id))


@router.get("/agents/{agent_id}/versions/{number}", response=VersionOut, summary="One version")
def agent_version_get(request: HttpRequest, agent_id: int, number: int) -> dict[str, Any]:
    principal = principal_of(request)
    agent = selectors.agent_get(principal=principal, agent_id=agent_id)
    version = selectors.agent_version_get(principal=principal, agent=agent, number=number)
    return version_out(version, active_version_id=agent.active_version_id)


@router.post("/agents/{agent_id}/versions/{number}/publish", response=AgentOut,
             summary="Make a version the active one (publish, or roll back to an older one)")
def agent_version_publish(request: HttpRequest, agent_id: int, number: int) -> dict[str, Any]:
    principal = principal_of(request)
    agent = selectors.agent_get(principal=principal, agent_id=agent_id)
    version = selectors.agent_version_get(principal=principal, agent=agent, number=number)
    services.agent_version_publish(principal=principal, version=version)
    return agent_out(selectors.agent_get(principal=principal, agent_id=agent_id))


# --- Sessions, messages and turns ------------------------------------------------------------

@router.post("/sessions", response={201: SessionOut}, tags=["chat"],
             summary="Open a chat session with an active agent (agent_id or agent slug)")
def session_create(request: HttpRequest, payload: SessionIn) -> Status[dict[str, Any]]:
    principal = principal_of(request)
    if payload.agent_id is None and not payload.agent:
        raise ValidationFailed("Give agent_id or agent (the agent's slug).", code="agent_required")
    agent = selectors.agent_for_chat(principal=principal, agent_id=payload.agent_id, slug=payload.agent)
    session = services.chat_session_create(principal=principal, agent=agent, title=payload.title,
                                           channel=ChatSession.Channel.API)
    return Status(201, session_out(session))


@router.get("/sessions", response=SessionPage, tags=["chat"], summary="The caller's own sessions, newest first")
def session_list(request: HttpRequest, filters: Query[SessionFilters]) -> dict[str, Any]:
    principal = principal_of(request)
    sessions = selectors.session_list(principal=principal)
    if filters.agent_id is not None:
        sessions = sessions.filter(agent_id=filters.agent_id)
    rows, cursor = keyset_page(sessions, cursor=filters.cursor, limit=filters.limit)
    return {"items": [session_out(s) for s in rows], "next_cursor": cursor}


@router.get("/sessions/{session_id}", response=SessionOut, tags=["chat"], summary="One of the caller's sessions")
def session_get(request: HttpRequest, session_id: int) -> dict[str, Any]:
    return session_out(selectors.session_get(principal=principal_of(request), session_id=session_id))


@router.delete("/sessions/{session_id}", response={204: None}, tags=["chat"],
               summary="Delete a session with its messages and turns")
def session_delete(request: HttpRequest, session_id: int) -> Status[None]:
    principal = principal_of(request)
    services.chat_session_delete(principal=principal,
                                 session=selectors.session_get(principal=principal, session_id=session_id))
    return Status(204, None)


@router.get("/sessions/{session_id}/messages", response=MessagePage, tags=["chat"],
            summary="A session's messages, oldest first, with citations and token counts")
def message_list(request: HttpRequest, session_id: int, page: Query[PageParams]) -> dict[str, Any]:
    principal = principal_of(request)
    session = selectors.session_get(principal=principal, session_id=session_id)
    rows, cursor = keyset_page(selectors.message_page_list(principal=principal, session=session),
                               cursor=page.cursor, limit=page.limit, descending=False)
    return {"items": [message_out(m) for m in rows], "next_cursor": cursor}


@router.post("/sessions/{session_id}/messages", response={200: MessageOut, 202: TurnOut}, tags=["chat"],
             summary="Send a message; the answer as Server-Sent Events (stream) or when it is done")
def message_send(request: HttpRequest, session_id: int, payload: MessageIn) -> Any:
    """Start a turn. ``stream: true``: ``text/event-stream`` of the turn's events (see the module
    docstring), ending after the final one, or after ``approval.requested`` when the turn parks
    for an approval (it is not final: follow it with ``GET /sessions/{id}/turns/{turn_id}``).
    Otherwise 200 with the assistant message, 202 with the turn (status ``awaiting_approval``,
    ``approval_id``) when it parked, 502 (turn failed, its error code), 409 ``turn_cancelled`` or
    504 ``turn_not_finished`` (``details.turn_id``). Before any turn: 422 empty or overlong
    content, 409 agent not active or a turn unfinished (also one awaiting approval)."""
    received = time.time()
    principal = principal_of(request)
    session = selectors.session_get(principal=principal, session_id=session_id)
    # A stream sends the turn's task itself once it listens (``new_turn_options``).
    turn = services.chat_message_send(principal=principal, session=session, content=payload.content,
                                      marks={"received": received}, enqueue=not payload.stream)
    schema: str = request.tenant.schema_name  # type: ignore[attr-defined]
    if payload.stream:
        wait = max((turn.deadline - timezone.now()).total_seconds(), 0.0) + STREAM_GRACE_SECONDS
        marks = {"received": received, "accepted": time.time()}
        return sse_response(turn_sse(schema=schema, session_id=session.pk, turn_id=turn.pk, wait_seconds=wait,
                                     **new_turn_options(turn, marks, schema=schema)))
    final = turn_wait(schema=schema, session_id=session.pk, turn_id=turn.pk,
                      wait_seconds=settings.CHAT_SYNC_WAIT_SECONDS)
    if final is not None and final["event"] in PAUSE_EVENTS:
        return Status(202, turn_out(selectors.turn_get(principal=principal, session=session, turn_id=turn.pk)))
    return _final_answer(request, principal=principal, session=session, turn_id=turn.pk, final=final)


BUDGET_CODES = frozenset({"budget_exceeded", "quota_exceeded"})


def turn_outcome_error(request: HttpRequest, *, final: dict[str, Any] | None, turn_id: int,
                       session_id: int) -> JsonResponse | None:
    """The API's error body for a turn that did not complete, else ``None``.

    ``final`` is ``streaming.turn_wait``'s result: ``None`` (still running) gives 504
    ``turn_not_finished``; ``approval.requested`` (the turn parked) gives 409
    ``awaiting_approval`` with ``details.approval_id``; ``turn.failed`` gives 502 with the turn's
    error code (429 for ``budget_exceeded`` / ``quota_exceeded``); ``turn.cancelled`` gives 409
    ``turn_cancelled``. ``details`` carry ``turn_id`` and ``session_id``.
    """
    details: dict[str, Any] = {"turn_id": turn_id, "session_id": session_id}
    if final is not None and final["event"] in PAUSE_EVENTS:
        approval_id = final.get("approval_id")
        return error_response(request, status=409, code="awaiting_approval",
                              message=f"The agent's tool call waits for approval {approval_id} "
                                      f"(tool {final.get('tool')}); the answer continues after the decision.",
                              details={**details, "approval_id": approval_id})
    if final is None:
        return error_response(request, status=504, code="turn_not_finished",
                              message=f"The answer did not finish within {settings.CHAT_SYNC_WAIT_SECONDS:g} s; "
                                      "it continues: read the turn later or stream it.", details=details)
    if final["event"] == "turn.failed":
        error = final.get("error") or {}
        # A budget or quota refused the model call: the client's spend, not the model, failed.
        status = 429 if error.get("code") in BUDGET_CODES else 502
        return error_response(request, status=status, code=error.get("code") or "turn_failed",
                              message=error.get("message") or "The turn failed.", details=details)
    if final["event"] == "turn.cancelled":
        return error_response(request, status=409, code="turn_cancelled", message="The turn was cancelled.",
                              details={**details, "message_id": final.get("message_id")})
    return None


def _final_answer(request: HttpRequest, *, principal: Principal, session: ChatSession, turn_id: int,
                  final: dict[str, Any] | None) -> Any:
    """The assistant message of a completed turn, else the API's error body for the outcome."""
    failure = turn_outcome_error(request, final=final, turn_id=turn_id, session_id=session.pk)
    if failure is not None or final is None:
        return failure
    message_id = final.get("message_id")
    message = (selectors.message_page_list(principal=principal, session=session).filter(pk=message_id).first()
               if message_id is not None else None)
    if message is None:
        return error_response(request, status=502, code="empty_answer", message="The model returned no text.",
                              details={"turn_id": turn_id, "session_id": session.pk})
    return message_out(message)


@router.get("/sessions/{session_id}/turns/{turn_id}", response=TurnOut, tags=["chat"],
            summary="A turn's state, timings, token counts and error")
def turn_get(request: HttpRequest, session_id: int, turn_id: int) -> dict[str, Any]:
    principal = principal_of(request)
    session = selectors.session_get(principal=principal, session_id=session_id)
    return turn_out(selectors.turn_get(principal=principal, session=session, turn_id=turn_id))


@router.post("/sessions/{session_id}/turns/{turn_id}/cancel", response=TurnOut, tags=["chat"],
             summary="Stop a turn (a finished turn is left as it is)")
def turn_cancel(request: HttpRequest, session_id: int, turn_id: int) -> dict[str, Any]:
    principal = principal_of(request)
    session = selectors.session_get(principal=principal, session_id=session_id)
    turn = services.turn_cancel(principal=principal,
                                turn=selectors.turn_get(principal=principal, session=session, turn_id=turn_id))
    return turn_out(turn)
