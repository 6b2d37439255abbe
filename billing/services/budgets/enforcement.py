"""Enforcing budgets and the plan's monthly token quota around each model call.

One PostgreSQL row lock per counter (``BudgetPeriod``), never Redis: a call's reservation is
taken in one short transaction (lock the counters in id order, check, add the reservation); its
real usage is recorded on the reservation row in the transaction that records the call's usage
events (no counter lock there), and folded into the counters right after that commit (or by the
sweep), so the counters move with the events invoices are computed from
(docs/billing-budgets.md, "Settle and fold").
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime as dt
import functools
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from billing.models import Budget, BudgetReservation, UsageEvent
from billing.periods import period_bounds
from config.errors import TooManyRequests
from config.metrics import budget_block_counted

logger = structlog.get_logger(__name__)

QUOTA_KEY = "plan:monthly_token_quota"
DEFAULT_THRESHOLDS = (0.8, 1.0)
MODEL_KINDS = (UsageEvent.Kind.LLM_INPUT_TOKENS.value, UsageEvent.Kind.LLM_OUTPUT_TOKENS.value)
# A reservation outlives its call only when the worker died: the call cannot run past the turn's
# deadline, so a minute after that nobody will settle it.
RESERVATION_GRACE_SECONDS = 60


class BudgetExceeded(TooManyRequests):
    """A blocking budget (``budget_exceeded``) or the plan's monthly token quota
    (``quota_exceeded``) has no room for a model call: HTTP 429 on the API, ``turn.failed`` in a
    turn. ``message`` names the budget, its period and limit."""

    code = "budget_exceeded"


@dataclasses.dataclass(frozen=True)
class Counter:
    """One counter a call is checked against: a budget (``budget`` set) or the plan quota."""

    key: str
    budget: Budget | None
    period: str
    limit_tokens: int | None
    limit_cost: Decimal | None
    blocks: bool

    @property
    def label(self) -> str:
        if self.budget is None:
            return "The plan's monthly token quota"
        return f"Budget '{self.budget.name or self.budget}'"

    @property
    def thresholds(self) -> list[float]:
        if self.budget is None:
            return []
        return sorted(float(t) for t in (self.budget.alert_thresholds or DEFAULT_THRESHOLDS))


@dataclasses.dataclass
class BudgetHold:
    """What one model call holds: the reservation row (``reservation_id``), the counters'
    ``BudgetPeriod`` ids with their ``Counter``, and the reserved ``tokens`` and ``cost``."""

    reservation_id: int
    periods: dict[int, Counter]
    tokens: int
    cost: Decimal
    schema: str
    tenant_id: int


def budgets_in_scope(*, agent_slug: str, api_key_id: str) -> list[Budget]:
    """The budgets of the current tenant that apply to a call of agent ``agent_slug`` made for
    API key ``api_key_id`` ('' when a member made it): tenant-wide, that agent's, that key's."""
    from django.db.models import Q

    where = Q(scope=Budget.Scope.TENANT)
    if agent_slug:
        where |= Q(scope=Budget.Scope.AGENT, agent=agent_slug)
    if api_key_id:
        where |= Q(scope=Budget.Scope.API_KEY, api_key=api_key_id)
    return list(Budget.objects.filter(where).order_by("id"))


def counters_for(*, tenant: Any, agent_slug: str, api_key_id: str) -> list[Counter]:
    """The counters a model call of ``tenant`` is checked against: its budgets in scope, and the
    plan's ``monthly_token_quota`` (tenant-wide, calendar month) when the plan sets one."""
    counters = [
        Counter(
            key=f"budget:{b.pk}",
            budget=b,
            period=b.period,
            limit_tokens=b.limit_tokens,
            limit_cost=b.limit_cost,
            blocks=b.action == Budget.Action.BLOCK,
        )
        for b in budgets_in_scope(agent_slug=agent_slug, api_key_id=api_key_id)
    ]
    plan = tenant.plan if tenant.plan_id else None
    if plan is not None and plan.monthly_token_quota:
        counters.append(
            Counter(
                key=QUOTA_KEY,
                budget=None,
                period=Budget.Period.MONTH,
                limit_tokens=int(plan.monthly_token_quota),
                limit_cost=None,
                blocks=True,
            )
        )
    return counters


