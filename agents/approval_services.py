"""Writes on approval requests of tool calls: a person's decision, and the expiry of undecided ones.

A tool call of a tool that ``requires_approval`` parks its turn (``awaiting_approval``) with a
pending ``ApprovalRequest`` (made by the tool loop). ``approval_decide`` records one decision,
once: the row is locked, so of two approvers clicking at once one decides and the other gets 409.
After the commit the session hears ``approval.decided`` and the turn's resume task
(``agents.turn_resume``) goes to the turn's queue, where the worker executes an approved call
exactly once or tells the model it was rejected. ``approvals_expire`` (beat, per tenant) expires
requests nobody decided in time and fails their turns with a readable message.
"""

from __future__ import annotations

import datetime as dt
from functools import partial

from django.db import connection, transaction
from django.utils import timezone

from agents.models import ApprovalRequest, ToolCall, Turn
from agents.runtime import events
from compliance.services import audit_event_create
from config import metrics
from config.errors import Conflict, DomainError, Forbidden, ValidationFailed
from config.text import require_storable
from tenants.principal import Principal

DECISIONS = (ApprovalRequest.Status.APPROVED, ApprovalRequest.Status.REJECTED)
REASON_MAX_CHARS = 2000


def _schema() -> str:
    return str(connection.schema_name)  # type: ignore[attr-defined]


def _duration_text(seconds: float) -> str:
    """``86400`` -> ``"24 hours"``; whole minutes or seconds below an hour."""
    seconds = max(int(round(seconds)), 0)
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def expiry_message(approval: ApprovalRequest) -> str:
    """What the user reads on a turn whose request expired, e.g. "The request to run
    create_ticket was not decided within 24 hours."."""
    window = (approval.expires_at - approval.created_at).total_seconds()
    return f"The request to run {approval.tool_name} was not decided within {_duration_text(window)}."


def separation_of_duties_check(*, principal: Principal, approval: ApprovalRequest) -> None:
    """Raise ``Forbidden`` (``separation_of_duties``) when ``principal`` asked for the call itself:
    the same person (a member deciding their own request, a key acting for the person who asked,
    a member whose own key asked: ``requested_by_user_id`` is the key's person then) or the same
    API key."""
    person_id: int | None = None
    key_id = ""
    if principal.api_key is not None:
        key_id = principal.api_key.key_id
        person_id = principal.api_key.acting_user_id
    elif principal.user is not None:
        person_id = principal.user.pk
    same_person = person_id is not None and approval.requested_by_user_id == person_id
    same_key = bool(key_id) and approval.requested_by_api_key_id == key_id
    if same_person or same_key:
        raise Forbidden(
            "You cannot decide a request your own message caused; another approver must decide it.",
            code="separation_of_duties",
        )


def may_decide(*, principal: Principal, approval: ApprovalRequest) -> bool:
    """True when ``principal`` holds ``approvals:decide`` and did not ask for the call (no query)."""
    if not principal.can("approvals:decide"):
        return False
    try:
        separation_of_duties_check(principal=principal, approval=approval)
    except Forbidden:
        return False
    return True


def _clean_reason(decision: str, reason: str | None) -> str:
    if decision not in DECISIONS:
        raise ValidationFailed("decision must be approved or rejected.", code="invalid_decision")
    require_storable(reason, field="reason")
    text = (reason or "").strip()
    if len(text) > REASON_MAX_CHARS:
        raise ValidationFailed(
            f"The reason is longer than {REASON_MAX_CHARS} characters.",
            code="reason_too_long",
            details={"field": "reason"},
        )
    if decision == ApprovalRequest.Status.REJECTED and not text:
        raise ValidationFailed(
            "Say why you reject the call: the reason is shown to the requester and the model.",
            code="reason_required",
            details={"field": "reason"},
        )
    return text


