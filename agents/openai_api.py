"""OpenAI-compatible endpoints at ``/api/v1/openai/`` (``model`` is an agent slug).

Point an OpenAI client at ``https://<tenant host>/api/v1/openai`` with an API key of the tenant
(``chat`` scope) as its API key::

    client = openai.OpenAI(base_url="https://acme.example.com/api/v1/openai", api_key="aop_...")
    client.chat.completions.create(model="helpdesk", messages=[{"role": "user", "content": "Hi"}])

- ``GET /models`` lists the active agents as model objects (``id`` = the agent's slug).
- ``POST /chat/completions`` runs one turn of the agent in a new session (channel ``openai``).
  The last message must be the user's question; earlier ``user`` and ``assistant`` messages
  are stored in the session as its history (the agent's ``history_window`` applies).
  **Client ``system`` (and ``developer``) messages are ignored**: the agent's published version
  owns the system prompt and rules, and letting a caller replace them would bypass what the
  agent's editors published. Sampling options (``temperature``, ``max_tokens``, ``tools``...)
  are ignored for the same reason; ``n`` must be 1.
- The agent's own tools run server side (the tool loop): the answer holds only its text, never
  tool events. A turn that parks on a tool call needing approval answers 409
  ``awaiting_approval`` (``details.approval_id``); streaming, ``data: {"error": {"code":
  "awaiting_approval", "param": "<approval id>"}}``. The turn resumes after the decision in its
  session (``GET /api/v1/sessions/{id}/turns/{turn_id}``).
- ``stream: true`` answers with ``chat.completion.chunk`` Server-Sent Events ending with
  ``data: [DONE]``; with ``stream_options.include_usage`` the last chunk before it carries
  ``usage`` (and every chunk has ``"usage": null``, as OpenAI does). A turn that fails while
  streaming sends ``data: {"error": {...}}`` (the OpenAI SDK raises ``APIError``).

Errors use the project's one error body (``config.api``), ``{"error": {"code", "message", ...}}``,
which OpenAI's SDKs read like their own: 401 -> ``AuthenticationError``, 403 ->
``PermissionDeniedError``, 404 (unknown model) -> ``NotFoundError``, 409 (agent not active) ->
``ConflictError``, 422 -> ``UnprocessableEntityError``, 502/504 (turn failed / not finished in
``CHAT_SYNC_WAIT_SECONDS``) -> ``InternalServerError``, 429 ``budget_exceeded`` /
``quota_exceeded`` (a blocking budget or the plan's monthly token quota has no room: checked
before the turn, and for a turn refused at its model call) -> ``RateLimitError``. The SDKs retry 409 and 5xx by default;
each retry is a new turn, so set ``max_retries=0`` if that matters.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest
from django.utils import timezone
from ninja import Router

from agents import selectors, services
from agents.api import BUDGET_CODES, STREAM_GRACE_SECONDS, turn_outcome_error
from agents.models import ChatSession, Message
from agents.schemas import OpenAIChatCompletion, OpenAIChatIn, OpenAIChatMessage, OpenAIModelList
from agents.streaming import KEEP_ALIVE, new_turn_options, sse_response, turn_events_or_keepalives, turn_wait
from billing.services.budgets import budget_room_check
from config.api import principal_of
from config.errors import ValidationFailed

router = Router(tags=["openai-compatible"])

_HISTORY_ROLES = {"user": Message.Role.USER, "assistant": Message.Role.ASSISTANT}
_IGNORED_ROLES = {"system", "developer", "tool", "function"}


def _text(content: str | list[dict[str, Any]] | None) -> str:
    """The text of a message: a string, or the ``text`` parts of a content list joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def conversation_split(messages: list[OpenAIChatMessage]) -> tuple[str, list[dict[str, str]]]:
    """``(question, history)`` from an OpenAI ``messages`` list.

    ``question`` is the last message, which must be ``user``; ``history`` is the earlier
    ``user``/``assistant`` messages as ``{"role", "content"}`` (empty ones and system,
    developer and tool messages dropped). Raises ``ValidationFailed`` for a last message that
    is not the user's, or an unknown role.
    """
    for message in messages:
        if message.role not in _HISTORY_ROLES and message.role not in _IGNORED_ROLES:
            raise ValidationFailed(f"Unknown message role '{message.role}'.", code="invalid_role")
    last = messages[-1]
    if last.role != "user":
        raise ValidationFailed("The last message must have role 'user'.", code="last_message_not_user")
    history = [{"role": str(_HISTORY_ROLES[m.role]), "content": _text(m.content)} for m in messages[:-1]
               if m.role in _HISTORY_ROLES and _text(m.content).strip()]
    return _text(last.content), history


@router.get("/models", response=OpenAIModelList, summary="Active agents as OpenAI model objects")
def model_list(request: HttpRequest) -> dict[str, Any]:
    principal = principal_of(request)
    owner = principal.tenant.slug if principal.tenant is not None else "tenant"
    agents = selectors.agent_chat_list(principal=principal)
    return {"object": "list", "data": [{"id": a.slug, "object": "model", "created": int(a.created_at.timestamp()),
                                        "owned_by": owner} for a in agents]}