def _scope_sql(budget: Budget | None) -> tuple[str, list[Any]]:
    """The WHERE clause (on usage events) of what a counter counts."""
    if budget is not None and budget.scope == Budget.Scope.AGENT:
        return "agent_id IN (SELECT id FROM agents_agent WHERE slug = %s)", [budget.agent]
    if budget is not None and budget.scope == Budget.Scope.API_KEY:
        return "api_key_id = %s", [budget.api_key]
    return "TRUE", []


# A new counter's row, seeded with the spend so far; ``{where}`` is one of _scope_sql's constant
# clauses (every value is a parameter).
_SEED_SQL = (
    "INSERT INTO billing_budgetperiod (key, budget_id, period_start, period_end, limit_tokens, limit_cost,"
    " spent_tokens, spent_cost, reserved_tokens, reserved_cost, alerted, created_at)"
    " SELECT %s, %s, %s, %s, %s, %s, COALESCE(SUM(quantity), 0), COALESCE(SUM(cost), 0), 0, 0, '[]', now()"
    " FROM billing_usageevent WHERE kind = ANY(%s) AND created_at >= %s AND created_at < %s AND {where}"
    " ON CONFLICT (key, period_start) DO NOTHING"
)


def _periods_ensure(cursor: Any, counters: list[Counter], bounds: dict[str, tuple[dt.datetime, dt.datetime]]) -> None:
    """Create the missing counters of these periods, seeded from the model usage events already
    recorded in the period for the counter's scope (a budget created mid-month counts the month
    so far). ``ON CONFLICT DO NOTHING``: two calls creating one counter agree on one row."""
    for counter in counters:
        start, end = bounds[counter.key]
        where, params = _scope_sql(counter.budget)
        cursor.execute(
            _SEED_SQL.replace("{where}", where),
            [
                counter.key,
                counter.budget.pk if counter.budget else None,
                start,
                end,
                counter.limit_tokens,
                counter.limit_cost,
                list(MODEL_KINDS),
                start,
                end,
                *params,
            ],
        )


# One round trip reserves a call: lock the counters of the periods in id order (one order for
# every caller, so two calls never deadlock), check every blocking limit, add the call to
# ``reserved_*`` and insert the reservation, both only when every check passes and every counter
# exists. Each row is returned (with the reservation id, or NULL) so a refusal can be worded.
# ``{sync}`` is ``_ASYNC_COMMIT`` when the statement is its own transaction, else ``TRUE``.
_RESERVE_SQL = """
WITH w AS (
  SELECT * FROM unnest(%(keys)s::varchar[], %(starts)s::timestamptz[], %(blocks)s::boolean[],
                       %(limit_tokens)s::bigint[], %(limit_cost)s::numeric[])
    AS w(key, start, blocks, limit_tokens, limit_cost)
), l AS (
  SELECT p.id, p.key, p.spent_tokens, p.spent_cost, p.reserved_tokens, p.reserved_cost, p.period_start,
         p.period_end, w.blocks, w.limit_tokens, w.limit_cost
  FROM billing_budgetperiod p JOIN w ON p.key = w.key AND p.period_start = w.start
  ORDER BY p.id FOR UPDATE OF p
), v AS (
  SELECT {sync} AND count(*) = %(n)s AND COALESCE(bool_and(NOT blocks OR (
           (limit_tokens IS NULL OR spent_tokens + reserved_tokens + %(tokens)s <= limit_tokens)
           AND (limit_cost IS NULL OR spent_cost + reserved_cost + %(cost)s <= limit_cost))), TRUE) AS ok,
         jsonb_agg(id ORDER BY id) AS ids
  FROM l
), u AS (
  UPDATE billing_budgetperiod p SET reserved_tokens = p.reserved_tokens + %(tokens)s,
                                    reserved_cost = p.reserved_cost + %(cost)s
  FROM l WHERE p.id = l.id AND (SELECT ok FROM v)
  RETURNING p.id
), r AS (
  INSERT INTO billing_budgetreservation (turn_id, periods, tokens, cost, created_at, expires_at)
  SELECT %(turn_id)s, v.ids, %(tokens)s, %(cost)s, %(now)s, %(expires)s FROM v WHERE v.ok
  RETURNING id
)
SELECT (SELECT id FROM r), (SELECT count(*) FROM u), l.key, l.id, l.spent_tokens, l.spent_cost, l.reserved_tokens,
       l.reserved_cost, l.period_start, l.period_end
FROM l ORDER BY l.id
"""
# In a statement that is its own transaction (autocommit), its commit need not wait for the WAL
# flush: a reservation lost to a server crash only frees room held by calls in flight.
_ASYNC_COMMIT = "set_config('synchronous_commit', 'off', true) = 'off'"


