"""Running one turn in the worker: retrieve, prompt, stream, record, publish.

``turn_run`` is called by the Celery task inside the tenant's schema. It owns the turn from
``queued`` to a final state; every path out of it (including an unexpected exception) leaves
the turn ``completed``, ``failed`` or ``cancelled`` and tells the session's group. While it runs,
the process's heartbeat thread stamps it (``agents.runtime.heartbeat``), so that the sweeper can
fail it soon if the process dies.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from agents.models import Agent, AgentVersion, ApprovalRequest, Message, Tool, Turn
from agents.runtime import events, tool_loop
from agents.runtime.cancel import cancel_requested, cancel_watch
from agents.runtime.heartbeat import turn_heartbeat
from agents.runtime.llm import (
    LLMError,
    StreamResult,
    endpoints_for,
    estimate_tokens,
    message_tokens,
    price_per_token,
    stream_chat,
)
from agents.runtime.prompt import build_prompt
from agents.runtime.timings import Marks, mark
from agents.runtime.tools import openai_tools, tools_for_version
from billing.models import UsageEvent
from billing.selectors.usage import turn_cost_fields
from billing.services import usage_event_record
from billing.services.budgets import (
    BudgetHold,
    budget_fold,
    budget_holds_guard,
    budget_release,
    budget_reserve,
    budget_settle,
)
from compliance.services import audit_event_create
from config import metrics, telemetry
from config.db import connection_release
from config.errors import DomainError
from tenants.models import ModelEndpoint
from tenants.principal import Principal

logger = structlog.get_logger(__name__)


class TurnRefused(Exception):
    """A policy refusal before any model call (agent paused, no model, prompt too long)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Publishes per second that one worker process spends on deltas, across all its streams. One
# publish (snapshot APPEND + channels-redis group_send, about five Redis round trips through
# redis-py) costs about 0.8 ms of CPU (tests/bench/bench_chat.py, measured on the dev machine), so
# 400/s keeps relaying under half a core however many turns the process streams.
PUBLISH_BUDGET_PER_SECOND = 400.0
_streams = {"active": 0}
_streams_lock = threading.Lock()


@contextlib.contextmanager
def _streaming() -> Iterator[None]:
    """Count this process's streaming turns for the duration (``DeltaBatcher`` reads it)."""
    with _streams_lock:
        _streams["active"] += 1
    try:
        yield
    finally:
        with _streams_lock:
            _streams["active"] -= 1


@dataclass
class DeltaBatcher:
    """Collects deltas and publishes them at most once per ``interval`` seconds.

    The first delta goes out at once (it is the time to first token users feel); later ones
    are batched, because one process relays only some thousands of channel-layer messages per
    second and per-token messages would saturate it at a few dozen concurrent streams. The
    interval stretches with the number of turns this process streams, so that all of them
    together publish at most ``PUBLISH_BUDGET_PER_SECOND`` times a second (50 streams: 125 ms).
    """

    schema: str
    group: str
    turn_id: int
    interval: float
    pending: str = ""
    sent_chars: int = 0
    last_flush: float = 0.0
    flushes: int = 0
    marks: Marks | None = None  # the turn's step marks: the first flush is ``first_published``

    def add(self, text: str) -> None:
        self.pending += text
        now = time.monotonic()
        interval = max(self.interval, _streams["active"] / PUBLISH_BUDGET_PER_SECOND)
        if self.flushes == 0 or now - self.last_flush >= interval:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if not self.pending:
            return
        text, self.pending = self.pending, ""
        events.publish(self.group, {"event": "token.delta", "turn_id": self.turn_id, "offset": self.sent_chars,
                                    "text": text}, snapshot=(self.schema, self.turn_id, text))
        self.sent_chars += len(text)
        self.last_flush = now if now is not None else time.monotonic()
        self.flushes += 1
        mark(self.marks, "first_published")