@router.post("/chat/completions", response={200: OpenAIChatCompletion},
             summary="Chat with an agent in OpenAI's chat-completions format")
def chat_completions(request: HttpRequest, payload: OpenAIChatIn) -> Any:
    """One turn of the agent named by ``model`` in a new ``openai`` session: a
    ``chat.completion`` (with ``usage``), or ``chat.completion.chunk`` events with ``stream``.
    Client system messages are ignored (the agent's version owns the system prompt)."""
    received = time.time()
    principal = principal_of(request)
    if payload.n != 1:
        raise ValidationFailed("Only n=1 is supported.", code="unsupported_n")
    question, history = conversation_split(payload.messages)
    agent = selectors.agent_for_chat(principal=principal, slug=payload.model)
    # A blocking budget or the plan quota with no room left answers 429 before any turn exists.
    budget_room_check(tenant=request.tenant, agent_slug=agent.slug,  # type: ignore[attr-defined]
                      api_key_id=principal.api_key.key_id if principal.api_key is not None else "")
    # One transaction: a message the service refuses leaves no empty session behind.
    with transaction.atomic():
        session = services.chat_session_create(principal=principal, agent=agent, title=question.strip()[:80],
                                               channel=ChatSession.Channel.OPENAI)
        # A stream sends the turn's task itself once it listens (``new_turn_options``).
        turn = services.chat_message_send(principal=principal, session=session, content=question, history=history,
                                          marks={"received": received}, enqueue=not payload.stream)
    schema: str = request.tenant.schema_name  # type: ignore[attr-defined]
    completion_id = f"chatcmpl-{turn.pk}"
    created = int(turn.queued_at.timestamp())
    if payload.stream:
        include_usage = bool(payload.stream_options and payload.stream_options.include_usage)
        wait = max((turn.deadline - timezone.now()).total_seconds(), 0.0) + STREAM_GRACE_SECONDS
        return sse_response(completion_chunks(schema=schema, session_id=session.pk, turn_id=turn.pk,
                                              wait_seconds=wait, completion_id=completion_id, created=created,
                                              model=agent.slug, include_usage=include_usage,
                                              options=new_turn_options(turn, {"received": received,
                                                                              "accepted": time.time()},
                                                                       schema=schema)))
    final = turn_wait(schema=schema, session_id=session.pk, turn_id=turn.pk,
                      wait_seconds=settings.CHAT_SYNC_WAIT_SECONDS)
    failure = turn_outcome_error(request, final=final, turn_id=turn.pk, session_id=session.pk)
    if failure is not None or final is None:
        return failure
    usage = final.get("usage") or {}
    prompt_tokens, completion_tokens = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": agent.slug,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": str(final.get("content") or "")},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def completion_chunks(*, schema: str, session_id: int, turn_id: int, wait_seconds: float,
                            completion_id: str, created: int, model: str,
                            include_usage: bool, options: dict[str, Any] | None = None) -> AsyncIterator[str]:
    """The turn's events as OpenAI ``chat.completion.chunk`` SSE lines, then ``data: [DONE]``.

    First chunk: ``delta: {"role": "assistant", "content": ""}``; one chunk per ``token.delta``;
    a ``finish_reason: "stop"`` chunk on completion or cancellation; with ``include_usage`` a
    last chunk with ``choices: []`` and ``usage``. ``options``: ``streaming.turn_events``' ``start``
    and ``after_subscribe`` (``streaming.new_turn_options``). A failed or timed-out turn gives
    ``data: {"error": {"message", "type", "code"}}`` instead of the stop chunk, as does a turn
    that parks for an approval (code ``awaiting_approval``, ``param`` the approval id).
    """
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        body: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return _data(body)

    yield chunk({"role": "assistant", "content": ""})
    stream = turn_events_or_keepalives(schema=schema, session_id=session_id, turn_id=turn_id,
                                       wait_seconds=wait_seconds, **(options or {}))
    async with contextlib.aclosing(stream):
        async for event in stream:
            if event is None:
                yield KEEP_ALIVE
                continue
            name = event["event"]
            if name == "token.delta":
                yield chunk({"content": event["text"]})
            elif name in ("turn.completed", "turn.cancelled"):
                yield chunk({}, "stop")
                if include_usage:
                    usage = event.get("usage") or {}
                    prompt, completion = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
                    yield _data({**base, "choices": [], "usage": {"prompt_tokens": prompt,
                                                                  "completion_tokens": completion,
                                                                  "total_tokens": prompt + completion}})
            elif name == "approval.requested":
                yield _data({"error": {"message": f"The agent's tool call waits for approval "
                                                  f"{event.get('approval_id')}; the answer continues after "
                                                  "the decision.",
                                       "type": "invalid_request_error", "code": "awaiting_approval",
                                       "param": str(event.get("approval_id"))}})
            elif name in ("turn.failed", "error"):
                error = event.get("error") or {}
                kind = "insufficient_quota" if error.get("code") in BUDGET_CODES else "server_error"
                yield _data({"error": {"message": error.get("message") or "The turn failed.",
                                       "type": kind, "code": error.get("code") or "turn_failed"}})
    yield "data: [DONE]\n\n"