def _own_transaction() -> bool:
    """True when a statement run now commits by itself (no atomic block around it)."""
    return connection.get_autocommit() and not connection.in_atomic_block


def _reserve_statement(
    cursor: Any,
    counters: list[Counter],
    bounds: dict[str, tuple[dt.datetime, dt.datetime]],
    *,
    tokens: int,
    cost: Decimal,
    turn_id: int | None,
    now: dt.datetime,
    expires: dt.datetime,
) -> tuple[int | None, dict[str, tuple[Any, ...]]]:
    """Run ``_RESERVE_SQL``: (the reservation id, or None when refused or a counter is missing;
    key -> (id, spent_tokens, spent_cost, reserved_tokens, reserved_cost, period_start,
    period_end) as locked, before this call's reservation)."""
    sql = _RESERVE_SQL.replace("{sync}", _ASYNC_COMMIT if _own_transaction() else "TRUE")
    cursor.execute(
        sql,
        {
            "keys": [c.key for c in counters],
            "starts": [bounds[c.key][0] for c in counters],
            "blocks": [c.blocks for c in counters],
            "limit_tokens": [c.limit_tokens for c in counters],
            "limit_cost": [c.limit_cost for c in counters],
            "n": len(counters),
            "tokens": tokens,
            "cost": cost,
            "turn_id": turn_id,
            "now": now,
            "expires": expires,
        },
    )
    rows = cursor.fetchall()
    reservation_id = rows[0][0] if rows else None
    return reservation_id, {row[2]: row[3:] for row in rows}


# Counters in scope per (schema, tenant, agent, key), kept for the running turn by
# ``budget_holds_guard``: a turn's later model calls skip the budgets query, and a budget's
# change applies from the next turn (a missing counter row refreshes them at once).
_counters_cache: contextvars.ContextVar[dict[tuple[Any, ...], list[Counter]] | None] = contextvars.ContextVar(
    "budget_counters", default=None
)


def _counters(*, tenant: Any, agent_slug: str, api_key_id: str, fresh: bool = False) -> list[Counter]:
    """``counters_for``, from the running turn's cache unless ``fresh`` (or outside a turn)."""
    cache = _counters_cache.get()
    if cache is None:
        return counters_for(tenant=tenant, agent_slug=agent_slug, api_key_id=api_key_id)
    key = (connection.schema_name, tenant.pk, agent_slug, api_key_id)  # type: ignore[attr-defined]
    if fresh or key not in cache:
        cache[key] = counters_for(tenant=tenant, agent_slug=agent_slug, api_key_id=api_key_id)
    return cache[key]


def _refusal(counter: Counter, row: tuple[Any, ...], tokens: int, cost: Decimal, time_zone: str) -> str | None:
    """The message refusing a call of ``tokens`` / ``cost`` against a counter's row, or None."""
    _, spent_tokens, spent_cost, reserved_tokens, reserved_cost, start, _ = row
    local = start.astimezone(ZoneInfo(time_zone or "UTC"))
    period = f"the day of {local:%Y-%m-%d}" if counter.period == Budget.Period.DAY else f"the month {local:%Y-%m}"
    if counter.limit_tokens is not None and spent_tokens + reserved_tokens + tokens > counter.limit_tokens:
        return (
            f"{counter.label} has no room for this call in {period}: limit {counter.limit_tokens} tokens, "
            f"{spent_tokens} spent, {reserved_tokens} reserved by calls in flight, this call may use "
            f"up to {tokens}."
        )
    if counter.limit_cost is not None and spent_cost + reserved_cost + cost > counter.limit_cost:
        return (
            f"{counter.label} has no room for this call in {period}: limit {counter.limit_cost} in cost, "
            f"{spent_cost:.6f} spent, {reserved_cost:.6f} reserved by calls in flight, this call may cost "
            f"up to {cost:.6f}."
        )
    return None


