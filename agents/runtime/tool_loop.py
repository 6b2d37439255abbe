"""The tool loop's handling of one tool call, for ``agents.runtime.orchestrator``.

Each call the model makes becomes a ``ToolCall`` row (``tool.call`` event) and then one of:

- invalid (not JSON, breaking the tool's schema, an unknown tool or one not on the version's
  list): never executed; the model reads the error as the call's result and may retry;
- a read tool (or a write tool without ``requires_approval``): executed in the worker within its
  timeout (capped by the time left to the turn's deadline), its result fenced as untrusted data
  in the next prompt, metered (a ``tool.call`` usage event) and audited;
- a tool that requires approval: the turn parks (``awaiting_approval``) with an
  ``ApprovalRequest``; ``decided_call_handle`` picks it up when a worker resumes the turn.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import TYPE_CHECKING, Any

import structlog
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agents.models import ApprovalRequest, Tool, ToolCall, Turn
from agents.runtime import events
from agents.runtime.tools import ToolCallInvalid, ToolContext, ToolOutcome, tool_arguments_parse, tool_execute
from agents.runtime.tools import tool_result_text as result_text
from billing.models import UsageEvent
from billing.services import usage_event_record
from compliance.services import audit_event_create
from config import metrics
from config.db import connection_release
from tenants.principal import Principal

if TYPE_CHECKING:
    from agents.runtime.orchestrator import TurnRun

logger = structlog.get_logger(__name__)

EXCERPT_CHARS = 2000  # ToolCall.output_excerpt
EVENT_EXCERPT_CHARS = 500  # tool.result's excerpt
APPROVAL_EXCERPT_MESSAGES = 6  # the conversation's last messages shown to the approver
APPROVAL_EXCERPT_CHARS = 1000  # each cut to this many characters


def _worker() -> Principal:
    return Principal.system("chat-worker")


def _json_or_none(raw: str) -> Any:
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return None


def call_handle(run: TurnRun, call: dict[str, Any], *, remaining: list[dict[str, Any]]) -> str:
    """Record and handle one call (an OpenAI ``tool_calls`` entry); returns ``done`` (the model
    has its result message), ``parked`` (the turn waits for an approval, ``remaining`` saved to
    run after it), or the turn's final state when it ended meanwhile (cancelled or swept)."""
    turn = run.turn
    run.tool_calls += 1
    function = call.get("function") or {}
    name, raw = str(function.get("name") or ""), str(function.get("arguments") or "")
    parsed = _json_or_none(raw)
    row = ToolCall.objects.create(
        turn=turn,
        sequence=run.tool_calls,
        call_id=str(call.get("id") or "")[:100],
        tool=run.tools.get(name),
        tool_name=name[:200],
        arguments_raw=raw,
        arguments=parsed,
    )
    events.publish(
        run.group,
        {
            "event": "tool.call",
            "turn_id": turn.pk,
            "call_id": row.call_id,
            "tool": name,
            "arguments": parsed if parsed is not None else raw,
        },
    )
    try:
        tool, arguments = tool_arguments_parse(name=name, raw=raw, allowed=run.tools)
    except ToolCallInvalid as exc:
        _refuse(run, row, exc)
        return "done"
    if tool.requires_approval:
        return _park(run, row, tool, arguments, remaining)
    ToolCall.objects.filter(pk=row.pk).update(
        status=ToolCall.Status.RUNNING, tool=tool, arguments=arguments, started_at=timezone.now()
    )
    _execute(run, row, tool, arguments, seconds_left=_time_left(run))
    return "done"


def _time_left(run: TurnRun) -> float:
    return (run.turn.deadline - timezone.now()).total_seconds()


def _refuse(run: TurnRun, row: ToolCall, exc: ToolCallInvalid) -> None:
    run.invalid_calls += 1
    logger.info("tool_call_invalid", tool=row.tool_name, code=exc.code, invalid_calls=run.invalid_calls)
    with transaction.atomic():
        ToolCall.objects.filter(pk=row.pk).update(
            status=ToolCall.Status.INVALID,
            error_code=exc.code[:40],
            output_excerpt=exc.message[:EXCERPT_CHARS],
            finished_at=timezone.now(),
        )
        audit_event_create(
            actor=_worker(),
            action="tool_call.refused",
            target_type="tool_call",
            target_id=row.pk,
            payload={"turn_id": run.turn.pk, "tool": row.tool_name, "code": exc.code},
        )
    metrics.tool_call_counted(row.tool_name, ToolCall.Status.INVALID)
    events.publish(
        run.group,
        {
            "event": "tool.result",
            "turn_id": run.turn.pk,
            "call_id": row.call_id,
            "status": "error",
            "excerpt": exc.message[:EVENT_EXCERPT_CHARS],
        },
    )
    run.messages.append({"role": "tool", "tool_call_id": row.call_id, "content": f"Error ({exc.code}): {exc.message}"})


