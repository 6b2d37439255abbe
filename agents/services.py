"""Writes on agents and chat. Each service checks the principal's permission, validates, changes
rows in one transaction, writes the audit event, and defers side effects to ``on_commit``.

Sessions belong to whoever opened them (a member or an API key); only that principal reads them
and posts to them. Viewers may chat (``chat``) but not edit agents (``agents:write``).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import jsonschema
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from agents.models import Agent, AgentVersion, ChatSession, Message, Tool, Turn
from agents.runtime import events
from agents.runtime.timings import Marks, mark
from compliance.services import audit_event_create
from config import metrics
from config.errors import Conflict, NotFound, ValidationFailed
from config.ratelimit import rate_limit_hit
from config.redis import redis_client
from config.text import require_storable
from tenants.models import ModelEndpoint
from tenants.principal import Principal
from tenants.services.limits import plan_limit_check

SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,58}[a-z0-9])?$")
TIERS = tuple(ModelEndpoint.Tier.values)

# Every field of a version, its default, and its bounds (checked by ``version_config_clean``).
VERSION_DEFAULTS: dict[str, Any] = {
    "system_prompt": "You are a helpful assistant.",
    "rules": "",
    "tier": "standard",
    "endpoint_id": None,
    "temperature": 0.2,
    "max_output_tokens": 512,
    "history_window": 20,
    "collection_ids": [],
    "retrieval_top_k": 5,
    "retrieval_mode": "hybrid",
    "retrieval_max_chunks_per_document": None,
    "output_format": "text",
    "output_schema": None,
    "tools": [],
    "tool_choice": "auto",
}
# At most this many tools on one version (each is described to the model on every call).
VERSION_MAX_TOOLS = 32
VERSION_FIELDS = tuple(VERSION_DEFAULTS)


def _number(config: dict[str, Any], name: str, cast: type, low: float, high: float) -> Any:
    value = config[name]
    try:
        number = cast(value)
    except (TypeError, ValueError):
        raise ValidationFailed(f"{name} must be a number.", code="invalid_version", details={"field": name}) from None
    if not low <= number <= high:
        raise ValidationFailed(f"{name} must be between {low:g} and {high:g}.", code="invalid_version",
                               details={"field": name})
    return number


def version_config_clean(*, principal: Principal, config: dict[str, Any]) -> dict[str, Any]:
    """Validate a version's fields; returns the cleaned dict (every key of ``VERSION_DEFAULTS``).

    Raises ``ValidationFailed`` naming the field: empty system prompt, unknown tier, an endpoint
    that is neither the platform's nor this tenant's, temperature outside 0-2, output tokens
    outside 1-32768, history window outside 0-200, top_k outside 1-50, unknown retrieval mode,
    chunks per document outside 1-50 (``None`` or ``""``: no cap), unknown output format,
    collections not in this tenant, an output schema that is not a JSON Schema (checked
    against its metaschema with ``jsonschema``), ``tools`` that are not a list of names of this
    tenant's tools (``details.missing``; deduplicated in order, at most ``VERSION_MAX_TOOLS``), or
    ``tool_choice`` not auto, required, none or one of the version's tools (``required`` needs
    at least one tool).
    """
    from knowledge.models import Collection

    unknown = sorted(set(config) - set(VERSION_FIELDS))
    if unknown:
        raise ValidationFailed(f"Unknown version field(s): {', '.join(unknown)}.", code="invalid_version",
                               details={"fields": unknown})
    cfg = {**VERSION_DEFAULTS, **config}
    for name in ("system_prompt", "rules", "output_schema"):
        require_storable(cfg[name], field=name)
    prompt = str(cfg["system_prompt"] or "").strip()
    if not prompt:
        raise ValidationFailed("The system prompt is empty.", code="invalid_version",
                               details={"field": "system_prompt"})
    if len(prompt) > 20000 or len(str(cfg["rules"] or "")) > 20000:
        raise ValidationFailed("Prompt and rules are limited to 20,000 characters each.", code="invalid_version")
    cfg["system_prompt"], cfg["rules"] = prompt, str(cfg["rules"] or "").strip()
    if cfg["tier"] not in TIERS:
        raise ValidationFailed(f"tier must be one of {', '.join(TIERS)}.", code="invalid_version",
                               details={"field": "tier"})
    if cfg["endpoint_id"] in ("", None):
        cfg["endpoint_id"] = None
    else:
        endpoint_id = _number(cfg, "endpoint_id", int, 1, 2**62)
        tenant = principal.tenant
        endpoint = ModelEndpoint.objects.filter(pk=endpoint_id).first()
        if endpoint is None or (endpoint.tenant_id is not None and (tenant is None or endpoint.tenant_id != tenant.pk)):
            raise ValidationFailed("No such model endpoint.", code="invalid_version", details={"field": "endpoint_id"})
        cfg["endpoint_id"] = endpoint_id
    cfg["temperature"] = _number(cfg, "temperature", float, 0.0, 2.0)
    cfg["max_output_tokens"] = _number(cfg, "max_output_tokens", int, 1, 32768)
    cfg["history_window"] = _number(cfg, "history_window", int, 0, 200)
    cfg["retrieval_top_k"] = _number(cfg, "retrieval_top_k", int, 1, 50)
    if cfg["retrieval_mode"] not in AgentVersion.RetrievalMode.values:
        raise ValidationFailed("retrieval_mode must be hybrid, vector or keyword.", code="invalid_version",
                               details={"field": "retrieval_mode"})
    if cfg["retrieval_max_chunks_per_document"] in ("", None):
        cfg["retrieval_max_chunks_per_document"] = None
    else:
        cfg["retrieval_max_chunks_per_document"] = _number(cfg, "retrieval_max_chunks_per_document", int, 1, 50)
    try:
        ids = sorted({int(i) for i in (cfg["collection_ids"] or [])})
    except (TypeError, ValueError):
        raise ValidationFailed("collection_ids must be integers.", code="invalid_version",
                               details={"field": "collection_ids"}) from None
    found = set(Collection.objects.filter(pk__in=ids).values_list("pk", flat=True))
    missing = [i for i in ids if i not in found]
    if missing:
        raise ValidationFailed(f"No such collection: {', '.join(map(str, missing))}.", code="invalid_version",
                               details={"field": "collection_ids", "missing": missing})
    cfg["collection_ids"] = ids
    if cfg["output_format"] not in AgentVersion.OutputFormat.values:
        raise ValidationFailed("output_format must be text or json_schema.", code="invalid_version",
                               details={"field": "output_format"})
    if cfg["output_format"] == AgentVersion.OutputFormat.JSON_SCHEMA:
        schema = cfg["output_schema"]
        if not isinstance(schema, dict):
            raise ValidationFailed("output_schema must be a JSON object (a JSON Schema).", code="invalid_version",
                                   details={"field": "output_schema"})
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValidationFailed(f"output_schema is not a valid JSON Schema: {exc.message}",
                                   code="invalid_version", details={"field": "output_schema"}) from None
    else:
        cfg["output_schema"] = None
    cfg["tools"], cfg["tool_choice"] = _tools_clean(cfg["tools"], cfg["tool_choice"])
    return cfg


def _tools_clean(names: Any, choice: Any) -> tuple[list[str], str]:
    if names is None:
        names = []
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValidationFailed("tools must be a list of tool names.", code="invalid_version",
                               details={"field": "tools"})
    require_storable(list(names), field="tools")
    unique = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if len(unique) > VERSION_MAX_TOOLS:
        raise ValidationFailed(f"A version may list at most {VERSION_MAX_TOOLS} tools.", code="invalid_version",
                               details={"field": "tools"})
    found = set(Tool.objects.filter(name__in=unique).values_list("name", flat=True))
    missing = [n for n in unique if n not in found]
    if missing:
        raise ValidationFailed(f"No such tool: {', '.join(missing)}.", code="invalid_version",
                               details={"field": "tools", "missing": missing})
    if not isinstance(choice, str) or (choice not in AgentVersion.ToolChoice.values and choice not in unique):
        raise ValidationFailed("tool_choice must be auto, required, none or the name of one of the version's tools.",
                               code="invalid_version", details={"field": "tool_choice"})
    if choice == AgentVersion.ToolChoice.REQUIRED and not unique:
        raise ValidationFailed("tool_choice required needs at least one tool.", code="invalid_version",
                               details={"field": "tool_choice"})
    return unique, str(choice)


def _version_snapshot(version: AgentVersion) -> dict[str, Any]:
    return {name: getattr(version, name) for name in VERSION_FIELDS}


@transaction.atomic
def agent_create(*, principal: Principal, slug: str, name: str, description: str = "",
                 config: dict[str, Any] | None = None) -> Agent:
    """Create a draft agent and its version 1. Raises ``ValidationFailed`` (slug, name, config,
    ``invalid_characters`` for NUL or unpaired surrogates), ``Conflict`` for a taken slug or
    (``plan_limit``) past the plan's ``max_agents`` (retired agents do not count), ``Forbidden``
    without ``agents:write``."""
    principal.require("agents:write")
    require_storable(name, field="name")
    require_storable(description, field="description")
    slug = (slug or "").strip().lower()
    if not SLUG_RE.match(slug):
        raise ValidationFailed("The slug must be 1-60 lowercase letters, digits or hyphens, not starting or ending "
                               "with a hyphen.", code="invalid_slug")
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise ValidationFailed("The name must be 1-200 characters.", code="invalid_name")
    cfg = version_config_clean(principal=principal, config=config or {})
    if Agent.objects.filter(slug=slug).exists():
        raise Conflict(f"An agent with slug '{slug}' exists.", code="duplicate_slug")
    plan_limit_check(limit="max_agents", used=Agent.objects.exclude(status=Agent.Status.RETIRED).count)
    agent = Agent.objects.create(slug=slug, name=name, description=(description or "")[:5000])
    AgentVersion.objects.create(agent=agent, number=1, created_by=principal.label[:200], note="Initial version", **cfg)
    audit_event_create(actor=principal, action="agent.created", target_type="agent", target_id=agent.pk,
                       payload={"slug": slug, "name": name, "version": 1})
    return agent


@transaction.atomic
def agent_update(*, principal: Principal, agent: Agent, name: str | None = None,
                 description: str | None = None) -> Agent:
    """Rename or re-describe an agent (not versioned: what it does lives in versions)."""
    principal.require("agents:write")
    require_storable(name, field="name")
    require_storable(description, field="description")
    changes: dict[str, Any] = {}
    if name is not None:
        name = name.strip()
        if not name or len(name) > 200:
            raise ValidationFailed("The name must be 1-200 characters.", code="invalid_name")
        changes["name"] = name
    if description is not None:
        changes["description"] = description[:5000]
    if changes:
        for key, value in changes.items():
            setattr(agent, key, value)
        agent.updated_at = timezone.now()
        agent.save(update_fields=[*changes, "updated_at"])
        audit_event_create(actor=principal, action="agent.updated", target_type="agent", target_id=agent.pk,
                           payload=changes)
    return agent


@transaction.atomic
def agent_version_create(*, principal: Principal, agent: Agent, config: dict[str, Any],
                         note: str = "") -> AgentVersion:
    """A new version: the latest version's fields overridden by ``config``. Not active until
    published. Raises as ``version_config_clean``; ``Conflict`` for a retired agent."""
    principal.require("agents:write")
    require_storable(note, field="note")
    agent = Agent.objects.select_for_update().get(pk=agent.pk)
    if agent.status == Agent.Status.RETIRED:
        raise Conflict("A retired agent cannot get new versions.", code="agent_retired")
    latest = agent.versions.order_by("-number").first()
    base = _version_snapshot(latest) if latest else {}
    cfg = version_config_clean(principal=principal, config={**base, **config})
    number = (latest.number if latest else 0) + 1
    version = AgentVersion.objects.create(agent=agent, number=number, created_by=principal.label[:200],
                                          note=(note or "")[:300], **cfg)
    agent.updated_at = timezone.now()
    agent.save(update_fields=["updated_at"])
    changed = sorted(k for k in cfg if base.get(k) != cfg[k])
    audit_event_create(actor=principal, action="agent_version.created", target_type="agent", target_id=agent.pk,
                       payload={"version": number, "changed": changed})
    return version


@transaction.atomic
def agent_version_publish(*, principal: Principal, version: AgentVersion) -> Agent:
    """Make ``version`` the active one (publish, or roll back when older than the active one).

    A draft or paused agent becomes active. Idempotent: publishing the active version changes
    nothing and writes no audit event. Raises ``Conflict`` for a retired agent.
    """
    principal.require("agents:write")
    agent = Agent.objects.select_for_update().get(pk=version.agent_id)
    if agent.status == Agent.Status.RETIRED:
        raise Conflict("A retired agent cannot be published.", code="agent_retired")
    previous = agent.active_version
    if previous is not None and previous.pk == version.pk and agent.status == Agent.Status.ACTIVE:
        return agent
    rollback = previous is not None and version.number < previous.number
    agent.active_version = version
    agent.status = Agent.Status.ACTIVE
    agent.updated_at = timezone.now()
    agent.save(update_fields=["active_version", "status", "updated_at"])
    audit_event_create(actor=principal, action="agent.rolled_back" if rollback else "agent.published",
                       target_type="agent", target_id=agent.pk,
                       payload={"version": version.number, "previous_version": previous.number if previous else None})
    return agent


_TRANSITIONS: dict[str, set[str]] = {
    Agent.Status.ACTIVE: {Agent.Status.PAUSED, Agent.Status.RETIRED},
    Agent.Status.PAUSED: {Agent.Status.ACTIVE, Agent.Status.RETIRED},
    Agent.Status.DRAFT: {Agent.Status.RETIRED},
    Agent.Status.RETIRED: set(),
}


@transaction.atomic
def agent_status_set(*, principal: Principal, agent: Agent, status: str) -> Agent:
    """Pause, resume (``active``, needs a published version) or retire an agent.

    Allowed: active <-> paused, any but retired -> retired (final). Setting the current status
    is a no-op. Raises ``ValidationFailed`` for an unknown status, ``Conflict`` otherwise.
    """
    principal.require("agents:write")
    if status not in Agent.Status.values:
        raise ValidationFailed(f"Unknown status '{status}'.", code="invalid_status")
    agent = Agent.objects.select_for_update().get(pk=agent.pk)
    if agent.status == status:
        return agent
    if status not in _TRANSITIONS[agent.status]:
        raise Conflict(f"An agent cannot go from {agent.status} to {status}.", code="invalid_transition")
    if status == Agent.Status.ACTIVE and agent.active_version_id is None:
        raise Conflict("Publish a version first.", code="not_published")
    previous = agent.status
    agent.status = status
    agent.updated_at = timezone.now()
    agent.save(update_fields=["status", "updated_at"])
    verb = "resumed" if status == Agent.Status.ACTIVE else status
    audit_event_create(actor=principal, action=f"agent.{verb}",
                       target_type="agent", target_id=agent.pk, payload={"from": previous, "to": status})
    return agent


# --- Chat ---------------------------------------------------------------------------------

def _owner_fields(principal: Principal) -> dict[str, Any]:
    if principal.api_key is not None:
        return {"user_id": None, "api_key_id": principal.api_key.key_id}
    if principal.user is not None:
        return {"user_id": principal.user.pk, "api_key_id": ""}
    return {"user_id": None, "api_key_id": ""}


def _require_runnable(agent: Agent) -> AgentVersion:
    if agent.status != Agent.Status.ACTIVE or agent.active_version_id is None:
        raise Conflict(f"The agent '{agent.slug}' is {agent.status} and does not take messages.",
                       code="agent_unavailable")
    return agent.active_version  # type: ignore[return-value]


@transaction.atomic
def chat_session_create(*, principal: Principal, agent: Agent, title: str = "",
                        channel: str = ChatSession.Channel.CONSOLE) -> ChatSession:
    """Open a session with an active agent, owned by ``principal``. Raises ``Forbidden``
    without ``chat``, ``Conflict`` when the agent is not active."""
    principal.require("chat")
    require_storable(title, field="title")
    _require_runnable(agent)
    session = ChatSession.objects.create(agent=agent, title=(title or "").strip()[:200], channel=channel,
                                         **_owner_fields(principal))
    audit_event_create(actor=principal, action="chat_session.created", target_type="chat_session",
                       target_id=session.pk, payload={"agent": agent.slug, "channel": channel})
    return session


@transaction.atomic
def chat_session_delete(*, principal: Principal, session: ChatSession) -> None:
    """Delete a session with its messages and turns (its usage events stay)."""
    principal.require("chat")
    session_id = session.pk
    session.delete()
    audit_event_create(actor=principal, action="chat_session.deleted", target_type="chat_session",
                       target_id=session_id)


def queue_for(version: AgentVersion) -> str:
    """The Celery queue of a version's tier (``llm.light``, ``llm.standard``, ``llm.heavy``)."""
    tier = version.tier
    if version.endpoint_id is not None:
        endpoint = ModelEndpoint.objects.filter(pk=version.endpoint_id).only("tier").first()
        tier = endpoint.tier if endpoint else tier
    return f"llm.{tier}"


