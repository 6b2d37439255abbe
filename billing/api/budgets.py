"""REST endpoints for budgets: ``GET/POST /budgets``, ``GET/PATCH/DELETE /budgets/{budget_id}``.

Scopes ``billing:read`` (reads) and ``billing:write`` (changes). Amounts are decimal strings in
the tenant's currency; the GETs carry the current period (``period_start`` in the tenant's
timezone) with its ``spent_tokens``, ``spent_cost`` and ``reserved_tokens``.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from django.http import HttpRequest
from ninja import Field, Router, Schema, Status

from billing.selectors.budgets import BudgetState, budget_get, budget_list, budget_state
from billing.services.budgets import budget_create, budget_delete, budget_update
from config.api import principal_of

router = Router(tags=["budgets"])

Amount = str | int | float


class BudgetIn(Schema):
    name: str = Field("", max_length=100)
    scope: str = Field("tenant", description="tenant | agent | api_key")
    agent: str = Field("", description="The agent's slug (scope agent)")
    api_key: str = Field("", description="The API key's public id (scope api_key)")
    period: str = Field("month", description="day | month, in the tenant's timezone")
    limit_tokens: int | None = Field(None, description="Model input + output tokens per period")
    limit_cost: Amount | None = Field(None, description="Cost per period, a decimal string in the tenant's currency")
    alert_thresholds: list[float] = Field(
        default_factory=lambda: [0.8, 1.0], description="Fractions of the limit in (0, 10]"
    )
    action: str = Field("block", description="block | alert")


class BudgetPatch(Schema):
    name: str | None = Field(None, max_length=100)
    scope: str | None = None
    agent: str | None = None
    api_key: str | None = None
    period: str | None = None
    limit_tokens: int | None = None
    limit_cost: Amount | None = None
    alert_thresholds: list[float] | None = None
    action: str | None = None


class BudgetOut(Schema):
    id: int
    name: str
    scope: str
    agent: str
    api_key: str
    period: str
    limit_tokens: int | None
    limit_cost: str | None
    alert_thresholds: list[float]
    action: str
    period_start: dt.datetime
    period_end: dt.datetime
    spent_tokens: int
    spent_cost: str
    reserved_tokens: int
    reserved_cost: str
    alerted: list[float]
    created_at: dt.datetime
    updated_at: dt.datetime


class BudgetList(Schema):
    items: list[BudgetOut]


def _amount(value: Decimal) -> str:
    # Counters keep 12 decimal places (per-token prices); the API shows the budget's 6.
    return str(Decimal(value).quantize(Decimal("0.000001")))


def budget_out(state: BudgetState) -> dict[str, Any]:
    b = state.budget
    return {
        "id": b.pk,
        "name": b.name,
        "scope": b.scope,
        "agent": b.agent,
        "api_key": b.api_key,
        "period": b.period,
        "limit_tokens": b.limit_tokens,
        "limit_cost": str(b.limit_cost) if b.limit_cost is not None else None,
        "alert_thresholds": [float(t) for t in b.alert_thresholds or []],
        "action": b.action,
        "period_start": state.period_start,
        "period_end": state.period_end,
        "spent_tokens": state.spent_tokens,
        "spent_cost": _amount(state.spent_cost),
        "reserved_tokens": state.reserved_tokens,
        "reserved_cost": _amount(state.reserved_cost),
        "alerted": state.alerted,
        "created_at": b.created_at,
        "updated_at": b.updated_at,
    }


@router.get("/budgets", response=BudgetList, summary="Budgets with their current period")
def budgets_list(request: HttpRequest) -> dict[str, Any]:
    return {"items": [budget_out(s) for s in budget_list(principal=principal_of(request))]}


@router.post("/budgets", response={201: BudgetOut}, summary="Create a budget")
def budgets_create(request: HttpRequest, payload: BudgetIn) -> Status[dict[str, Any]]:
    principal = principal_of(request)
    budget = budget_create(principal=principal, **payload.dict())
    return Status(201, budget_out(budget_state(principal=principal, budget=budget)))


@router.get("/budgets/{budget_id}", response=BudgetOut, summary="One budget with its current period")
def budgets_get(request: HttpRequest, budget_id: int) -> dict[str, Any]:
    principal = principal_of(request)
    return budget_out(budget_state(principal=principal, budget=budget_get(principal=principal, budget_id=budget_id)))


@router.patch("/budgets/{budget_id}", response=BudgetOut, summary="Change a budget")
def budgets_update(request: HttpRequest, budget_id: int, payload: BudgetPatch) -> dict[str, Any]:
    principal = principal_of(request)
    principal.require("billing:write")
    budget = budget_get(principal=principal, budget_id=budget_id)
    budget = budget_update(principal=principal, budget=budget, **payload.dict(exclude_unset=True))
    return budget_out(budget_state(principal=principal, budget=budget))


@router.delete("/budgets/{budget_id}", response={204: None}, summary="Delete a budget")
def budgets_delete(request: HttpRequest, budget_id: int) -> Status[None]:
    principal = principal_of(request)
    principal.require("billing:write")
    budget_delete(principal=principal, budget=budget_get(principal=principal, budget_id=budget_id))
    return Status(204, None)