def _citations(hits: list[Any]) -> list[dict[str, Any]]:
    return [
        {"n": n, "chunk_id": h.chunk_id, "document_id": h.document_id, "external_id": h.external_id,
         "title": h.title, "page_number": h.page_number, "heading_path": h.heading_path, "score": round(h.score, 4)}
        for n, h in enumerate(hits, start=1)
    ]


def _retrieved(hits: list[Any]) -> list[dict[str, Any]]:
    return [
        {**c, "vector_score": h.vector_score, "keyword_score": h.keyword_score, "text": h.text[:600]}
        for c, h in zip(_citations(hits), hits, strict=True)
    ]


def _finish(turn: Turn, status: str, **fields: Any) -> None:
    turn.status = status
    turn.finished_at = timezone.now()
    for name, value in fields.items():
        setattr(turn, name, value)
    turn.save(update_fields=["status", "finished_at", *fields])
    transaction.on_commit(functools.partial(metrics.turn_finished, status, fields.get("error_code", "")))


def _claim(turn_id: int, marks: Marks) -> Turn | None:
    """Move a queued turn to running (``claimed`` in ``marks``); None if it is gone, already final
    or being run."""
    with transaction.atomic():
        turn = (Turn.objects.select_for_update(of=("self",))
                .select_related("session", "session__agent", "agent_version", "user_message")
                .filter(pk=turn_id).first())
        if turn is None or turn.status != Turn.Status.QUEUED:
            return None
        if turn.cancel_requested:
            _finish(turn, Turn.Status.CANCELLED)
            return None
        turn.status = Turn.Status.RUNNING
        turn.started_at = turn.heartbeat_at = timezone.now()
        turn.save(update_fields=["status", "started_at", "heartbeat_at"])
    mark(marks, "claimed")
    return turn


def turn_run(turn_id: int, marks: Marks | None = None) -> str:
    """Run turn ``turn_id`` of the current schema to a final state (or to ``awaiting_approval``);
    returns that state, or ``skipped`` when the turn was not queued. ``marks``: the step marks
    the turn collected before this worker (``agents.runtime.timings``), saved with it.

    Steps: claim (queued -> running), check the agent may run, retrieve from the version's
    collections, build the prompt, then the tool loop: stream from the tier's endpoints (fallback
    before the first token only) offering the version's tools, run the calls the model makes and
    call the model again with their results, until it answers without calls. Records usage events
    (tokens of every model call, priced from the endpoint; one per executed tool call) and saves
    the assistant message with its citations. Never raises for a turn's own failure.
    """
    marks = dict(marks or {})
    turn = _claim(turn_id, marks)
    if turn is None:
        return "skipped"
    return turn_run_started(turn, marks)


def turn_run_started(turn: Turn, marks: Marks, *, tenant: Any = None) -> str:
    """Run a turn this worker holds as ``running`` (claimed by ``turn_run``, or saved running by
    ``agents.services.chat_message_accept``) to a final state; as ``turn_run``. ``turn`` comes with
    its session, the session's agent, its version and its user message loaded; ``tenant`` (with
    its plan), when the caller has it, saves reading it again."""
    schema: str = connection.schema_name  # type: ignore[attr-defined]
    group = events.session_group(schema, turn.session_id)
    batcher = DeltaBatcher(schema=schema, group=group, turn_id=turn.pk,
                           interval=settings.CHAT_DELTA_INTERVAL_MS / 1000, marks=marks)
    return _drive(turn, schema=schema, group=group, batcher=batcher,
                  body=lambda: _loop(_prepare(turn, schema=schema, group=group, batcher=batcher, tenant=tenant)))