# The holds of the running turn that are not settled or released yet: ``budget_holds_guard``
# releases them when the turn's code exits, whatever the path.
_holds: contextvars.ContextVar[list[BudgetHold] | None] = contextvars.ContextVar("budget_holds", default=None)


@contextlib.contextmanager
def budget_holds_guard() -> Iterator[list[BudgetHold]]:
    """Release, on exit, every reservation taken inside the block and neither settled nor
    released (an exception between the call and its metering, a turn swept meanwhile)."""
    holds: list[BudgetHold] = []
    token = _holds.set(holds)
    cache_token = _counters_cache.set({})
    try:
        yield holds
    finally:
        _holds.reset(token)
        _counters_cache.reset(cache_token)
        for hold in holds:
            try:
                budget_release(hold=hold)
            except Exception:
                logger.exception("budget_release_failed", reservation_id=hold.reservation_id)


def _forget(hold: BudgetHold) -> None:
    holds = _holds.get()
    if holds is not None and hold in holds:
        holds.remove(hold)


def budget_reserve(
    *,
    tenant: Any,
    tokens: int,
    cost: Decimal,
    agent_slug: str = "",
    api_key_id: str = "",
    turn_id: int | None = None,
    now: dt.datetime | None = None,
) -> BudgetHold | None:
    """Reserve ``tokens`` (a model call's worst case: prompt estimate + max output tokens) and
    ``cost`` (priced at the highest prices among the candidate endpoints, tenant currency)
    against every counter in scope of the call (``counters_for``; within a turn, as found by its
    first call), in the current tenant schema.

    One statement (``_RESERVE_SQL``): lock the counters of the current periods in id order,
    refuse if a blocking counter would pass a limit with spent + reserved + this call, else add
    the call to ``reserved_*`` and write a ``BudgetReservation``. Run outside a transaction, it
    is its own transaction and commits without waiting for the WAL flush. A missing counter (a
    period's first call, a budget created or changed meanwhile) reloads the counters, creates the
    missing rows (``_periods_ensure``) and runs it again. Returns the ``BudgetHold`` to settle
    or release, ``None`` when no counter applies. Raises ``BudgetExceeded`` (code
    ``budget_exceeded``, or ``quota_exceeded`` for the plan quota).
    """
    counters = _counters(tenant=tenant, agent_slug=agent_slug, api_key_id=api_key_id)
    if not counters:
        return None
    now = now or timezone.now()
    tz = getattr(tenant, "time_zone", "") or "UTC"
    bounds = {c.key: period_bounds(c.period, now, tz) for c in counters}
    expires = now + dt.timedelta(seconds=settings.CHAT_TURN_DEADLINE_SECONDS + RESERVATION_GRACE_SECONDS)
    schema: str = connection.schema_name  # type: ignore[attr-defined]
    args: dict[str, Any] = {"tokens": tokens, "cost": cost, "turn_id": turn_id, "now": now, "expires": expires}
    with connection.cursor() as cursor:
        reservation_id, rows = _reserve_statement(cursor, counters, bounds, **args)
        if len(rows) < len(counters):
            counters = _counters(tenant=tenant, agent_slug=agent_slug, api_key_id=api_key_id, fresh=True)
            if not counters:
                return None
            bounds = {c.key: period_bounds(c.period, now, tz) for c in counters}
            _periods_ensure(cursor, [c for c in counters if c.key not in rows], bounds)
            reservation_id, rows = _reserve_statement(cursor, counters, bounds, **args)
    if reservation_id is None:
        for counter in counters:
            row = rows.get(counter.key)
            refusal = _refusal(counter, row, tokens, cost, tz) if counter.blocks and row else None
            if refusal:
                code = "quota_exceeded" if counter.budget is None else "budget_exceeded"
                budget_block_counted(code)
                assert row is not None
                raise BudgetExceeded(
                    refusal,
                    code=code,
                    retry_after=max(1, int((row[6] - now).total_seconds())),
                    details={
                        "budget": counter.budget.pk if counter.budget else None,
                        "key": counter.key,
                        "period": counter.period,
                        "limit_tokens": counter.limit_tokens,
                        "limit_cost": str(counter.limit_cost) if counter.limit_cost is not None else None,
                    },
                )
        # Every counter has room but one is still missing (deleted meanwhile by a budget's change).
        raise RuntimeError("budget counters changed during the reservation; retry the call")
    hold = BudgetHold(
        reservation_id=int(reservation_id),
        periods={rows[c.key][0]: c for c in counters},
        tokens=tokens,
        cost=cost,
        schema=schema,
        tenant_id=int(tenant.pk),
    )
    holds = _holds.get()
    if holds is not None:
        holds.append(hold)
    return hold