def turn_enqueue(turn: Turn, marks: Marks | None = None) -> None:
    """Send the turn's task to its queue (after the commit that saved it), with its step marks
    (``agents.runtime.timings``; ``enqueued`` is set here)."""
    from agents.tasks import turn_run_task

    marks = dict(marks or {})
    mark(marks, "enqueued")
    turn_run_task.apply_async(args=[turn.pk], kwargs={"marks": marks}, queue=turn.queue)


# The session row locked (not the agent's or version's rows: every session of an agent shares
# them), with the agent and its active version read in the same statement.
_LOCKED_SESSIONS = ChatSession.objects.select_for_update(of=("self",)).select_related("agent__active_version")


def _message_checked(*, principal: Principal, session: ChatSession, content: str,
                     history: list[dict[str, str]] | None) -> tuple[AgentVersion, str]:
    """The checks of a message before it starts a turn, on ``session`` locked by the caller's
    transaction (``_LOCKED_SESSIONS``): the agent's active version and the content stripped."""
    principal.require("chat")
    require_storable(content, field="content")
    require_storable([item.get("content") for item in history or []], field="history")
    content = (content or "").strip()
    if not content:
        raise ValidationFailed("The message is empty.", code="empty_message")
    if len(content) > settings.CHAT_MAX_MESSAGE_CHARS:
        raise ValidationFailed(f"The message is longer than {settings.CHAT_MAX_MESSAGE_CHARS} characters.",
                               code="message_too_long")
    version = _require_runnable(session.agent)
    unfinished = (Turn.objects.filter(session=session, status__in=Turn.UNFINISHED)
                  .values_list("status", flat=True).first())
    if unfinished == Turn.Status.AWAITING_APPROVAL:
        raise Conflict("The previous answer is waiting for a tool call to be approved; wait for the decision "
                       "or stop it.", code="turn_in_progress")
    if unfinished is not None:
        raise Conflict("The previous answer is still being written; wait for it or stop it.",
                       code="turn_in_progress")
    return version, content