def _drive(turn: Turn, *, schema: str, group: str, batcher: DeltaBatcher, body: Callable[[], str]) -> str:
    """Run ``body`` for a claimed turn with the heartbeat on; any exception fails the turn (with
    its code for ``LLMError``, ``TurnRefused`` and domain errors, ``internal_error`` otherwise)."""
    # Usage events of the turn are attributed to whoever sent it (billing.services.usage).
    structlog.contextvars.bind_contextvars(turn_id=turn.pk, session_id=turn.session_id,
                                           user_id=turn.session.user_id, api_key=turn.session.api_key_id or None)
    # Any reservation a path below leaves unsettled is released when the guard exits.
    with telemetry.span("turn.run", {"portal.tenant.schema": schema, "portal.agent": turn.session.agent.slug,
                                     "portal.turn.id": turn.pk}), budget_holds_guard() as holds:
        return _drive_guarded(turn, schema=schema, group=group, batcher=batcher, body=body, holds=holds)


def _drive_guarded(turn: Turn, *, schema: str, group: str, batcher: DeltaBatcher, body: Callable[[], str],
                   holds: list[BudgetHold]) -> str:
    try:
        with _streaming(), turn_heartbeat(schema, turn.pk), cancel_watch(schema, turn.pk):
            return body()
    except Exception as exc:
        if isinstance(exc, LLMError | TurnRefused | DomainError):
            code, message = exc.code, exc.message
        else:
            logger.exception("turn_crashed")
            code, message = "internal_error", "Something went wrong while answering; try again."
        batcher.flush()
        turn.refresh_from_db(fields=["status"])
        if turn.status in Turn.FINAL:
            return str(turn.status)
        partial = exc.partial if isinstance(exc, LLMError) else None
        # The call that broke holds the last reservation: it settles to what was generated.
        hold = holds[-1] if holds and partial is not None else None
        with transaction.atomic():
            _finish(turn, Turn.Status.FAILED, error_code=code, error_message=message, timings=batcher.marks or {},
                    **({"input_tokens": partial.input_tokens, "output_tokens": partial.output_tokens}
                       if partial is not None else {}))
            if partial is not None:
                _meter(turn, partial, hold=hold)
        budget_fold(hold=hold)
        events.publish(group, {"event": "turn.failed", "turn_id": turn.pk,
                               "error": {"code": code, "message": message}})
        return "failed"


def _meter(turn: Turn, result: StreamResult, *, hold: BudgetHold | None) -> None:
    """Record the input and output token usage events of one model call of ``turn``, priced
    from the endpoint that served it (also for a call that broke after streaming some text: the
    model generated those tokens), and settle the call's budget reservation ``hold`` to them in
    the same transaction (the reservation row keeps the usage durable with the events; no
    budget counter is locked). The caller runs ``budget_fold(hold=...)`` right after that
    transaction commits, to move it into the counters."""
    endpoint = result.endpoint
    assert endpoint is not None
    common: dict[str, Any] = {"model": endpoint.model, "agent_id": turn.session.agent_id,
                              "session_id": turn.session_id, "turn_id": turn.pk, "currency": endpoint.currency,
                              "metadata": {"endpoint": endpoint.name, "estimated": result.usage_estimated}}
    input_ = usage_event_record(kind=UsageEvent.Kind.LLM_INPUT_TOKENS, quantity=result.input_tokens,
                       unit_price=price_per_token(endpoint.input_price_per_mtok), **common)
    output = usage_event_record(kind=UsageEvent.Kind.LLM_OUTPUT_TOKENS, quantity=result.output_tokens,
                                unit_price=price_per_token(endpoint.output_price_per_mtok), **common)
    budget_settle(hold=hold, tokens=result.input_tokens + result.output_tokens, cost=input_.cost + output.cost)