# One round trip folds or releases a call: delete its reservation (``{settled}``: a fold takes
# only a settled one), lock its counters in id order, move what it settled into ``spent_*`` and
# its worst case out of ``reserved_*``. A reservation already gone locks and changes nothing, so
# a second fold (or the sweep after the fold) counts nothing twice. ``{sync}``: as in _RESERVE_SQL.
_FOLD_SQL = """
WITH d AS (
  DELETE FROM billing_budgetreservation WHERE id = %(reservation_id)s {settled}
  RETURNING tokens, cost, settled_tokens, settled_cost
), h AS (
  SELECT {sync} AS go, tokens, cost, COALESCE(settled_tokens, 0) AS spent_tokens,
         COALESCE(settled_cost, 0) AS spent_cost
  FROM d
), l AS (
  SELECT id FROM billing_budgetperiod WHERE id = ANY(%(ids)s) AND EXISTS (SELECT 1 FROM h WHERE go)
  ORDER BY id FOR UPDATE
)
UPDATE billing_budgetperiod p SET spent_tokens = p.spent_tokens + h.spent_tokens,
       spent_cost = p.spent_cost + h.spent_cost,
       reserved_tokens = GREATEST(p.reserved_tokens - h.tokens, 0),
       reserved_cost = GREATEST(p.reserved_cost - h.cost, 0)
FROM l, h WHERE p.id = l.id
RETURNING p.id, p.spent_tokens, p.spent_cost, p.limit_tokens, p.limit_cost, p.alerted, p.period_start, p.budget_id
"""

# A settle whose reservation is gone (released by the sweep, or lost with an asynchronous
# commit) counts the spend directly, in the meter transaction: rare, so the lock is acceptable.
_SPEND_SQL = """
WITH l AS (SELECT id FROM billing_budgetperiod WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE)
UPDATE billing_budgetperiod p SET spent_tokens = p.spent_tokens + %(spent_tokens)s,
       spent_cost = p.spent_cost + %(spent_cost)s
FROM l WHERE p.id = l.id
RETURNING p.id, p.spent_tokens, p.spent_cost, p.limit_tokens, p.limit_cost, p.alerted, p.period_start, p.budget_id
"""

# Records a threshold only if no concurrent fold recorded it first: the UPDATE rechecks its
# WHERE on the row it waited for, so exactly one caller gets the row back and announces.
_ALERTED_SQL = (
    "UPDATE billing_budgetperiod SET alerted = alerted || %(t)s::jsonb"
    " WHERE id = %(id)s AND NOT alerted @> %(t)s::jsonb RETURNING id"
)


def _fold(cursor: Any, reservation_id: int, period_ids: list[int], *, settled_only: bool) -> list[tuple[Any, ...]]:
    """Run ``_FOLD_SQL`` (asynchronous commit when it is its own transaction); returns the
    counters' rows (id, spent_tokens, spent_cost, limit_tokens, limit_cost, alerted,
    period_start, budget_id) after the change, ``[]`` when the reservation was gone (or, with
    ``settled_only``, not settled)."""
    sql = _FOLD_SQL.replace("{sync}", _ASYNC_COMMIT if _own_transaction() else "TRUE").replace(
        "{settled}", "AND settled_at IS NOT NULL" if settled_only else ""
    )
    cursor.execute(sql, {"reservation_id": reservation_id, "ids": period_ids})
    return list(cursor.fetchall())


def _json_list(value: Any) -> list[Any]:
    # Django's connection hands jsonb to raw cursors as text.
    if isinstance(value, str):
        value = json.loads(value)
    return list(value or [])