def _expire_locked(approval: ApprovalRequest, *, now: dt.datetime) -> None:
    """Expire a pending approval whose row the caller holds locked: the request and its call
    expired, its turn failed (``approval_expired``) if still unfinished; audited; events after
    the commit."""
    message = expiry_message(approval)
    approval.status = ApprovalRequest.Status.EXPIRED
    approval.decided_at = now
    approval.save(update_fields=["status", "decided_at"])
    call = ToolCall.objects.select_for_update().get(pk=approval.tool_call_id)
    if call.status in (ToolCall.Status.AWAITING_APPROVAL, ToolCall.Status.PENDING):
        call.status = ToolCall.Status.EXPIRED
        call.finished_at = now
        call.save(update_fields=["status", "finished_at"])
    turn = Turn.objects.select_for_update().get(pk=approval.turn_id)
    failed = turn.status in Turn.UNFINISHED
    if failed:
        turn.status = Turn.Status.FAILED
        turn.finished_at = now
        turn.error_code = "approval_expired"
        turn.error_message = message
        turn.save(update_fields=["status", "finished_at", "error_code", "error_message"])
        transaction.on_commit(partial(metrics.turn_finished, Turn.Status.FAILED, "approval_expired"))
    audit_event_create(
        actor=Principal.system("approvals_expire"),
        action="approval.expired",
        target_type="approval",
        target_id=approval.pk,
        payload={
            "tool": approval.tool_name,
            "arguments": approval.arguments,
            "requested_by": approval.requested_by_label,
            "turn_id": turn.pk,
            "expires_at": approval.expires_at.isoformat(),
        },
    )
    group = events.session_group(_schema(), turn.session_id)
    transaction.on_commit(partial(events.publish, group, events.approval_decided(approval, call.call_id)))
    if failed:
        transaction.on_commit(
            partial(
                events.publish,
                group,
                {"event": "turn.failed", "turn_id": turn.pk, "error": {"code": "approval_expired", "message": message}},
            )
        )


def _send_resume(turn_id: int, queue: str) -> None:
    from agents.tasks import turn_resume_task

    turn_resume_task.apply_async(args=[turn_id], queue=queue)


def approval_decide(
    *, principal: Principal, approval: ApprovalRequest, decision: str, reason: str = ""
) -> ApprovalRequest:
    """Approve or reject the tool call of ``approval`` (``decision``: ``"approved"`` or
    ``"rejected"``) and return the decided request.

    The request's row is locked (``SELECT ... FOR UPDATE``) so that a request is decided once.
    Sets the request's status, ``decided_by_*``, ``decided_at`` and ``reason``, and its
    ``ToolCall``'s status (``approved`` / ``rejected``); audits ``approval.approved`` /
    ``approval.rejected`` (tool, arguments, requester, reason). After the commit: publishes
    ``approval.decided`` to the session's group and sends ``agents.turn_resume`` on the turn's
    queue.

    ``reason``: optional to approve, required to reject; at most 2000 characters.

    Raises ``Forbidden`` without ``approvals:decide`` (``permission_denied``) or when the
    principal asked for the call (``separation_of_duties``); ``ValidationFailed``
    (``invalid_decision``, ``reason_required``, ``reason_too_long``, ``invalid_characters``);
    ``Conflict`` when already decided (``approval_decided``), past ``expires_at``
    (``approval_expired``: the request is then expired and its turn failed, and that is
    committed before the error is raised) or cancelled with its turn (``approval_cancelled``).
    """
    principal.require("approvals:decide")
    reason = _clean_reason(decision, reason)
    # Not one @transaction.atomic: an expired request is marked expired in a transaction that
    # commits, and only then is the 409 raised (raising inside would roll the expiry back).
    error: DomainError | None = None
    with transaction.atomic():
        locked = (
            ApprovalRequest.objects.select_for_update(of=("self",))
            .select_related("tool_call", "turn")
            .get(pk=approval.pk)
        )
        separation_of_duties_check(principal=principal, approval=locked)
        now = timezone.now()
        if locked.status != ApprovalRequest.Status.PENDING:
            who = f" by {locked.decided_by_label}" if locked.decided_by_label else ""
            codes: dict[str, str] = {"expired": "approval_expired", "cancelled": "approval_cancelled"}
            code = codes.get(locked.status, "approval_decided")
            raise Conflict(
                f"This request was already {locked.status}{who}.",
                code=code,
                details={"status": locked.status, "decided_by": locked.decided_by_label or None},
            )
        if locked.expires_at <= now:
            _expire_locked(locked, now=now)
            error = Conflict(
                f"This request expired at {locked.expires_at.isoformat()} before it was decided.",
                code="approval_expired",
                details={"status": locked.status},
            )
        else:
            _decide_locked(principal=principal, approval=locked, decision=decision, reason=reason, now=now)
    if error is not None:
        raise error
    return locked


