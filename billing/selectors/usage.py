"""Reading usage: events, summaries grouped by day, agent, model, member or API key, and the
cost of chat turns."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, get_args

from django.db.models import Count, F, Max, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncDate

from billing.models import UsageEvent
from config.errors import ValidationFailed
from tenants.principal import Principal

GroupBy = Literal["day", "agent", "model", "member", "api_key"]
GROUP_BYS: tuple[str, ...] = get_args(GroupBy)
UNATTRIBUTED = "unattributed"

# The column each grouping aggregates on (``day`` is the date of created_at in the tenant's zone).
_GROUP_COLUMNS: dict[str, str] = {"agent": "agent_id", "model": "model", "member": "user_id", "api_key": "api_key_id"}
_ZERO_COST = Decimal("0")


def usage_event_list(
    *,
    principal: Principal,
    kind: str | None = None,
    agent_id: int | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> QuerySet[UsageEvent]:
    """Usage events of the principal's tenant, newest first; ``since`` inclusive, ``until``
    exclusive. Raises ``Forbidden`` without ``usage:read``."""
    principal.require("usage:read")
    events = UsageEvent.objects.all()
    if kind:
        events = events.filter(kind=kind)
    if agent_id is not None:
        events = events.filter(agent_id=agent_id)
    if since:
        events = events.filter(created_at__gte=since)
    if until:
        events = events.filter(created_at__lt=until)
    return events.order_by("-id")


@dataclass(frozen=True)
class UsagePeriod:
    """A range of whole days in the tenant's timezone: ``start`` inclusive, ``end`` exclusive,
    and the instants they begin at (``since``, ``until``, aware)."""

    start: dt.date
    end: dt.date
    zone: zoneinfo.ZoneInfo

    @property
    def since(self) -> dt.datetime:
        return dt.datetime.combine(self.start, dt.time.min, tzinfo=self.zone)

    @property
    def until(self) -> dt.datetime:
        return dt.datetime.combine(self.end, dt.time.min, tzinfo=self.zone)

    def days(self) -> list[dt.date]:
        """Every date of the period, in order."""
        return [self.start + dt.timedelta(days=n) for n in range((self.end - self.start).days)]


def tenant_zone(principal: Principal) -> zoneinfo.ZoneInfo:
    """The IANA timezone of the principal's tenant (``Tenant.time_zone``; UTC when unset or unknown)."""
    name = getattr(principal.tenant, "time_zone", "") or "UTC"
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return zoneinfo.ZoneInfo("UTC")


def tenant_currency(principal: Principal) -> str:
    """The currency costs are shown in: the tenant's plan's (USD without a plan)."""
    plan = getattr(principal.tenant, "plan", None)
    return str(getattr(plan, "currency", "") or "USD")


def usage_period(
    *, principal: Principal, start: dt.date | None = None, end: dt.date | None = None, now: dt.datetime | None = None
) -> UsagePeriod:
    """The period ``[start, end)`` in the tenant's timezone; a missing bound defaults to the
    current month's (first of this month, first of next month) in that zone.

    Raises ``ValidationFailed`` (``invalid_period``) when ``end`` is not after ``start``, or a
    bound is outside the dates an instant can hold (years 1-9999 after the zone's offset).
    """
    zone = tenant_zone(principal)
    today = (now or dt.datetime.now(dt.UTC)).astimezone(zone).date()
    month_start = today.replace(day=1)
    next_month = (month_start + dt.timedelta(days=32)).replace(day=1)
    period = UsagePeriod(start=start or month_start, end=end or next_month, zone=zone)
    if period.end <= period.start:
        raise ValidationFailed(
            "end must be after start (start is inclusive, end exclusive).",
            code="invalid_period",
            details={"start": str(period.start), "end": str(period.end)},
        )
    try:
        period.since.astimezone(dt.UTC)
        period.until.astimezone(dt.UTC)
    except OverflowError:
        raise ValidationFailed("The period is outside the dates the portal can store.", code="invalid_period") from None
    return period


PERIOD_NAMES: dict[str, str] = {
    "this_month": "This month",
    "last_month": "Last month",
    "last_7_days": "Last 7 days",
    "last_30_days": "Last 30 days",
    "custom": "Custom",
}