def _crossed(counter: Counter, row: tuple[Any, ...]) -> list[float]:
    """The thresholds of ``counter`` that its row's spend reached and that were not announced."""
    spent_tokens, spent_cost, alerted = row[1], row[2], row[5]
    fractions = []
    if counter.limit_tokens:
        fractions.append(spent_tokens / counter.limit_tokens)
    if counter.limit_cost:
        fractions.append(float(spent_cost / counter.limit_cost))
    if not fractions:
        return []
    reached = max(fractions)
    done = {float(a) for a in _json_list(alerted)}
    return [t for t in counter.thresholds if reached >= t and t not in done]


def _announce(
    cursor: Any, rows: list[tuple[Any, ...]], counters: dict[int, Counter], *, schema: str, tenant_id: int
) -> None:
    """For each counter row (as ``_FOLD_SQL`` returns it) whose spend passed a threshold of its
    budget not in ``alerted`` yet: record it there (``_ALERTED_SQL``: one caller wins) and
    announce it after commit (``budget_alert_send``; at once outside a transaction)."""
    from billing.services.budgets.alerts import budget_alert_send

    for row in rows:
        counter = counters.get(row[0])
        if counter is None or counter.budget is None:
            continue
        spent = {"tokens": int(row[1]), "cost": str(row[2])}
        for threshold in _crossed(counter, row):
            cursor.execute(_ALERTED_SQL, {"t": json.dumps([threshold]), "id": row[0]})
            if cursor.fetchone() is None:
                continue
            transaction.on_commit(
                functools.partial(
                    budget_alert_send,
                    schema=schema,
                    tenant_id=tenant_id,
                    budget_id=counter.budget.pk,
                    threshold=threshold,
                    period_start=row[6],
                    spent=spent,
                )
            )


def budget_settle(*, hold: BudgetHold | None, tokens: int, cost: Decimal) -> None:
    """Record a call's real usage (``tokens`` input + output, ``cost`` in the tenant's currency)
    on its reservation row, in the caller's transaction: the one that records the call's usage
    events, so the usage is durable with them. Touches only that row (no counter lock); the
    counters move when the caller runs ``budget_fold`` after the commit (or the sweep does).
    A reservation already gone (released by the sweep, lost with an asynchronous commit) counts
    the spend into the counters here instead, with the threshold alerts. ``None``: no-op."""
    if hold is None:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE billing_budgetreservation SET settled_tokens = %s, settled_cost = %s, settled_at = now()"
            " WHERE id = %s",
            [tokens, cost, hold.reservation_id],
        )
        if cursor.rowcount:
            return
        if not tokens and not cost:
            _forget(hold)
            return
        # No savepoint: the statements are one unit, and the caller's transaction is the one to undo.
        with transaction.atomic(savepoint=False):
            cursor.execute(_SPEND_SQL, {"ids": list(hold.periods), "spent_tokens": tokens, "spent_cost": cost})
            _announce(cursor, list(cursor.fetchall()), hold.periods, schema=hold.schema, tenant_id=hold.tenant_id)
            transaction.on_commit(lambda: _forget(hold))


def budget_fold(*, hold: BudgetHold | None) -> None:
    """Fold a settled call into its counters once its meter transaction has committed (call it
    right after that transaction): ``spent += settled``, ``reserved -= worst case``, the
    reservation deleted, in one statement that commits without waiting for the WAL flush
    (``_FOLD_SQL``); thresholds crossed for the first time in the period are recorded in
    ``BudgetPeriod.alerted`` and announced (``billing.services.budgets.alerts.budget_alert_send``).
    Idempotent: a folded reservation is gone. An unsettled one is left alone (the guard releases
    it). ``None``: no-op. A lost fold is made by ``budget_reservations_expire``."""
    if hold is None:
        return
    with connection.cursor() as cursor:
        rows = _fold(cursor, hold.reservation_id, list(hold.periods), settled_only=True)
        if rows:
            _announce(cursor, rows, hold.periods, schema=hold.schema, tenant_id=hold.tenant_id)
    _forget(hold)


def budget_release(*, hold: BudgetHold | None) -> None:
    """Give back a call's reservation (the call failed before any token, or the turn's code
    exited without folding it). ``None``, or a reservation already folded or released: no-op.
    A reservation settled but not folded is folded (its usage counts). Outside a transaction,
    one statement that commits without waiting for the WAL flush (``_FOLD_SQL``)."""
    if hold is None:
        return
    with connection.cursor() as cursor:
        rows = _fold(cursor, hold.reservation_id, list(hold.periods), settled_only=False)
        if rows:
            _announce(cursor, rows, hold.periods, schema=hold.schema, tenant_id=hold.tenant_id)
    _forget(hold)


