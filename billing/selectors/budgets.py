"""Reading budgets with their current period's counters."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
from typing import Any

from django.db.models import Q
from django.utils import timezone

from billing.models import Budget, BudgetPeriod
from billing.services.budgets.enforcement import period_bounds
from config.errors import NotFound
from tenants.principal import Principal


@dataclasses.dataclass
class BudgetState:
    """A budget and its current period (``period_start``/``period_end`` in the tenant's
    timezone; spend and reservations from the period's counter, zero when no call counted yet)."""

    budget: Budget
    period_start: dt.datetime
    period_end: dt.datetime
    spent_tokens: int = 0
    spent_cost: Decimal = Decimal(0)
    reserved_tokens: int = 0
    reserved_cost: Decimal = Decimal(0)
    alerted: list[float] = dataclasses.field(default_factory=list)

    def fraction(self, measure: str) -> float | None:
        """Spent + reserved as a fraction of the ``tokens`` or ``cost`` limit (None: no limit)."""
        if measure == "tokens":
            limit = self.budget.limit_tokens
            return (self.spent_tokens / limit) if limit else None
        limit_cost = self.budget.limit_cost
        return float(self.spent_cost / limit_cost) if limit_cost else None

    def percent(self, measure: str, *, reserved: bool = False) -> int:
        """Percent of the limit spent (or reserved), capped at 100, for progress bars."""
        if measure == "tokens":
            limit, used = self.budget.limit_tokens, self.reserved_tokens if reserved else self.spent_tokens
            return min(100, round(100 * used / limit)) if limit else 0
        limit_cost, cost = self.budget.limit_cost, self.reserved_cost if reserved else self.spent_cost
        return min(100, round(float(100 * cost / limit_cost))) if limit_cost else 0

    @property
    def tokens_percent(self) -> int:
        return self.percent("tokens")

    @property
    def tokens_reserved_percent(self) -> int:
        return min(self.percent("tokens", reserved=True), 100 - self.tokens_percent)

    @property
    def cost_percent(self) -> int:
        return self.percent("cost")

    @property
    def cost_reserved_percent(self) -> int:
        return min(self.percent("cost", reserved=True), 100 - self.cost_percent)


def _states(budgets: list[Budget], tenant: Any, now: dt.datetime) -> list[BudgetState]:
    tz = getattr(tenant, "time_zone", "") or "UTC"
    states = [BudgetState(b, *period_bounds(b.period, now, tz)) for b in budgets]
    if not states:
        return []
    where = Q()
    for state in states:
        where |= Q(key=f"budget:{state.budget.pk}", period_start=state.period_start)
    rows = {(p.key, p.period_start): p for p in BudgetPeriod.objects.filter(where)}
    for state in states:
        row = rows.get((f"budget:{state.budget.pk}", state.period_start))
        if row is not None:
            state.spent_tokens, state.spent_cost = row.spent_tokens, row.spent_cost
            state.reserved_tokens, state.reserved_cost = row.reserved_tokens, row.reserved_cost
            state.alerted = [float(a) for a in row.alerted or []]
    return states


def budget_list(*, principal: Principal, now: dt.datetime | None = None) -> list[BudgetState]:
    """The tenant's budgets (oldest first) with their current period: two queries whatever the
    number. Raises ``Forbidden`` without ``billing:read``."""
    principal.require("billing:read")
    return _states(list(Budget.objects.order_by("id")), principal.tenant, now or timezone.now())


def budget_get(*, principal: Principal, budget_id: int) -> Budget:
    """One budget of the principal's tenant; ``NotFound`` for an unknown id (another tenant's
    ids are unknown here: budgets live in the tenant's schema). Raises ``Forbidden`` without
    ``billing:read``."""
    principal.require("billing:read")
    budget = Budget.objects.filter(pk=budget_id).first()
    if budget is None:
        raise NotFound("No such budget.", code="budget_not_found")
    return budget


def budget_state(*, principal: Principal, budget: Budget, now: dt.datetime | None = None) -> BudgetState:
    """``budget`` with its current period (as ``budget_list``)."""
    principal.require("billing:read")
    return _states([budget], principal.tenant, now or timezone.now())[0]


def budget_banner(*, principal: Principal, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """The budgets whose current period passed an alert threshold (one query), for the console
    banner: ``[{"name", "threshold"}]``, the highest threshold each; empty without
    ``billing:read``."""
    if not principal.can("billing:read"):
        return []
    now = now or timezone.now()
    rows = (
        BudgetPeriod.objects.filter(budget__isnull=False, period_start__lte=now, period_end__gt=now)
        .exclude(alerted=[])
        .values("budget__name", "budget__scope", "budget_id", "alerted")
    )
    return [
        {
            "name": r["budget__name"] or f"{r['budget__scope']} budget",
            "budget_id": r["budget_id"],
            "threshold": max(float(a) for a in r["alerted"]),
        }
        for r in rows
    ]