def usage_period_named(
    *,
    principal: Principal,
    name: str,
    start: dt.date | None = None,
    end: dt.date | None = None,
    now: dt.datetime | None = None,
) -> UsagePeriod:
    """The period a console filter names (``PERIOD_NAMES``), in the tenant's timezone:
    ``this_month`` and ``last_month`` are calendar months, ``last_7_days`` and ``last_30_days``
    end with today (included), ``custom`` is ``[start, end)`` as ``usage_period`` reads them.
    Raises ``ValidationFailed`` (``invalid_period``) for an unknown name or a bad custom range."""
    zone = tenant_zone(principal)
    today = (now or dt.datetime.now(dt.UTC)).astimezone(zone).date()
    month_start = today.replace(day=1)
    tomorrow = today + dt.timedelta(days=1)
    if name == "this_month":
        return usage_period(principal=principal, now=now)
    if name == "last_month":
        previous = (month_start - dt.timedelta(days=1)).replace(day=1)
        return usage_period(principal=principal, start=previous, end=month_start, now=now)
    if name in ("last_7_days", "last_30_days"):
        days = 7 if name == "last_7_days" else 30
        return usage_period(principal=principal, start=tomorrow - dt.timedelta(days=days), end=tomorrow, now=now)
    if name == "custom":
        return usage_period(principal=principal, start=start, end=end, now=now)
    raise ValidationFailed(f"period must be one of {', '.join(PERIOD_NAMES)}.", code="invalid_period")