def _message_save(*, session: ChatSession, version: AgentVersion, content: str,
                  history: list[dict[str, str]] | None, queue: str, running: bool) -> tuple[Turn, Message]:
    """Save the history, the user's message and its turn on ``queue`` (``queued``, or ``running``
    for a caller that runs it at once), and touch the session."""
    for item in history or []:
        Message.objects.create(session=session, role=item["role"],
                               content=item["content"][: settings.CHAT_MAX_MESSAGE_CHARS])
    message = Message.objects.create(session=session, role=Message.Role.USER, content=content)
    now = timezone.now()
    started = {"status": Turn.Status.RUNNING, "started_at": now, "heartbeat_at": now} if running else {}
    turn = Turn.objects.create(session=session, agent_version=version, user_message=message, queue=queue,
                               queued_at=now, deadline=now + dt.timedelta(seconds=settings.CHAT_TURN_DEADLINE_SECONDS),
                               **started)
    session.updated_at = now
    if not session.title:
        session.title = content[:80]
    session.save(update_fields=["updated_at", "title"])
    return turn, message


@transaction.atomic
def chat_message_send(*, principal: Principal, session: ChatSession, content: str,
                      history: list[dict[str, str]] | None = None, enqueue: bool = True,
                      marks: Marks | None = None) -> Turn:
    """Save the user's message and a queued turn; after commit, enqueue the turn on its tier's
    queue and tell the session's group (``turn.queued``).

    ``history`` (OpenAI-compatible calls only) are earlier messages the client sends along;
    they are stored before the question. ``enqueue=False`` leaves running the turn to the caller.
    ``marks``: the turn's step marks (``agents.runtime.timings``), sent with its task. Raises
    ``ValidationFailed`` for empty or overlong content or content with a NUL or an unpaired
    surrogate (``invalid_characters``), ``Conflict`` when the agent is not active or a turn of
    this session is unfinished (queued, running or awaiting approval), ``TooManyRequests``
    (``rate_limited``) past the plan's ``chat_turns_per_minute`` for the principal's key or member.
    """
    session = _LOCKED_SESSIONS.get(pk=session.pk)
    version, content = _message_checked(principal=principal, session=session, content=content, history=history)
    # Last of the checks: only a message that would start a turn is counted.
    rate_limit_hit(tenant=principal.tenant, principal=principal, limit="chat_turns_per_minute")
    turn, message = _message_save(session=session, version=version, content=content, history=history,
                                  queue=queue_for(version), running=False)
    group = events.session_group(connection.schema_name, session.pk)  # type: ignore[attr-defined]
    if enqueue:
        def send() -> None:
            steps = dict(marks or {})
            mark(steps, "accepted")
            turn_enqueue(turn, steps)

        transaction.on_commit(send)
    transaction.on_commit(lambda: events.publish(group, {"event": "turn.queued", "turn_id": turn.pk,
                                                         "session_id": session.pk, "user_message_id": message.pk}))
    return turn