@dataclass
class TurnRun:
    """One turn's run state, made by ``_prepare`` (or ``_restore`` on resume) and carried through
    the tool loop: the model's messages so far, the counts and token totals of the turn's model
    and tool calls, and all text streamed to the user (every model call's, in order)."""

    turn: Turn
    schema: str
    group: str
    batcher: DeltaBatcher
    tenant: Any
    agent: Agent
    version: AgentVersion
    endpoints: list[ModelEndpoint]
    messages: list[dict[str, Any]]
    citations: list[dict[str, Any]]
    response_format: dict[str, Any] | None = None
    first_token_at: dt.datetime | None = None
    tools: dict[str, Tool] = field(default_factory=dict)
    model_calls: int = 0
    tool_calls: int = 0
    invalid_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usage_estimated: bool = False
    text: str = ""
    endpoint: ModelEndpoint | None = None  # the endpoint that served the last model call
    hold: BudgetHold | None = None  # the budget reservation of the model call not yet metered

    def loop_state(self, pending_calls: list[dict[str, Any]]) -> dict[str, Any]:
        """What ``Turn.loop_state`` keeps while the turn waits for an approval."""
        return {"messages": self.messages, "model_calls": self.model_calls, "tool_calls": self.tool_calls,
                "invalid_calls": self.invalid_calls, "citations": self.citations, "pending_calls": pending_calls,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "usage_estimated": self.usage_estimated, "text": self.text,
                "first_token_at": self.first_token_at.isoformat() if self.first_token_at else None}


def _runnable(turn: Turn, *, schema: str, tenant: Any = None) -> tuple[Any, Agent, list[ModelEndpoint]]:
    """The turn's tenant, agent and the endpoints to try, after checking that the agent and the tenant
    may run and that a model is configured. The agent is the one loaded with the turn's session (read
    when the turn was claimed or accepted); ``tenant`` is read unless given. Raises ``TurnRefused``."""
    from tenants.models import Tenant

    version = turn.agent_version
    agent = turn.session.agent
    if agent.status in (Agent.Status.PAUSED, Agent.Status.RETIRED):
        raise TurnRefused("agent_unavailable", f"The agent '{agent.name}' is {agent.status}; it does not answer now.")
    if tenant is None:
        tenant = Tenant.objects.select_related("plan").get(schema_name=schema)
    if tenant.status != Tenant.Status.ACTIVE:
        raise TurnRefused("tenant_suspended", "This workspace is suspended.")
    endpoints = endpoints_for(tenant=tenant, tier=version.tier, endpoint_id=version.endpoint_id)
    if not endpoints:
        raise TurnRefused("no_model", f"No model endpoint is enabled for the '{version.tier}' tier.")
    return tenant, agent, endpoints


def _response_format(version: AgentVersion) -> dict[str, Any] | None:
    if version.output_format == version.OutputFormat.JSON_SCHEMA and version.output_schema:
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": version.output_schema}}
    return None


def _prepare(turn: Turn, *, schema: str, group: str, batcher: DeltaBatcher, tenant: Any = None) -> TurnRun:
    """Check the agent and tenant may run, pick the endpoints (``turn.started``), retrieve from
    the version's collections (``citations``) and build the prompt. Raises ``TurnRefused``."""
    from knowledge.models import Collection
    from knowledge.retrieval import chunk_search

    version = turn.agent_version
    tenant, agent, endpoints = _runnable(turn, schema=schema, tenant=tenant)
    events.publish(group, {"event": "turn.started", "turn_id": turn.pk, "model": endpoints[0].model,
                           "endpoint": endpoints[0].name})

    question = turn.user_message.content
    hits: list[Any] = []
    collections = list(Collection.objects.filter(pk__in=version.collection_ids))
    if collections:
        hits = chunk_search(query=question[:2000], collections=collections, top_k=version.retrieval_top_k,
                            mode=version.retrieval_mode,
                            max_chunks_per_document=version.retrieval_max_chunks_per_document,
                            agent_id=agent.pk, session_id=turn.session_id,
                            turn_id=turn.pk)
        mark(batcher.marks, "retrieved")
    history = list(Message.objects.filter(session_id=turn.session_id, pk__lt=turn.user_message_id)
                   .exclude(role=Message.Role.SYSTEM).order_by("-pk")[: max(version.history_window, 1)])
    history.reverse()
    context_window = min(e.context_window for e in endpoints)
    while True:
        prompt = build_prompt(version=version, history=history, question=question, hits=hits,
                              context_window=context_window)
        if prompt.estimated_tokens + version.max_output_tokens <= context_window or not hits:
            break
        hits = hits[:-1]
    if prompt.estimated_tokens + version.max_output_tokens > context_window:
        raise TurnRefused("context_too_long", "The message is too long for this agent's model.")
    citations = _citations(hits)
    retrieved = _retrieved(hits)
    # One statement: a client that joins later reads the same turn.started and citations from the
    # database (the answer's save replaces the endpoint with the one that answered, after any fallback).
    Turn.objects.filter(pk=turn.pk).update(model=endpoints[0].model, endpoint_name=endpoints[0].name,
                                           **({"retrieved": retrieved} if hits else {}))
    if hits:
        events.publish(group, {"event": "citations", "turn_id": turn.pk, "citations": citations,
                               "retrieved": retrieved})

    return TurnRun(turn=turn, schema=schema, group=group, batcher=batcher, tenant=tenant, agent=agent,
                   version=version,
                   endpoints=endpoints, messages=list(prompt.messages), citations=citations,
                   response_format=_response_format(version), tools=tools_for_version(version) if version.tools else {})