def _counters_of(budget_ids: set[int]) -> dict[int, Counter]:
    """Budget id -> its ``Counter`` (for the thresholds of a fold made by the sweep)."""
    return {
        b.pk: Counter(
            key=f"budget:{b.pk}",
            budget=b,
            period=b.period,
            limit_tokens=b.limit_tokens,
            limit_cost=b.limit_cost,
            blocks=b.action == Budget.Action.BLOCK,
        )
        for b in Budget.objects.filter(pk__in=budget_ids)
    }


def budget_reservations_expire(*, now: dt.datetime | None = None) -> int:
    """The sweep of the current schema's reservations (beat, every 60 s): fold the settled ones
    of any age (a fold lost to a worker or database crash) and release the unsettled ones past
    their ``expires_at`` (a worker died between reserving and metering). Returns how many were
    folded or released. One statement each (``_FOLD_SQL``); one folded or released meanwhile is
    skipped. Counter figures thus lag a lost fold by at most one sweep."""
    from django.db.models import Q

    now = now or timezone.now()
    handled = 0
    reservations = list(
        BudgetReservation.objects.filter(Q(settled_at__isnull=False) | Q(expires_at__lt=now)).order_by("id")[:1000]
    )
    if not reservations:
        return 0
    from billing.models import BudgetPeriod
    from tenants.models import Tenant

    # The thresholds of the budgets concerned, for the alerts a fold made here may owe.
    period_ids = {int(p) for r in reservations for p in r.periods}
    budget_of = dict(BudgetPeriod.objects.filter(pk__in=period_ids).values_list("id", "budget_id"))
    by_budget = _counters_of({b for b in budget_of.values() if b is not None})
    counters = {pid: by_budget[bid] for pid, bid in budget_of.items() if bid in by_budget}
    schema: str = connection.schema_name  # type: ignore[attr-defined]
    tenant_id = int(Tenant.objects.filter(schema_name=schema).values_list("pk", flat=True).first() or 0)
    for reservation in reservations:
        with connection.cursor() as cursor:
            rows = _fold(cursor, reservation.pk, [int(p) for p in reservation.periods], settled_only=False)
            if rows:
                _announce(cursor, rows, counters, schema=schema, tenant_id=tenant_id)
        handled += 1 if rows else 0
    return handled


def budget_room_check(
    *, tenant: Any, agent_slug: str = "", api_key_id: str = "", now: dt.datetime | None = None
) -> None:
    """Refuse up front (no lock, no write) when a blocking counter in scope has no room left at
    all: spent + reserved at or past a limit. For the OpenAI-compatible endpoint, which answers
    429 before creating a turn. Raises ``BudgetExceeded``."""
    from billing.models import BudgetPeriod

    counters = [c for c in counters_for(tenant=tenant, agent_slug=agent_slug, api_key_id=api_key_id) if c.blocks]
    if not counters:
        return
    now = now or timezone.now()
    tz = getattr(tenant, "time_zone", "") or "UTC"
    bounds = {c.key: period_bounds(c.period, now, tz) for c in counters}
    from django.db.models import Q

    where = Q()
    for c in counters:
        where |= Q(key=c.key, period_start=bounds[c.key][0])
    rows = {p.key: p for p in BudgetPeriod.objects.filter(where)}
    for counter in counters:
        row = rows.get(counter.key)
        if row is None:
            continue
        values = (
            row.pk,
            row.spent_tokens,
            row.spent_cost,
            row.reserved_tokens,
            row.reserved_cost,
            row.period_start,
            row.period_end,
        )
        refusal = _refusal(
            counter,
            values,
            1 if counter.limit_tokens is not None else 0,
            Decimal("0.000001") if counter.limit_cost is not None else Decimal(0),
            tz,
        )
        if refusal:
            code = "quota_exceeded" if counter.budget is None else "budget_exceeded"
            budget_block_counted(code)
            raise BudgetExceeded(refusal, code=code, retry_after=max(1, int((row.period_end - now).total_seconds())))