@transaction.atomic
def chat_message_accept(*, principal: Principal, session_id: int, content: str, queue: str) -> Turn:
    """The chat socket's message, in the worker of ``queue`` that will run its turn: save the
    message and a turn on that queue that is already ``running`` (this worker holds it: no claim,
    no second task), then after commit publish ``message.accepted`` (with the question) and
    ``turn.queued`` to the session's group in one round trip. The socket counted the rate limit
    before it handed the message over. Raises ``NotFound`` for a session that is not the
    principal's, else as ``chat_message_send`` (but never ``TooManyRequests``). The returned turn
    comes with its session, the session's agent, its version and its user message loaded."""
    from agents.selectors import session_owner_q

    principal.require("chat")
    session = _LOCKED_SESSIONS.filter(session_owner_q(principal), pk=session_id).first()
    if session is None:
        raise NotFound("No such chat session.")
    version, content = _message_checked(principal=principal, session=session, content=content, history=None)
    turn, message = _message_save(session=session, version=version, content=content, history=None, queue=queue,
                                  running=True)
    turn.session, turn.agent_version, turn.user_message = session, version, message
    group = events.session_group(connection.schema_name, session.pk)  # type: ignore[attr-defined]
    transaction.on_commit(lambda: events.publish_many(group, [
        {"event": "message.accepted", "turn_id": turn.pk, "user_message_id": message.pk, "content": content},
        {"event": "turn.queued", "turn_id": turn.pk, "session_id": session.pk, "user_message_id": message.pk}]))
    return turn