def _stream(run: TurnRun) -> StreamResult:
    """One model call with the run's messages, deltas published through the batcher; polls
    cancellation and the deadline every 0.1 s. The version's tools are offered with its
    ``tool_choice`` on the turn's first model call, with ``auto`` on later ones (``none``: no
    tools). Adds the call's tokens to the run's totals. Raises ``LLMError``."""
    deadline = run.turn.deadline.timestamp()

    def should_stop() -> bool:
        # Memory only: the process's watcher reads every running turn's cancel key (runtime.cancel).
        return cancel_requested(run.schema, run.turn.pk) or time.time() > deadline

    separate = {"pending": bool(run.text) and not run.text[-1].isspace()}

    def on_delta(text: str) -> None:
        if run.first_token_at is None:
            run.first_token_at = timezone.now()
            mark(run.batcher.marks, "first_token")
        if separate["pending"]:
            # A later model call's text starts a new paragraph of the one answer the user reads.
            separate["pending"] = False
            text = "\n\n" + text
        run.text += text
        run.batcher.add(text)

    choice = run.version.tool_choice if run.model_calls == 0 else AgentVersion.ToolChoice.AUTO
    offered = openai_tools(run.tools) if run.tools and choice != AgentVersion.ToolChoice.NONE else None
    tool_choice: str | dict[str, Any] | None = None
    if offered:
        # auto / required, or one tool's name: OpenAI's named choice.
        tool_choice = (str(choice) if choice in AgentVersion.ToolChoice.values
                       else {"type": "function", "function": {"name": choice}})
    # Raises BudgetExceeded (the turn fails before the model is called).
    run.hold = _budget_reserve(run, offered)
    mark(run.batcher.marks, "prompted")
    # The stream lasts seconds and needs no database: its connection serves other turns meanwhile
    # (a worker's pool is smaller than its thread count; README, "Database connections").
    connection_release()
    mark(run.batcher.marks, "model_called")
    try:
        result = stream_chat(endpoints=run.endpoints, messages=run.messages, temperature=run.version.temperature,
                             max_tokens=run.version.max_output_tokens, response_format=run.response_format,
                             on_delta=on_delta, should_stop=should_stop, tools=offered, tool_choice=tool_choice)
    except LLMError as error:
        if error.partial is None:
            # No token was generated: the room goes back now (a partial result settles in _drive).
            budget_release(hold=run.hold)
            run.hold = None
        raise
    run.batcher.flush()
    run.model_calls += 1
    run.input_tokens += result.input_tokens
    run.output_tokens += result.output_tokens
    run.usage_estimated = run.usage_estimated or result.usage_estimated
    run.endpoint = result.endpoint
    return result