def _execute(run: TurnRun, row: ToolCall, tool: Tool, arguments: dict[str, Any], *, seconds_left: float) -> None:
    """Run a claimed call (status ``running``) and record it; the model gets its result."""
    turn, version = run.turn, run.version
    if seconds_left <= 0:
        outcome = ToolOutcome(
            status="error", output="The turn's time ran out before the tool could run.", error_code="tool_timeout"
        )
    else:
        # The turn's deadline covers the loop: a tool gets at most the time left.
        bounded = copy.copy(tool)
        bounded.timeout_seconds = max(0.1, min(float(tool.timeout_seconds), seconds_left))
        context = ToolContext(
            schema=run.schema,
            agent_id=run.agent.pk,
            session_id=turn.session_id,
            turn_id=turn.pk,
            collection_ids=tuple(version.collection_ids),
            retrieval_mode=version.retrieval_mode,
            max_chunks_per_document=version.retrieval_max_chunks_per_document,
            idempotency_key=f"{run.schema}:{turn.pk}:{row.pk}",
        )
        if tool.kind == Tool.Kind.HTTP:
            # Like the model stream: the tool waits on the network, its connection serves others
            # (builtins answer at once, or query the database themselves: they keep it).
            connection_release()
        outcome = tool_execute(bounded, arguments, context=context)
    _record(run, row, tool, outcome)


def _record(run: TurnRun, row: ToolCall, tool: Tool, outcome: ToolOutcome) -> None:
    turn = run.turn
    status = ToolCall.Status.OK if outcome.status == "ok" else ToolCall.Status.ERROR
    with transaction.atomic():
        ToolCall.objects.filter(pk=row.pk).update(
            status=status,
            error_code=outcome.error_code[:40],
            duration_ms=max(0, int(outcome.duration_ms)),
            output_excerpt=outcome.output[:EXCERPT_CHARS],
            request=outcome.request,
            response=outcome.response,
            finished_at=timezone.now(),
        )
        usage_event_record(
            kind=UsageEvent.Kind.TOOL_CALL,
            quantity=1,
            agent_id=run.agent.pk,
            session_id=turn.session_id,
            turn_id=turn.pk,
            metadata={"tool": tool.name, "status": str(status), "duration_ms": outcome.duration_ms},
        )
        audit_event_create(
            actor=_worker(),
            action="tool_call.executed",
            target_type="tool_call",
            target_id=row.pk,
            payload={
                "turn_id": turn.pk,
                "tool": tool.name,
                "status": str(status),
                "error_code": outcome.error_code,
                "duration_ms": outcome.duration_ms,
            },
        )
    metrics.tool_call_counted(tool.name, status)
    if outcome.hits:
        # kb_search's sources join the turn's citations, numbered after those already there.
        start = len(run.citations)
        for n, hit in enumerate(outcome.hits, start=start + 1):
            run.citations.append(
                {
                    "n": n,
                    "chunk_id": hit.chunk_id,
                    "document_id": hit.document_id,
                    "external_id": hit.external_id,
                    "title": hit.title,
                    "page_number": hit.page_number,
                    "heading_path": hit.heading_path,
                    "score": round(hit.score, 4),
                }
            )
    events.publish(
        run.group,
        {
            "event": "tool.result",
            "turn_id": turn.pk,
            "call_id": row.call_id,
            "status": "ok" if status == ToolCall.Status.OK else "error",
            "excerpt": outcome.output[:EVENT_EXCERPT_CHARS],
        },
    )
    run.messages.append(
        {
            "role": "tool",
            "tool_call_id": row.call_id,
            "content": result_text(outcome, max_chars=settings.AGENT_TOOL_RESULT_MAX_CHARS),
        }
    )


def _requester(turn: Turn) -> dict[str, Any]:
    """``requested_by_*`` of an approval: the session's owner (a member, or an API key and the
    person it acts for)."""
    from tenants.models import ApiKey, User

    session = turn.session
    if session.api_key_id:
        key = ApiKey.objects.filter(key_id=session.api_key_id).first()
        return {
            "requested_by_api_key_id": session.api_key_id,
            "requested_by_user_id": key.acting_user_id if key else None,
            "requested_by_label": (f"API key {key.name}" if key else f"API key {session.api_key_id}")[:200],
        }
    user = User.objects.filter(pk=session.user_id).first() if session.user_id else None
    return {
        "requested_by_user_id": session.user_id,
        "requested_by_label": ((user.name or user.email) if user else "")[:200],
    }