@transaction.atomic
def turn_cancel(*, principal: Principal, turn: Turn) -> Turn:
    """Stop a turn. A queued turn is cancelled at once; a running one is flagged and the worker
    stops at its next check (within about 0.1 s), keeping the partial answer. A turn waiting for
    an approval is cancelled at once: its pending approval request becomes ``cancelled`` and its
    tool call ``rejected`` (never run), with ``approval.decided`` and ``turn.cancelled`` published.
    Cancelling a finished turn is a no-op (idempotent: the user's intent already holds)."""
    principal.require("chat")
    turn = Turn.objects.select_for_update().get(pk=turn.pk)
    if turn.status in Turn.FINAL:
        return turn
    schema: str = connection.schema_name  # type: ignore[attr-defined]
    group = events.session_group(schema, turn.session_id)
    turn_id = turn.pk
    turn.cancel_requested = True
    if turn.status == Turn.Status.AWAITING_APPROVAL:
        _parked_turn_cancel(principal=principal, turn=turn, group=group)
    if turn.status in (Turn.Status.QUEUED, Turn.Status.AWAITING_APPROVAL):
        turn.status = Turn.Status.CANCELLED
        turn.finished_at = timezone.now()
        message_id = turn.assistant_message_id
        transaction.on_commit(lambda: events.publish(group, {"event": "turn.cancelled", "turn_id": turn_id,
                                                             "message_id": message_id}))
        transaction.on_commit(partial(metrics.turn_finished, Turn.Status.CANCELLED))
    turn.save(update_fields=["cancel_requested", "status", "finished_at"])
    key = events.cancel_key(schema, turn.pk)
    transaction.on_commit(lambda: redis_client().set(key, b"1", ex=3600))
    audit_event_create(actor=principal, action="turn.cancel_requested", target_type="turn", target_id=turn.pk)
    return turn


