"""Celery tasks for chat. Turn tasks run on the ``llm.<tier>`` queues, on a thread pool (they
wait on model tokens, not the CPU); tenant-schemas-celery runs each in the sender's schema."""

from __future__ import annotations

import structlog
from celery import Task, shared_task
from django.db import connection

from agents.runtime import events
from agents.runtime.orchestrator import turn_resume, turn_run, turn_run_started
from agents.runtime.timings import mark, marks_clean
from agents.services import chat_message_accept, turns_sweep
from config.errors import DomainError
from tenants.models import Membership
from tenants.principal import Principal

logger = structlog.get_logger(__name__)


@shared_task(name="agents.turn_run", ignore_result=True, acks_late=False)
def turn_run_task(turn_id: int, marks: dict[str, float] | None = None) -> str:
    """Run one turn to a final state (see ``agents.runtime.orchestrator.turn_run``); ``marks``: its
    step marks so far (``agents.runtime.timings``)."""
    steps = marks_clean(marks)
    mark(steps, "dispatched")
    return turn_run(turn_id, steps)


@shared_task(name="agents.turn_resume", ignore_result=True, acks_late=False)
def turn_resume_task(turn_id: int) -> str:
    """Resume a turn whose approval request was decided (``orchestrator.turn_resume``); sent on
    the turn's queue after the decision commits."""
    return turn_resume(turn_id)


@shared_task(name="agents.turn_sweep", ignore_result=True)
def turn_sweep() -> int:
    """Beat entry point, sent once per tenant: fail turns past their deadline or whose worker died,
    and resume parked turns whose decided approval lost its resume task."""
    result = turns_sweep()
    if result.failed or result.resumed:
        logger.warning("turns_swept", failed=result.failed, resumed=result.resumed)
    return result.failed


@shared_task(name="agents.approvals_expire", ignore_result=True)
def approvals_expire_task() -> int:
    """Beat entry point, sent once per tenant: expire approval requests nobody decided in time
    (``approval_services.approvals_expire``) and fail their turns."""
    from agents.approval_services import approvals_expire

    expired = approvals_expire()
    if expired:
        logger.info("approvals_expired", expired=expired)
    return expired


@shared_task(name="agents.chat_message_accept", ignore_result=True, acks_late=False, bind=True)
def chat_message_accept_task(self: Task, membership_id: int, session_id: int, content: str,
                             marks: dict[str, float] | None = None) -> None:
    """Save a message sent over the chat socket and run its turn, in the worker rather than in
    the socket's process, which relays every session's tokens and so must not spend its time on
    a send's database work (``tests/bench/bench_chat.py``). The socket sends this task to the
    queue of the agent's tier as it was when the socket connected; the turn runs right here
    (``chat_message_accept`` saves it running: no claim and no second task). The outcome reaches
    the session's sockets through its group: ``message.accepted`` (then the turn's events) or
    ``error``, with the REST API's codes. ``marks``: the socket's step marks
    (``agents.runtime.timings``).
    """
    steps = marks_clean(marks)
    mark(steps, "dispatched")
    schema: str = connection.schema_name  # type: ignore[attr-defined]
    group = events.session_group(schema, session_id)
    membership = (Membership.objects.select_related("user", "tenant", "tenant__plan")
                  .filter(pk=membership_id, tenant__schema_name=schema).first())
    if membership is None:  # removed from the tenant since the socket opened
        events.publish(group, {"event": "error", "error": {"code": "forbidden",
                                                           "message": "You are no longer a member of this workspace."}})
        return
    principal = Principal.for_member(membership)
    queue = str((self.request.delivery_info or {}).get("routing_key") or "")
    try:
        turn = chat_message_accept(principal=principal, session_id=session_id, content=content,
                                   queue=queue if queue.startswith("llm.") else "llm.standard")
    except DomainError as exc:
        events.publish(group, {"event": "error", "error": {"code": exc.code, "message": exc.message}})
        return
    mark(steps, "accepted")
    mark(steps, "claimed")
    turn_run_started(turn, steps, tenant=membership.tenant)