def _excerpt(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    said = [m for m in messages if m.get("role") in ("user", "assistant", "tool") and m.get("content")]
    return [
        {"role": str(m["role"]), "content": str(m["content"])[:APPROVAL_EXCERPT_CHARS]}
        for m in said[-APPROVAL_EXCERPT_MESSAGES:]
    ]


def _park(run: TurnRun, row: ToolCall, tool: Tool, arguments: dict[str, Any], remaining: list[dict[str, Any]]) -> str:
    """Save the call awaiting approval, its ``ApprovalRequest`` and the loop's state; the turn
    waits (``awaiting_approval``) and the task ends. Nothing is sent to the tool."""
    turn = run.turn
    requester = _requester(turn)
    with transaction.atomic():
        locked = Turn.objects.select_for_update().get(pk=turn.pk)
        if locked.status in Turn.FINAL:
            return str(locked.status)
        ToolCall.objects.filter(pk=row.pk).update(
            status=ToolCall.Status.AWAITING_APPROVAL, tool=tool, arguments=arguments
        )
        now = timezone.now()
        approval = ApprovalRequest.objects.create(
            tool_call_id=row.pk,
            turn=turn,
            tool_name=tool.name,
            arguments=arguments,
            excerpt=_excerpt(run.messages),
            expires_at=now + dt.timedelta(seconds=settings.APPROVAL_TTL_SECONDS),
            **requester,
        )
        Turn.objects.filter(pk=turn.pk).update(
            status=Turn.Status.AWAITING_APPROVAL,
            loop_state=run.loop_state(remaining),
            input_tokens=run.input_tokens,
            output_tokens=run.output_tokens,
            first_token_at=run.first_token_at,
            timings=run.batcher.marks or {},
            endpoint_name=(run.endpoint or run.endpoints[0]).name,
            model=(run.endpoint or run.endpoints[0]).model,
        )
        turn.status = Turn.Status.AWAITING_APPROVAL
        audit_event_create(
            actor=_worker(),
            action="approval.requested",
            target_type="approval",
            target_id=approval.pk,
            payload={
                "turn_id": turn.pk,
                "tool_call_id": row.pk,
                "tool": tool.name,
                "requested_by": requester.get("requested_by_label", ""),
            },
        )
        event = {
            "event": "approval.requested",
            "turn_id": turn.pk,
            "approval_id": approval.pk,
            "call_id": row.call_id,
            "tool": tool.name,
            "arguments": arguments,
            "expires_at": approval.expires_at.isoformat(),
        }
        group = run.group
        transaction.on_commit(lambda: events.publish(group, event))
    logger.info("turn_parked", approval_id=approval.pk, tool=tool.name)
    return "parked"


def decided_call_handle(run: TurnRun, approval: ApprovalRequest) -> None:
    """The parked call after its decision: approved -> claimed (``approved`` -> ``running`` in
    one conditional UPDATE, so it runs once however many workers try) and executed; rejected ->
    not run, the model reads who rejected it and why. A call that can no longer be claimed (it
    ran or was lost before) is never run again; the model is told its outcome is unknown."""
    row = approval.tool_call
    if approval.status == ApprovalRequest.Status.APPROVED:
        claimed = ToolCall.objects.filter(pk=row.pk, status=ToolCall.Status.APPROVED).update(
            status=ToolCall.Status.RUNNING, started_at=timezone.now()
        )
        tool = run.tools.get(row.tool_name)
        if claimed and tool is not None:
            _execute(run, row, tool, dict(row.arguments or {}), seconds_left=_time_left(run))
            return
        if claimed:  # the tool was removed from the agent since the call was made
            _record(
                run,
                row,
                Tool(name=row.tool_name),
                ToolOutcome(
                    status="error", output="The tool is no longer available to this agent.", error_code="tool_gone"
                ),
            )
            return
        run.messages.append(
            {
                "role": "tool",
                "tool_call_id": row.call_id,
                "content": "The outcome of this call is unknown; it was not run again.",
            }
        )
        return
    who = approval.decided_by_label or "an approver"
    text = f"The call was rejected by {who}: {approval.reason or 'no reason given'}. It was not run."
    metrics.tool_call_counted(row.tool_name, "rejected")
    events.publish(
        run.group,
        {
            "event": "tool.result",
            "turn_id": run.turn.pk,
            "call_id": row.call_id,
            "status": "rejected",
            "excerpt": text[:EVENT_EXCERPT_CHARS],
        },
    )
    run.messages.append({"role": "tool", "tool_call_id": row.call_id, "content": text})