def _budget_reserve(run: TurnRun, offered: list[dict[str, Any]] | None) -> BudgetHold | None:
    """Reserve the next model call's worst case against the budgets in scope of the turn (the
    tenant's, the agent's, the session's API key's, the plan's monthly token quota): the prompt
    (``message_tokens`` of each message + 4 for its framing, as ``build_prompt`` counts, plus the
    offered tool definitions) and ``max_output_tokens``, priced at the highest input and output
    prices among the candidate endpoints. Raises ``BudgetExceeded``."""
    prompt = sum(message_tokens(m) + 4 for m in run.messages)
    if offered:
        prompt += estimate_tokens(json.dumps(offered))
    output = int(run.version.max_output_tokens)
    input_price = max(price_per_token(e.input_price_per_mtok) for e in run.endpoints)
    output_price = max(price_per_token(e.output_price_per_mtok) for e in run.endpoints)
    return budget_reserve(tenant=run.tenant, tokens=prompt + output, cost=prompt * input_price + output * output_price,
                          agent_slug=run.agent.slug, api_key_id=run.turn.session.api_key_id or "",
                          turn_id=run.turn.pk)


def _loop(run: TurnRun) -> str:
    """The tool loop: call the model; while it answers with tool calls, handle them (run,
    refuse, or park the turn for an approval) and call it again with their results. Returns the
    turn's state (``awaiting_approval`` when parked)."""
    while True:
        result = _stream(run)
        if result.finish_reason == "cancelled" or not result.tool_calls:
            return _finish_turn(run, result)
        with transaction.atomic():
            _meter(run.turn, result, hold=run.hold)
        budget_fold(hold=run.hold)
        run.hold = None
        calls = []
        for n, call in enumerate(result.tool_calls, start=1):
            # The id pairs the call with its result message; a server that sends none gets one.
            call.id = call.id or f"call_{run.turn.pk}_{run.tool_calls + n}"
            calls.append(call.message())
        run.messages.append({"role": "assistant", "content": result.text or "", "tool_calls": calls})
        state = _calls_process(run, calls)
        if state is not None:
            return state


def _stop_reason(run: TurnRun) -> str:
    """``cancelled`` or ``timeout`` when the turn must stop before its next step, else ''."""
    if cancel_requested(run.schema, run.turn.pk):
        return "cancelled"
    if time.time() > run.turn.deadline.timestamp():
        return "timeout"
    return ""


def _calls_process(run: TurnRun, calls: list[dict[str, Any]]) -> str | None:
    """Handle one model response's tool calls in order (``tool_loop.call_handle``); the turn's
    state when the turn ended or parked, ``None`` to call the model again.

    Bounds: a turn makes at most ``AGENT_MAX_TOOL_CALLS`` tool calls (invalid ones count); a
    model asking for more ends the turn *completed*, its answer saying that the agent stopped
    after that many calls (the user gets what was written and can ask again). Cancellation and
    the turn's deadline are checked before each call."""
    for position, call in enumerate(calls):
        stop = _stop_reason(run)
        if stop:
            return _finish_turn(run, None, outcome=stop)
        if run.tool_calls >= settings.AGENT_MAX_TOOL_CALLS:
            logger.info("tool_loop_limit", tool_calls=run.tool_calls, invalid_calls=run.invalid_calls)
            note = (f"(The agent stopped after {run.tool_calls} tool calls, the most one answer may make. "
                    "Ask again to continue.)")
            return _finish_turn(run, None, note=note)
        handled = tool_loop.call_handle(run, call, remaining=calls[position + 1:])
        if handled == "parked":
            return str(Turn.Status.AWAITING_APPROVAL)
        if handled in Turn.FINAL:
            return handled
    return None