def _parked_turn_cancel(*, principal: Principal, turn: Turn, group: str) -> None:
    """The approval side of cancelling a parked turn (inside ``turn_cancel``'s transaction): the
    pending request is cancelled, the call not yet run is rejected."""
    from agents.models import ApprovalRequest, ToolCall

    now = timezone.now()
    for approval in ApprovalRequest.objects.select_for_update().select_related("tool_call").filter(turn=turn):
        ToolCall.objects.filter(pk=approval.tool_call_id, status__in=[
            ToolCall.Status.AWAITING_APPROVAL, ToolCall.Status.APPROVED]).update(
            status=ToolCall.Status.REJECTED, error_code="turn_cancelled", finished_at=now)
        if approval.status != ApprovalRequest.Status.PENDING:
            continue
        approval.status = ApprovalRequest.Status.CANCELLED
        approval.decided_at = now
        approval.reason = "The turn was cancelled."
        approval.decided_by_label = principal.label[:200]
        approval.save(update_fields=["status", "decided_at", "reason", "decided_by_label"])
        audit_event_create(actor=principal, action="approval.cancelled", target_type="approval",
                           target_id=approval.pk, payload={"turn_id": turn.pk, "tool": approval.tool_name})
        transaction.on_commit(partial(events.publish, group,
                                      events.approval_decided(approval, approval.tool_call.call_id)))