def _totals(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    totals = {"input_tokens": 0, "output_tokens": 0, "tokens": 0, "cost": _ZERO_COST, "events": 0}
    for row in rows:
        for name in totals:
            totals[name] += row[name]
    return totals


def _measures() -> dict[str, Any]:
    # Tokens are model tokens only (input + output); cost and events count every kind.
    return {
        "input_tokens": Coalesce(Sum("quantity", filter=Q(kind=UsageEvent.Kind.LLM_INPUT_TOKENS)), 0),
        "output_tokens": Coalesce(Sum("quantity", filter=Q(kind=UsageEvent.Kind.LLM_OUTPUT_TOKENS)), 0),
        "cost": Coalesce(Sum("cost"), _ZERO_COST),
        "events": Count("id"),
    }


def _labels(principal: Principal, group_by: str, keys: list[Any]) -> dict[Any, dict[str, Any]]:
    """What each group is, by its key: one query per grouping (none for ``day`` and ``model``)."""
    present = [k for k in keys if k not in (None, "")]
    if not present:
        return {}
    if group_by == "agent":
        from agents.models import Agent  # billing reads agents' names; agents import billing services

        return {
            a["id"]: {"agent": a, "label": a["name"] or a["slug"]}
            for a in Agent.objects.filter(pk__in=present).values("id", "slug", "name")
        }
    if group_by == "member":
        from tenants.models import User

        return {
            u["id"]: {"member": u, "label": u["email"]}
            for u in User.objects.filter(pk__in=present).values("id", "email")
        }
    if group_by == "api_key":
        from tenants.models import ApiKey

        keys_ = ApiKey.objects.filter(tenant=principal.tenant, key_id__in=present).values("key_id", "name")
        return {k["key_id"]: {"api_key": {"id": k["key_id"], "name": k["name"]}, "label": k["name"]} for k in keys_}
    return {}


def _group(group_by: str, key: Any, known: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """The identity of one group: ``key`` (a string), ``label`` and the grouping's object."""
    if group_by == "day":
        return {"key": key.isoformat(), "label": key.isoformat(), "date": key}
    if key in (None, ""):
        return {"key": UNATTRIBUTED, "label": "Unattributed", group_by: None}
    if group_by == "model":
        return {"key": key, "label": key, "model": key}
    if key in known:
        return {"key": str(key), **known[key]}
    # A deleted agent, member or key: its id still groups the events.
    gone: dict[str, dict[str, Any]] = {
        "agent": {"id": key, "slug": "", "name": ""},
        "member": {"id": key, "email": ""},
        "api_key": {"id": key, "name": ""},
    }
    return {"key": str(key), "label": f"{group_by.replace('_', ' ')} {key} (deleted)", group_by: gone[group_by]}


def usage_summary(*, principal: Principal, period: UsagePeriod, group_by: str) -> dict[str, Any]:
    """Usage of the principal's tenant in ``period``, aggregated in SQL (one GROUP BY query,
    plus one to name the agents, members or keys).

    Returns ``{"start", "end", "time_zone", "currency", "group_by", "groups": [...], "totals": {...}}``;
    each group and the totals carry ``input_tokens`` and ``output_tokens`` (sums of the
    quantities of ``llm.input_tokens`` / ``llm.output_tokens`` events), ``tokens`` (their sum),
    ``cost`` (Decimal, sum of every event's cost snapshot, all kinds) and ``events`` (count).
    A group has ``key`` (str), ``label`` and by grouping: ``date`` (the date in the tenant's
    timezone; days without events are left out), ``agent`` ``{id, slug, name}``, ``model``,
    ``member`` ``{id, email}`` (``UsageEvent.user_id``) or ``api_key`` ``{id, name}`` (the key's
    public id); events without one (older events, KB queries have no model) form the group
    ``key == "unattributed"`` with that object ``None``. Days ascend; other groups by cost, then
    tokens, descending. Raises ``Forbidden`` without ``usage:read``, ``ValidationFailed``
    (``invalid_group_by``) for a grouping not in ``GROUP_BYS``.
    """
    principal.require("usage:read")
    if group_by not in GROUP_BYS:
        raise ValidationFailed(f"group_by must be one of {', '.join(GROUP_BYS)}.", code="invalid_group_by")
    events = UsageEvent.objects.filter(created_at__gte=period.since, created_at__lt=period.until)
    if group_by == "day":
        events = events.annotate(group=TruncDate("created_at", tzinfo=period.zone))
    else:
        events = events.annotate(group=F(_GROUP_COLUMNS[group_by]))
    rows: list[dict[str, Any]] = [dict(row) for row in events.order_by().values("group").annotate(**_measures())]
    known = _labels(principal, group_by, [row["group"] for row in rows])
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        group = _group(group_by, row["group"], known)
        # NULL and '' (api_key_id is blank, not null, when unknown) are both unattributed.
        into = merged.setdefault(
            group["key"], {**group, "input_tokens": 0, "output_tokens": 0, "cost": _ZERO_COST, "events": 0}
        )
        for name in ("input_tokens", "output_tokens", "cost", "events"):
            into[name] += row[name]
    groups = list(merged.values())
    for group in groups:
        group["tokens"] = group["input_tokens"] + group["output_tokens"]
    if group_by == "day":
        groups.sort(key=lambda g: g["date"])
    else:
        groups.sort(key=lambda g: (-g["cost"], -g["tokens"], g["label"]))
    return {
        "start": period.start,
        "end": period.end,
        "time_zone": period.zone.key,
        "currency": tenant_currency(principal),
        "group_by": group_by,
        "groups": groups,
        "totals": _totals(groups),
    }


def turn_cost_map(*, turn_ids: Iterable[int], session_id: int | None = None) -> dict[int, dict[str, Any]]:
    """The cost of each turn: ``turn_id -> {"cost": Decimal, "currency": str}``, the SUM(cost) of
    the turn's usage events (model calls, KB queries, tool calls), in one aggregate query over the
    current schema; turns without events are left out; ``session_id`` keeps only that chat
    session's events. Unscoped: for callers that already hold the turns (the chat page's
    selector, the turn's final event)."""
    ids = sorted({int(t) for t in turn_ids})
    if not ids:
        return {}
    events = UsageEvent.objects.filter(turn_id__in=ids)
    if session_id is not None:
        events = events.filter(session_id=session_id)
    rows = (
        events.order_by()
        .values("turn_id")
        .annotate(total=Sum("cost"), currency=Max("currency"))
        .values_list("turn_id", "total", "currency")
    )
    return {int(turn_id): {"cost": total, "currency": currency} for turn_id, total, currency in rows if turn_id}


def turn_cost_fields(turn_id: int, *, currency: str = "USD") -> dict[str, str]:
    """``{"cost": "<decimal>", "currency": ...}`` of one turn, for the ``usage`` of its
    ``turn.completed`` event (a turn without usage events costs ``"0"`` in ``currency``)."""
    found = turn_cost_map(turn_ids=[turn_id]).get(turn_id)
    if found is None:
        return {"cost": "0", "currency": currency}
    return {"cost": format(found["cost"], "f"), "currency": found["currency"]}
