"""Reads on approval requests of tool calls, scoped to the current tenant's schema.

Every member or key holding ``approvals:read`` (owner, admin, operator, approver, auditor) reads
every request of its tenant: approvers must see what they decide, auditors what was decided.
Another tenant's ids are "not found" (they live in another schema).
"""

from __future__ import annotations

from django.db.models import Case, IntegerField, QuerySet, Value, When

from agents.models import ApprovalRequest, ToolCall
from config.errors import NotFound, ValidationFailed
from tenants.principal import Principal

STATUSES = tuple(ApprovalRequest.Status.values)


def approval_list(*, principal: Principal, status: str | None = None) -> QuerySet[ApprovalRequest]:
    """Approval requests newest first, with their turn, session, agent, tool call and tool
    selected (no query per row). ``status`` filters (one of ``STATUSES``). Raises ``Forbidden``
    without ``approvals:read``, ``ValidationFailed`` (``invalid_status``) for an unknown status."""
    principal.require("approvals:read")
    if status is not None and status not in STATUSES:
        raise ValidationFailed(
            f"status must be one of {', '.join(STATUSES)}.",
            code="invalid_status",
            details={"field": "status", "allowed": list(STATUSES)},
        )
    queryset = ApprovalRequest.objects.select_related("turn__session__agent", "tool_call__tool").order_by("-pk")
    if status is not None:
        queryset = queryset.filter(status=status)
    return queryset


def approval_queue(*, principal: Principal, status: str | None = None) -> QuerySet[ApprovalRequest]:
    """``approval_list`` with the pending requests first (then newest first): the console's queue."""
    pending_first = Case(
        When(status=ApprovalRequest.Status.PENDING, then=Value(0)), default=Value(1), output_field=IntegerField()
    )
    return approval_list(principal=principal, status=status).order_by(pending_first, "-pk")


def approval_get(*, principal: Principal, approval_id: int) -> ApprovalRequest:
    """One approval request of this tenant; ``NotFound`` otherwise (``Forbidden`` without
    ``approvals:read``)."""
    approval = approval_list(principal=principal).filter(pk=approval_id).first()
    if approval is None:
        raise NotFound("No such approval request.")
    return approval


def approval_pending_count(*, principal: Principal) -> int:
    """How many requests wait for a decision (0 without ``approvals:read``)."""
    if not principal.can("approvals:read"):
        return 0
    return ApprovalRequest.objects.filter(status=ApprovalRequest.Status.PENDING).count()


def tool_call_previous(*, principal: Principal, approval: ApprovalRequest) -> ToolCall | None:
    """The call of the same tool (by name) made before ``approval``'s call in this tenant with
    parsed arguments, or ``None``: what the approver compares the new arguments with."""
    principal.require("approvals:read")
    return (
        ToolCall.objects.filter(tool_name=approval.tool_name, pk__lt=approval.tool_call_id, arguments__isnull=False)
        .exclude(status=ToolCall.Status.INVALID)
        .order_by("-pk")
        .first()
    )
