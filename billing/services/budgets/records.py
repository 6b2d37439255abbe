"""Creating, changing and deleting budgets (validated, audited)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from django.db import transaction
from django.utils import timezone

from billing.models import Budget
from compliance.services import audit_event_create
from config.errors import ValidationFailed
from tenants.principal import Principal

FIELDS = ("name", "scope", "agent", "api_key", "period", "limit_tokens", "limit_cost", "alert_thresholds", "action")
MAX_THRESHOLD = 10.0


def _invalid(message: str, field: str) -> ValidationFailed:
    return ValidationFailed(message, details=[{"field": field, "message": message}])


def _clean(principal: Principal, values: dict[str, Any]) -> dict[str, Any]:
    """Validate a budget's fields (all of them, after a change); returns them normalized.
    Raises ``ValidationFailed`` (422) naming the field."""
    from agents.models import Agent
    from tenants.models import ApiKey

    out = dict(values)
    out["name"] = str(out.get("name") or "").strip()[:100]
    if out.get("scope") not in Budget.Scope.values:
        raise _invalid(f"scope must be one of {', '.join(Budget.Scope.values)}.", "scope")
    if out.get("period") not in Budget.Period.values:
        raise _invalid(f"period must be one of {', '.join(Budget.Period.values)}.", "period")
    if out.get("action") not in Budget.Action.values:
        raise _invalid(f"action must be one of {', '.join(Budget.Action.values)}.", "action")
    out["agent"] = str(out.get("agent") or "").strip() if out["scope"] == Budget.Scope.AGENT else ""
    out["api_key"] = str(out.get("api_key") or "").strip() if out["scope"] == Budget.Scope.API_KEY else ""
    if out["scope"] == Budget.Scope.AGENT and not Agent.objects.filter(slug=out["agent"]).exists():
        raise _invalid("scope 'agent' needs the slug of an existing agent in 'agent'.", "agent")
    if out["scope"] == Budget.Scope.API_KEY:
        key = out["api_key"].split("_")[-1] if "_" in out["api_key"] else out["api_key"]
        if not ApiKey.objects.filter(tenant=principal.tenant, key_id=key).exists():
            raise _invalid("scope 'api_key' needs the public id of an API key of this tenant in 'api_key'.", "api_key")
        out["api_key"] = key
    tokens = out.get("limit_tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
        raise _invalid("limit_tokens must be a positive whole number of tokens.", "limit_tokens")
    cost = out.get("limit_cost")
    if cost is not None and cost != "":
        try:
            cost = Decimal(str(cost))
        except InvalidOperation:
            raise _invalid('limit_cost must be a decimal number such as "25.00".', "limit_cost") from None
        if not cost.is_finite() or cost <= 0 or cost >= Decimal("1e14"):
            raise _invalid("limit_cost must be a positive amount below 10^14.", "limit_cost")
        out["limit_cost"] = cost.quantize(Decimal("0.000001"))
    else:
        out["limit_cost"] = None
    if tokens is None and out["limit_cost"] is None:
        raise _invalid("Set at least one limit: limit_tokens or limit_cost.", "limit_tokens")
    thresholds = out.get("alert_thresholds")
    if thresholds is None:
        thresholds = [0.8, 1.0]
    if not isinstance(thresholds, list) or len(thresholds) > 10:
        raise _invalid("alert_thresholds must be a list of at most 10 fractions of the limit.", "alert_thresholds")
    try:
        fractions = sorted({float(t) for t in thresholds if not isinstance(t, bool)})
    except (TypeError, ValueError):
        raise _invalid("alert_thresholds must be numbers.", "alert_thresholds") from None
    if len(fractions) != len(thresholds) or any(not 0 < t <= MAX_THRESHOLD for t in fractions):
        raise _invalid("alert_thresholds must be distinct numbers in (0, 10], e.g. [0.8, 1.0].", "alert_thresholds")
    out["alert_thresholds"] = fractions
    return out


def budget_period_open(*, budget: Budget, tenant: Any) -> None:
    """Create the budget's counter of the current period, seeded from the usage events already
    in it, so that a new budget shows (and enforces) the period so far at once."""
    from django.db import connection

    from billing.services.budgets.enforcement import Counter, _periods_ensure, period_bounds

    counter = Counter(
        key=f"budget:{budget.pk}",
        budget=budget,
        period=budget.period,
        limit_tokens=budget.limit_tokens,
        limit_cost=budget.limit_cost,
        blocks=False,
    )
    bounds = {counter.key: period_bounds(budget.period, timezone.now(), getattr(tenant, "time_zone", "") or "UTC")}
    with connection.cursor() as cursor:
        _periods_ensure(cursor, [counter], bounds)


def _snapshot(budget: Budget) -> dict[str, Any]:
    return {
        f: (str(getattr(budget, f)) if f == "limit_cost" and budget.limit_cost is not None else getattr(budget, f))
        for f in FIELDS
    }


@transaction.atomic
def budget_create(*, principal: Principal, **values: Any) -> Budget:
    """Create a budget from ``values`` (``FIELDS``; defaults: scope tenant, period month, action
    block, thresholds [0.8, 1.0]); audited ``budget.created``. Raises ``Forbidden`` without
    ``billing:write``, ``ValidationFailed`` for invalid fields."""
    principal.require("billing:write")
    values = {"scope": Budget.Scope.TENANT, "period": Budget.Period.MONTH, "action": Budget.Action.BLOCK, **values}
    clean = _clean(principal, {f: values.get(f) for f in FIELDS})
    person = principal.person
    budget = Budget.objects.create(**clean, created_by_id=person.pk if person else None)
    budget_period_open(budget=budget, tenant=principal.tenant)
    audit_event_create(
        actor=principal, action="budget.created", target_type="budget", target_id=budget.pk, payload=_snapshot(budget)
    )
    return budget


@transaction.atomic
def budget_update(*, principal: Principal, budget: Budget, **changes: Any) -> Budget:
    """Change some fields of ``budget`` (``FIELDS``); the current period's counters keep their
    spend and are checked against the new limits from the next call. Audited ``budget.changed``
    with the changed fields before and after. Raises as ``budget_create``."""
    principal.require("billing:write")
    before = _snapshot(budget)
    clean = _clean(
        principal, {**before, "limit_cost": budget.limit_cost, **{k: v for k, v in changes.items() if k in FIELDS}}
    )
    for name, value in clean.items():
        setattr(budget, name, value)
    budget.updated_at = timezone.now()
    budget.save()
    if any(before[f] != getattr(budget, f) for f in ("scope", "agent", "api_key", "period")):
        # What the counters counted no longer matches: count the current period again.
        budget.periods.all().delete()
        budget_period_open(budget=budget, tenant=principal.tenant)
    after = _snapshot(budget)
    changed = {k: {"from": before[k], "to": after[k]} for k in FIELDS if before[k] != after[k]}
    # The counters' limit columns follow the budget (they are what the console shows per period).
    budget.periods.update(limit_tokens=budget.limit_tokens, limit_cost=budget.limit_cost)
    audit_event_create(
        actor=principal,
        action="budget.changed",
        target_type="budget",
        target_id=budget.pk,
        payload={"changes": changed},
    )
    return budget


@transaction.atomic
def budget_delete(*, principal: Principal, budget: Budget) -> None:
    """Delete ``budget`` and its counters (reservations in flight settle against no row);
    audited ``budget.deleted``."""
    principal.require("billing:write")
    snapshot = _snapshot(budget)
    budget_id = budget.pk
    budget.delete()
    audit_event_create(
        actor=principal, action="budget.deleted", target_type="budget", target_id=budget_id, payload=snapshot
    )