def _finish_turn(run: TurnRun, result: StreamResult | None, *, outcome: str = "", note: str = "") -> str:
    """End the turn: meter the last model call (``result``; ``None`` when the turn ends between
    calls), save the answer (all text streamed in the turn, plus ``note``) with the citations,
    set the final state (completed, cancelled, or failed ``turn_timeout``; ``outcome`` forces
    ``cancelled`` or ``timeout``), audit, and publish the final event."""
    turn, version, agent = run.turn, run.version, run.agent
    if note:
        sep = "\n\n" if run.text and not run.text[-1].isspace() else ""
        run.batcher.add(sep + note)
        run.batcher.flush()
        run.text += sep + note
    endpoint = run.endpoint or run.endpoints[0]
    if result is not None and result.finish_reason == "cancelled":
        deadline = turn.deadline.timestamp()
        outcome = "timeout" if time.time() > deadline and not cancel_requested(run.schema, turn.pk) else "cancelled"
    with transaction.atomic():
        turn.refresh_from_db(fields=["status"])
        if turn.status in Turn.FINAL:  # the sweeper got there first
            return str(turn.status)
        message = None
        if run.text:
            message = Message.objects.create(session_id=turn.session_id, role=Message.Role.ASSISTANT,
                                             content=run.text, citations=run.citations,
                                             input_tokens=run.input_tokens, output_tokens=run.output_tokens)
        fields: dict[str, Any] = {"assistant_message": message, "endpoint_name": endpoint.name,
                                  "model": endpoint.model, "input_tokens": run.input_tokens,
                                  "output_tokens": run.output_tokens, "first_token_at": run.first_token_at,
                                  "timings": run.batcher.marks or {}}
        if run.tool_calls:
            # The loop's counts stay with the turn (its messages are needed only while parked).
            fields["loop_state"] = {"model_calls": run.model_calls, "tool_calls": run.tool_calls,
                                    "invalid_calls": run.invalid_calls}
        if outcome == "timeout":
            _finish(turn, Turn.Status.FAILED, error_code="turn_timeout",
                    error_message="The answer took longer than the turn's deadline.", **fields)
        elif outcome == "cancelled":
            _finish(turn, Turn.Status.CANCELLED, **fields)
        else:
            _finish(turn, Turn.Status.COMPLETED, **fields)
        audit_event_create(actor=Principal.system("chat-worker"), action=f"turn.{turn.status}", target_type="turn",
                           target_id=turn.pk, payload={"session_id": turn.session_id, "agent": agent.slug,
                                                       "version": version.number, "endpoint": endpoint.name,
                                                       "input_tokens": run.input_tokens,
                                                       "output_tokens": run.output_tokens,
                                                       "model_calls": run.model_calls, "tool_calls": run.tool_calls,
                                                       "invalid_tool_calls": run.invalid_calls})
        if result is not None:
            _meter(turn, result, hold=run.hold)
    if result is not None:
        # After the commit: the fold locks the budget counters for its one statement only.
        budget_fold(hold=run.hold)
        run.hold = None
    logger.info("turn_finished", status=str(turn.status), model_calls=run.model_calls, tool_calls=run.tool_calls,
                invalid_tool_calls=run.invalid_calls)
    usage = {"input_tokens": run.input_tokens, "output_tokens": run.output_tokens,
             "estimated": run.usage_estimated, **turn_cost_fields(turn.pk, currency=endpoint.currency)}
    if turn.status == Turn.Status.COMPLETED:
        events.publish(run.group, {"event": "turn.completed", "turn_id": turn.pk,
                                   "message_id": message.pk if message else None, "content": run.text,
                                   "citations": run.citations, "usage": usage})
    elif turn.status == Turn.Status.CANCELLED:
        events.publish(run.group, {"event": "turn.cancelled", "turn_id": turn.pk,
                                   "message_id": message.pk if message else None})
    else:
        events.publish(run.group, {"event": "turn.failed", "turn_id": turn.pk,
                                   "error": {"code": turn.error_code, "message": turn.error_message}})
    return str(turn.status)


# --- Resuming a turn after its approval was decided -------------------------------------------

