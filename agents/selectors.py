"""Reads on agents and chat, scoped to the current tenant's schema and to the caller.

Sessions are private to the principal that opened them (the member, or the API key); anyone
else, in this tenant or another, gets "not found" rather than a hint that the session exists.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Q, QuerySet

from agents.models import Agent, AgentVersion, ChatSession, Message, ToolCall, Turn
from config.errors import NotFound
from tenants.principal import Principal


def agent_list(*, principal: Principal, status: str | None = None) -> QuerySet[Agent]:
    """Agents by name with their active version. Raises ``Forbidden`` without ``agents:read``."""
    principal.require("agents:read")
    queryset = Agent.objects.select_related("active_version").order_by("name")
    if status:
        queryset = queryset.filter(status=status)
    return queryset


def agent_get(*, principal: Principal, agent_id: int | None = None, slug: str | None = None) -> Agent:
    """One agent by id or slug; ``NotFound`` otherwise."""
    queryset = agent_list(principal=principal)
    agent = (queryset.filter(pk=agent_id) if agent_id is not None else queryset.filter(slug=slug)).first()
    if agent is None:
        raise NotFound("No such agent.")
    return agent


def agent_version_list(*, principal: Principal, agent: Agent) -> QuerySet[AgentVersion]:
    principal.require("agents:read")
    return AgentVersion.objects.filter(agent=agent).order_by("-number")


def agent_version_get(*, principal: Principal, agent: Agent, number: int) -> AgentVersion:
    version = agent_version_list(principal=principal, agent=agent).filter(number=number).first()
    if version is None:
        raise NotFound(f"Agent '{agent.slug}' has no version {number}.")
    return version


def session_owner_q(principal: Principal) -> Q:
    """The filter on ``ChatSession`` that keeps the sessions ``principal`` opened (none for a
    principal that is neither a key nor a member)."""
    if principal.api_key is not None:
        return Q(api_key_id=principal.api_key.key_id)
    if principal.user is not None:
        return Q(user_id=principal.user.pk)
    return Q(pk__in=[])


def session_list(*, principal: Principal, agent: Agent | None = None) -> QuerySet[ChatSession]:
    """The caller's own sessions, most recently active first. Raises ``Forbidden`` without ``chat``."""
    principal.require("chat")
    queryset = (ChatSession.objects.filter(session_owner_q(principal)).select_related("agent")
                .order_by("-updated_at", "-pk"))
    if agent is not None:
        queryset = queryset.filter(agent=agent)
    return queryset


def session_get(*, principal: Principal, session_id: int) -> ChatSession:
    session = session_list(principal=principal).filter(pk=session_id).first()
    if session is None:
        raise NotFound("No such chat session.")
    return session


def message_list(*, principal: Principal, session: ChatSession) -> QuerySet[Message]:
    principal.require("chat")
    return Message.objects.filter(session=session).order_by("pk")


def turn_list(*, principal: Principal, session: ChatSession) -> QuerySet[Turn]:
    principal.require("chat")
    return Turn.objects.filter(session=session).order_by("pk")


def turn_get(*, principal: Principal, session: ChatSession, turn_id: int) -> Turn:
    turn = turn_list(principal=principal, session=session).filter(pk=turn_id).first()
    if turn is None:
        raise NotFound("No such turn.")
    return turn


def turn_latest(*, session: ChatSession) -> Turn | None:
    """The session's most recent turn (for showing its state on (re)connect)."""
    return Turn.objects.filter(session=session).order_by("-pk").first()


def agent_for_chat(*, principal: Principal, agent_id: int | None = None, slug: str | None = None) -> Agent:
    """The agent to open a chat with, by id or slug, in any status (sending to one that is not
    active is refused by the service with ``Conflict``). Needs ``chat`` rather than
    ``agents:read``, so a chat-only API key can talk to agents. Raises ``NotFound``."""
    principal.require("chat")
    queryset = Agent.objects.select_related("active_version")
    agent = (queryset.filter(pk=agent_id) if agent_id is not None else queryset.filter(slug=slug or "")).first()
    if agent is None:
        raise NotFound("No such agent.")
    return agent


def agent_chat_list(*, principal: Principal) -> QuerySet[Agent]:
    """Active, published agents by slug: what a chat client may talk to (``chat`` needed)."""
    principal.require("chat")
    return Agent.objects.filter(status=Agent.Status.ACTIVE, active_version__isnull=False).order_by("slug")


def message_page_list(*, principal: Principal, session: ChatSession) -> QuerySet[Message]:
    """The session's messages with the turn each started or answered (no extra query per row)."""
    return message_list(principal=principal, session=session).select_related("turn", "answered_turn")


def turn_cost_map(*, principal: Principal, session: ChatSession, turn_ids: list[int]) -> dict[int, dict[str, Any]]:
    """What each of the session's turns ``turn_ids`` cost: ``turn_id -> {"cost": Decimal,
    "currency": str}`` (SUM(cost) of the turn's usage events, ``billing.selectors.usage``), in
    one aggregate query for the whole chat page. Raises ``Forbidden`` without ``chat``."""
    from billing.selectors.usage import turn_cost_map as costs  # billing's reads; agents' writes import billing

    principal.require("chat")
    return costs(turn_ids=turn_ids, session_id=session.pk)


def tool_call_list(*, principal: Principal, session: ChatSession) -> QuerySet[ToolCall]:
    """The tool calls of a session's turns, in turn and call order, with their approval requests
    (for the chat page's cards). Raises ``Forbidden`` without ``chat``."""
    principal.require("chat")
    return ToolCall.objects.filter(turn__session=session).select_related("approval").order_by("turn_id", "sequence")