@dataclass(frozen=True)
class SweepResult:
    failed: int
    resumed: int = 0


# A decided approval whose turn is still parked this long after the decision lost its resume
# task (the worker died between the decision and the task, or the message was lost).
RESUME_GRACE_SECONDS = 10


def turns_sweep(*, now: dt.datetime | None = None) -> SweepResult:
    """Fail every queued or running turn of the current schema past its deadline (a lost task, a
    model that never finished), and every running turn whose worker stopped its heartbeat more than
    ``CHAT_TURN_HEARTBEAT_STALE_SECONDS`` ago (the worker died; ``agents.runtime.heartbeat``), and
    tell its session. Safe to run concurrently with workers: the update only touches turns still
    unfinished and still overdue or silent. Turns without a heartbeat (claimed by a worker that
    does not stamp) wait for their deadline.

    Tool calls of a failed turn still ``running`` become ``error`` ``worker_lost``: their outcome
    is unknown and they are never run again (HTTP tools send an ``Idempotency-Key``, so a service
    can drop a repeat a person makes). Turns ``awaiting_approval`` are never failed for their old
    deadline (the approval's own expiry ends them); one whose approval was decided more than
    ``RESUME_GRACE_SECONDS`` ago is resumed again (``turn_resume`` is idempotent)."""
    from agents.models import ApprovalRequest, ToolCall

    now = now or timezone.now()
    schema: str = connection.schema_name  # type: ignore[attr-defined]
    silent = Q(status=Turn.Status.RUNNING,
               heartbeat_at__lt=now - dt.timedelta(seconds=settings.CHAT_TURN_HEARTBEAT_STALE_SECONDS))
    stuck = Q(deadline__lt=now) | silent
    overdue = list(Turn.objects.filter(stuck, status__in=[Turn.Status.QUEUED, Turn.Status.RUNNING])
                   .values_list("pk", "session_id", "status", "deadline"))
    failed = 0
    for turn_id, session_id, status, deadline in overdue:
        if status == Turn.Status.QUEUED:
            code, message = "not_dispatched", "The turn was never picked up by a worker; try again."
        elif deadline < now:
            code, message = "worker_lost", "The answer did not finish in time (the model or worker stopped responding)."
        else:
            code, message = "worker_lost", "The worker answering this stopped responding; try again."
        with transaction.atomic():
            updated = Turn.objects.filter(stuck, pk=turn_id, status=status).update(
                status=Turn.Status.FAILED, finished_at=now, error_code=code, error_message=message)
            if updated:
                ToolCall.objects.filter(turn_id=turn_id, status=ToolCall.Status.RUNNING).update(
                    status=ToolCall.Status.ERROR, error_code="worker_lost", finished_at=now,
                    output_excerpt="The worker running this call stopped; its outcome is unknown.")
        if updated:
            failed += 1
            metrics.turn_finished(Turn.Status.FAILED, code)
            event = {"event": "turn.failed", "turn_id": turn_id, "error": {"code": code, "message": message}}
            # After the commit (at once under autocommit): a client that reloads on this event
            # must find the turn failed.
            transaction.on_commit(partial(events.publish, events.session_group(schema, session_id), event))
    lost = list(Turn.objects.filter(
        status=Turn.Status.AWAITING_APPROVAL,
        approvals__status__in=[ApprovalRequest.Status.APPROVED, ApprovalRequest.Status.REJECTED],
        approvals__decided_at__lt=now - dt.timedelta(seconds=RESUME_GRACE_SECONDS)).distinct())
    for turn in lost:
        transaction.on_commit(partial(turn_resume_enqueue, turn))
    return SweepResult(failed=failed, resumed=len(lost))


def turn_resume_enqueue(turn: Turn) -> None:
    """Send the turn's resume task to its queue (``agents.turn_resume``)."""
    from agents.tasks import turn_resume_task

    turn_resume_task.apply_async(args=[turn.pk], queue=turn.queue)