def _claim_resume(turn_id: int) -> tuple[Turn, ApprovalRequest] | None:
    """Move a turn parked on a decided approval back to running, with a fresh deadline; ``None``
    when it is not (still pending, already resumed by another task, cancelled, expired, gone).
    The row lock makes two resume tasks of one turn take turns: the second finds it running."""
    with transaction.atomic():
        turn = (Turn.objects.select_for_update(of=("self",))
                .select_related("session", "session__agent", "agent_version", "user_message")
                .filter(pk=turn_id).first())
        if turn is None or turn.status != Turn.Status.AWAITING_APPROVAL:
            return None
        approval = (ApprovalRequest.objects.select_related("tool_call").filter(turn_id=turn.pk)
                    .order_by("-pk").first())
        if approval is None or approval.status not in (ApprovalRequest.Status.APPROVED,
                                                       ApprovalRequest.Status.REJECTED):
            return None
        now = timezone.now()
        turn.status = Turn.Status.RUNNING
        turn.heartbeat_at = now
        turn.deadline = now + dt.timedelta(seconds=settings.CHAT_TURN_DEADLINE_SECONDS)
        turn.save(update_fields=["status", "heartbeat_at", "deadline"])
        return turn, approval


def turn_resume(turn_id: int) -> str:
    """Resume turn ``turn_id`` after its approval request was decided: execute an approved call
    exactly once (or tell the model it was rejected, by whom and why), handle the rest of that
    model response's calls, and continue the tool loop; returns the turn's state. Idempotent: a
    turn that is not waiting on a decided approval is ``skipped`` (a second resume task, a
    redelivered one, one for a cancelled or expired turn)."""
    schema: str = connection.schema_name  # type: ignore[attr-defined]
    claimed = _claim_resume(turn_id)
    if claimed is None:
        return "skipped"
    turn, approval = claimed
    group = events.session_group(schema, turn.session_id)
    text = str((turn.loop_state or {}).get("text") or "")
    batcher = DeltaBatcher(schema=schema, group=group, turn_id=turn.pk,
                           interval=settings.CHAT_DELTA_INTERVAL_MS / 1000, sent_chars=len(text),
                           marks=dict(turn.timings or {}))
    return _drive(turn, schema=schema, group=group, batcher=batcher,
                  body=lambda: _resume(turn, approval, schema=schema, group=group, batcher=batcher))


def _restore(turn: Turn, *, schema: str, group: str, batcher: DeltaBatcher) -> TurnRun:
    """The run state of a parked turn, from ``Turn.loop_state``; publishes ``turn.started`` again
    so that clients following the session resume. Raises ``TurnRefused`` as ``_prepare``."""
    version = turn.agent_version
    tenant, agent, endpoints = _runnable(turn, schema=schema)
    state = turn.loop_state or {}
    events.publish(group, {"event": "turn.started", "turn_id": turn.pk, "model": endpoints[0].model,
                           "endpoint": endpoints[0].name})
    first = state.get("first_token_at")
    return TurnRun(turn=turn, schema=schema, group=group, batcher=batcher, tenant=tenant, agent=agent,
                   version=version,
                   endpoints=endpoints, messages=list(state.get("messages") or []),
                   citations=list(state.get("citations") or []), response_format=_response_format(version),
                   first_token_at=dt.datetime.fromisoformat(first) if first else None,
                   tools=tools_for_version(version) if version.tools else {},
                   model_calls=int(state.get("model_calls") or 0), tool_calls=int(state.get("tool_calls") or 0),
                   invalid_calls=int(state.get("invalid_calls") or 0),
                   input_tokens=int(state.get("input_tokens") or 0),
                   output_tokens=int(state.get("output_tokens") or 0),
                   usage_estimated=bool(state.get("usage_estimated")), text=str(state.get("text") or ""))


def _resume(turn: Turn, approval: ApprovalRequest, *, schema: str, group: str, batcher: DeltaBatcher) -> str:
    run = _restore(turn, schema=schema, group=group, batcher=batcher)
    tool_loop.decided_call_handle(run, approval)
    state = _calls_process(run, list((turn.loop_state or {}).get("pending_calls") or []))
    if state is not None:
        return state
    return _loop(run)
