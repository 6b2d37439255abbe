"""REST endpoints for approval requests of tool calls (``/api/v1/approvals``).

``approvals:read`` lists and reads a tenant's requests; ``approvals:decide`` approves or rejects
one (``POST /approvals/{id}/approve`` or ``/reject`` with ``{"reason": "..."}``; a reason is
required to reject). A request is decided once: a second decision, or one after the request
expired, answers 409 (``approval_decided``, ``approval_expired``). Whoever asked for the call
(the member, or a key acting for them, or the same key) cannot decide it: 403
``separation_of_duties``. After an approval the turn resumes in its chat and the call runs once.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema

from agents import approval_selectors as selectors
from agents import approval_services as services
from agents.models import ApprovalRequest
from config.api import keyset_page, principal_of

router = Router(tags=["approvals"])


class ApprovalFilters(Schema):
    limit: int = 50
    cursor: str | None = None
    status: str | None = Field(None, description="pending, approved, rejected, expired or cancelled")


class DecisionIn(Schema):
    reason: str = Field("", description="Why; optional to approve, required to reject (at most 2000 characters)")


class ExcerptMessage(Schema):
    role: str
    content: str


class ApprovalOut(Schema):
    id: int
    status: str = Field(description="pending, approved, rejected, expired or cancelled")
    tool: str = Field(description="The tool's name")
    tool_description: str
    side_effect: str | None = Field(description="read or write; null when the tool was deleted since")
    arguments: dict[str, Any] = Field(
        description="The arguments the model gave the call, validated by the tool's schema"
    )
    parameters: dict[str, Any] = Field(description="The tool's JSON Schema of its arguments")
    excerpt: list[ExcerptMessage] = Field(description="The end of the conversation that led to the call")
    requested_by: str = Field(description="Who sent the message that caused the call (an email or key prefix)")
    requested_by_user_id: int | None
    requested_by_api_key_id: str | None
    agent: str = Field(description="The agent's slug")
    session_id: int
    turn_id: int
    call_id: str = Field(description="The tool call's id as the model gave it (as in the chat's tool.call event)")
    created_at: dt.datetime
    expires_at: dt.datetime
    decided_by: str | None
    decided_at: dt.datetime | None
    reason: str


class ApprovalPage(Schema):
    items: list[ApprovalOut]
    next_cursor: str | None


def _excerpt(raw: Any) -> list[dict[str, str]]:
    items = raw if isinstance(raw, list) else []
    return [
        {"role": str(m.get("role", "")), "content": str(m.get("content") or "")} for m in items if isinstance(m, dict)
    ]


def approval_out(approval: ApprovalRequest) -> dict[str, Any]:
    """An approval request as ``ApprovalOut`` (expects ``approval_list``'s related rows selected)."""
    call = approval.tool_call
    tool = call.tool
    return {
        "id": approval.pk,
        "status": approval.status,
        "tool": approval.tool_name,
        "tool_description": tool.description if tool else "",
        "side_effect": tool.side_effect if tool else None,
        "arguments": approval.arguments if isinstance(approval.arguments, dict) else {},
        "parameters": tool.parameters if tool and isinstance(tool.parameters, dict) else {},
        "excerpt": _excerpt(approval.excerpt),
        "requested_by": approval.requested_by_label,
        "requested_by_user_id": approval.requested_by_user_id,
        "requested_by_api_key_id": approval.requested_by_api_key_id or None,
        "agent": approval.turn.session.agent.slug,
        "session_id": approval.turn.session_id,
        "turn_id": approval.turn_id,
        "call_id": call.call_id,
        "created_at": approval.created_at,
        "expires_at": approval.expires_at,
        "decided_by": approval.decided_by_label or None,
        "decided_at": approval.decided_at,
        "reason": approval.reason,
    }


@router.get("/approvals", response=ApprovalPage, summary="Approval requests of tool calls, newest first")
def approval_list(request: HttpRequest, filters: Query[ApprovalFilters]) -> dict[str, Any]:
    """``?status=pending`` for the requests waiting for a decision; 422 ``invalid_status`` for an
    unknown status."""
    approvals = selectors.approval_list(principal=principal_of(request), status=filters.status)
    rows, cursor = keyset_page(approvals, cursor=filters.cursor, limit=filters.limit)
    return {"items": [approval_out(a) for a in rows], "next_cursor": cursor}


@router.get("/approvals/{approval_id}", response=ApprovalOut, summary="One approval request")
def approval_get(request: HttpRequest, approval_id: int) -> dict[str, Any]:
    return approval_out(selectors.approval_get(principal=principal_of(request), approval_id=approval_id))


def _decide(request: HttpRequest, approval_id: int, decision: str, reason: str) -> dict[str, Any]:
    principal = principal_of(request)
    # Refuse before reading when the caller may not decide at all (the read needs approvals:read).
    principal.require("approvals:decide")
    approval = selectors.approval_get(principal=principal, approval_id=approval_id)
    services.approval_decide(principal=principal, approval=approval, decision=decision, reason=reason)
    return approval_out(selectors.approval_get(principal=principal, approval_id=approval_id))


@router.post(
    "/approvals/{approval_id}/approve",
    response=ApprovalOut,
    summary="Approve a tool call: the turn resumes and the call runs once",
)
def approval_approve(request: HttpRequest, approval_id: int, payload: DecisionIn) -> dict[str, Any]:
    """409 ``approval_decided`` / ``approval_expired`` when it can no longer be decided; 403
    ``separation_of_duties`` for the request's own requester."""
    return _decide(request, approval_id, ApprovalRequest.Status.APPROVED, payload.reason)


@router.post(
    "/approvals/{approval_id}/reject",
    response=ApprovalOut,
    summary="Reject a tool call (reason required): the model is told and answers without it",
)
def approval_reject(request: HttpRequest, approval_id: int, payload: DecisionIn) -> dict[str, Any]:
    """422 ``reason_required`` without a reason; otherwise as approve."""
    return _decide(request, approval_id, ApprovalRequest.Status.REJECTED, payload.reason)