def _decide_locked(
    *, principal: Principal, approval: ApprovalRequest, decision: str, reason: str, now: dt.datetime
) -> None:
    approval.status = decision
    if principal.user is not None:
        approval.decided_by_user_id = principal.user.pk
    elif principal.api_key is not None:
        approval.decided_by_user_id = principal.api_key.acting_user_id
    approval.decided_by_api_key_id = principal.api_key.key_id if principal.api_key is not None else ""
    approval.decided_by_label = principal.label[:200]
    approval.decided_at = now
    approval.reason = reason
    approval.save(
        update_fields=[
            "status",
            "decided_by_user_id",
            "decided_by_api_key_id",
            "decided_by_label",
            "decided_at",
            "reason",
        ]
    )
    call = approval.tool_call
    ToolCall.objects.filter(pk=call.pk, status=ToolCall.Status.AWAITING_APPROVAL).update(
        status=ToolCall.Status.APPROVED if decision == ApprovalRequest.Status.APPROVED else ToolCall.Status.REJECTED
    )
    audit_event_create(
        actor=principal,
        action=f"approval.{decision}",
        target_type="approval",
        target_id=approval.pk,
        payload={
            "tool": approval.tool_name,
            "arguments": approval.arguments,
            "requested_by": approval.requested_by_label,
            "requested_by_user_id": approval.requested_by_user_id,
            "requested_by_api_key_id": approval.requested_by_api_key_id or None,
            "reason": reason,
            "turn_id": approval.turn_id,
            "call_id": call.call_id,
        },
    )
    turn = approval.turn
    group = events.session_group(_schema(), turn.session_id)
    transaction.on_commit(partial(events.publish, group, events.approval_decided(approval, call.call_id)))
    transaction.on_commit(partial(_send_resume, turn.pk, turn.queue))


def approvals_expire(*, now: dt.datetime | None = None) -> int:
    """Expire every pending request of the current schema past its ``expires_at``; returns how
    many were expired.

    Each is expired in its own transaction with its row locked; one no longer pending (decided
    meanwhile, or by a concurrent run) is skipped, so the function is idempotent and safe to
    run next to deciders. Effects per request as in ``approval_decide``'s expiry: the request
    and its ``ToolCall`` ``expired``, the turn ``failed`` (``approval_expired``, "The request to
    run <tool> was not decided within <window>."), audit ``approval.expired``, events
    ``approval.decided`` (status ``expired``) and ``turn.failed``.
    """
    now = now or timezone.now()
    due = list(
        ApprovalRequest.objects.filter(status=ApprovalRequest.Status.PENDING, expires_at__lte=now)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    expired = 0
    for approval_id in due:
        with transaction.atomic():
            approval = (
                ApprovalRequest.objects.select_for_update(of=("self",))
                .filter(pk=approval_id, status=ApprovalRequest.Status.PENDING, expires_at__lte=now)
                .first()
            )
            if approval is None:
                continue
            _expire_locked(approval, now=now)
            expired += 1
    return expired
