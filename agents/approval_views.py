"""Console pages for approval requests of tool calls (``/approvals/``).

The queue lists pending requests first and refreshes itself every few seconds through htmx
(the table partial polls; a plain link reloads it without JavaScript). A request's page shows
who asked and why, the arguments field by field next to the tool's schema (and, for write
tools, next to the previous call's arguments), and to holders of ``approvals:decide`` who did
not ask for it, approve / reject buttons with a reason.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from agents import approval_selectors as selectors
from agents import approval_services as services
from agents.models import ApprovalRequest, Tool
from config.errors import DomainError
from config.htmx import domain_errors_as_pages, is_fragment, render_page, toast
from tenants.principal import Principal, request_principal

QUEUE_SIZE = 200


@dataclasses.dataclass(frozen=True)
class ArgumentRow:
    """One argument of a call next to its schema: ``value`` and ``previous`` are display text
    (JSON for anything but a string); ``changed`` compares with the previous call's value."""

    name: str
    type: str
    description: str
    required: bool
    value: str
    present: bool
    previous: str
    previous_present: bool
    changed: bool


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _type_of(spec: dict[str, Any]) -> str:
    kind = spec.get("type")
    text = " | ".join(map(str, kind)) if isinstance(kind, list) else str(kind or "any")
    if isinstance(spec.get("enum"), list):
        text += " (" + ", ".join(_text(v) for v in spec["enum"]) + ")"
    return text


def argument_rows(*, parameters: Any, arguments: Any, previous: Any = None) -> list[ArgumentRow]:
    """The call's arguments field by field: the schema's properties in their order, then any
    argument the schema does not name. ``previous`` (a dict, or ``None`` for no previous call)
    gives the comparison column."""
    props = parameters.get("properties") if isinstance(parameters, dict) else None
    props = props if isinstance(props, dict) else {}
    required = set(parameters.get("required") or []) if isinstance(parameters, dict) else set()
    args = arguments if isinstance(arguments, dict) else {}
    prev = previous if isinstance(previous, dict) else {}
    names = list(props) + [name for name in args if name not in props]
    rows: list[ArgumentRow] = []
    for name in names:
        found = props.get(name)
        spec: dict[str, Any] = found if isinstance(found, dict) else {}
        rows.append(
            ArgumentRow(
                name=name,
                type=_type_of(spec) if spec else "(not in the schema)",
                description=str(spec.get("description") or ""),
                required=name in required,
                value=_text(args[name]) if name in args else "",
                present=name in args,
                previous=_text(prev[name]) if name in prev else "",
                previous_present=name in prev,
                changed=previous is not None and (name in args, args.get(name)) != (name in prev, prev.get(name)),
            )
        )
    return rows


def _decision_context(
    principal: Principal, approval: ApprovalRequest, error: str = "", reason: str = ""
) -> dict[str, Any]:
    can_decide = principal.can("approvals:decide")
    return {
        "approval": approval,
        "error": error,
        "reason": reason if error else "",
        "may_decide": services.may_decide(principal=principal, approval=approval),
        "own_request": can_decide and not services.may_decide(principal=principal, approval=approval),
        "reason_max": services.REASON_MAX_CHARS,
    }


@require_GET
@domain_errors_as_pages
def approval_list(request: HttpRequest) -> HttpResponse:
    """The queue: pending requests first, then the newest; ``?status=`` filters (htmx swaps and
    polls the table)."""
    principal = request_principal(request)
    status = request.GET.get("status") or None
    if status not in selectors.STATUSES:
        status = None
    approvals = list(selectors.approval_queue(principal=principal, status=status)[:QUEUE_SIZE])
    return render_page(
        request,
        "agents/approval_list.html",
        {
            "approvals": approvals,
            "status": status or "",
            "statuses": ApprovalRequest.Status.choices,
        },
        partial="approval-table",
    )


def _detail_context(principal: Principal, approval_id: int, error: str = "") -> dict[str, Any]:
    approval = selectors.approval_get(principal=principal, approval_id=approval_id)
    tool = approval.tool_call.tool
    previous = None
    if tool is not None and tool.side_effect == Tool.SideEffect.WRITE:
        previous = selectors.tool_call_previous(principal=principal, approval=approval)
    rows = argument_rows(
        parameters=tool.parameters if tool else {},
        arguments=approval.arguments,
        previous=previous.arguments if previous is not None else None,
    )
    return {
        **_decision_context(principal, approval, error),
        "tool": tool,
        "rows": rows,
        "previous": previous,
        "excerpt": [m for m in (approval.excerpt or []) if isinstance(m, dict)],
    }


@require_GET
@domain_errors_as_pages
def approval_detail(request: HttpRequest, approval_id: int) -> HttpResponse:
    """One request: who asked and why, the arguments against the schema, the decision."""
    return render_page(
        request,
        "agents/approval_detail.html",
        _detail_context(request_principal(request), approval_id),
        partial="approval-decision",
    )


@require_POST
@domain_errors_as_pages
def approval_decide(request: HttpRequest, approval_id: int) -> HttpResponse:
    """Approve or reject (``decision`` = approved | rejected, ``reason``). With htmx the decision
    block comes back re-rendered (with the refusal, e.g. "already approved by ...", when the
    service refused); without, the page is shown again after a redirect with a message."""
    principal = request_principal(request)
    approval = selectors.approval_get(principal=principal, approval_id=approval_id)
    decision = request.POST.get("decision", "")
    error = ""
    try:
        services.approval_decide(
            principal=principal, approval=approval, decision=decision, reason=request.POST.get("reason", "")
        )
    except DomainError as exc:
        error = exc.message
    done = (
        "Approved: the agent goes on."
        if decision == ApprovalRequest.Status.APPROVED
        else "Rejected: the agent is told why."
    )
    if is_fragment(request):
        approval = selectors.approval_get(principal=principal, approval_id=approval_id)
        response = render(
            request,
            "agents/approval_detail.html#approval-decision",
            _decision_context(principal, approval, error, request.POST.get("reason", "")),
        )
        return toast(response, error or done, "danger" if error else "success")
    if error:
        messages.error(request, error)
    else:
        messages.success(request, done)
    return redirect("approval_detail", approval_id=approval_id)
