"""Budgets around model calls, in the worker's code path (``turn_run`` in this process, in the
test's transaction) against the scripted model: a call is reserved at its worst case, settled
to its real usage with its usage events, released when it fails; a blocking budget or the plan
quota fails the turn before the model is called."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from django_tenants.utils import schema_context

from billing.models import BudgetPeriod, BudgetReservation
from billing.services.budgets import (
    QUOTA_KEY,
    BudgetExceeded,
    budget_fold,
    budget_release,
    budget_reservations_expire,
    budget_reserve,
    budget_settle,
    period_bounds,
)
from billing.services.usage import usage_event_record
from tenants.models import Plan
from tests.billing.budget_rows import (
    BudgetSetup,
    agent_on_scripted_model,
    budget_add,
    key_principal,
    model_spend,
    open_reservations,
    period_of,
)
from tests.conftest import World
from tests.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _tenant_a(world: World) -> Any:
    with schema_context(world.tenant_a.schema_name):
        yield


@pytest.fixture
def setup(world: World, scripted_llm: ScriptedLLM) -> BudgetSetup:
    return agent_on_scripted_model(world.tenant_a, scripted_llm, world.user("operator"))


def test_a_call_settles_to_its_usage_events_and_leaves_no_reservation(setup: BudgetSetup) -> None:
    budget = budget_add(limit_tokens=1_000_000)
    turn = setup.run()
    assert turn.status == "completed"
    row = period_of(budget)
    tokens, cost = model_spend(turn_id=turn.pk)
    assert (row.spent_tokens, row.spent_cost) == (tokens, cost)
    assert tokens == setup.worst_case()
    assert (row.reserved_tokens, row.reserved_cost) == (0, 0)
    assert open_reservations() == 0


def test_a_blocked_call_never_reaches_the_model_and_the_turn_fails_with_budget_exceeded(setup: BudgetSetup) -> None:
    budget_add(name="Monthly cap", limit_tokens=setup.worst_case() - 1)
    turn = setup.run()
    assert turn.status == "failed"
    assert turn.error_code == "budget_exceeded"
    assert "Monthly cap" in turn.error_message
    assert f"limit {setup.worst_case() - 1} tokens" in turn.error_message
    assert "the month" in turn.error_message
    assert setup.requests() == 0
    assert open_reservations() == 0


def test_a_cost_limit_blocks_like_a_token_limit(setup: BudgetSetup) -> None:
    # Scripted endpoints cost 1 per million input and 2 per million output tokens.
    budget_add(limit_cost=Decimal("0.000010"))
    turn = setup.run()
    assert turn.error_code == "budget_exceeded"
    assert "in cost" in turn.error_message
    assert setup.requests() == 0


def test_an_alert_budget_never_refuses_but_counts(setup: BudgetSetup) -> None:
    budget = budget_add(action="alert", limit_tokens=1)
    turn = setup.run()
    assert turn.status == "completed"
    row = period_of(budget)
    assert row.spent_tokens == setup.worst_case()
    assert row.alerted == [0.8, 1.0]


def test_a_budget_blocks_once_the_settled_spend_leaves_no_room(setup: BudgetSetup) -> None:
    budget_add(limit_tokens=2 * setup.worst_case())
    assert setup.run().status == "completed"
    assert setup.run().status == "completed"
    third = setup.run()
    assert third.error_code == "budget_exceeded"
    assert setup.requests() == 2


def test_the_reservation_is_released_when_the_model_fails_before_any_token(setup: BudgetSetup) -> None:
    budget = budget_add(limit_tokens=10 * setup.worst_case())
    setup.llm.script(setup.model, failure="status:500")
    turn = setup.run()
    assert turn.status == "failed"
    assert turn.error_code != "budget_exceeded"
    row = period_of(budget)
    assert (row.spent_tokens, row.reserved_tokens, row.reserved_cost) == (0, 0, 0)
    assert open_reservations() == 0


def test_a_call_broken_mid_stream_settles_to_its_partial_usage(setup: BudgetSetup) -> None:
    budget = budget_add(limit_tokens=10 * setup.worst_case())
    setup.llm.script(setup.model, tokens=["a ", "b ", "c ", "d "], failure="cut", cut_after=2)
    turn = setup.run()
    assert turn.status == "failed"
    tokens, cost = model_spend(turn_id=turn.pk)
    assert tokens > 0
    row = period_of(budget)
    assert (row.spent_tokens, row.spent_cost, row.reserved_tokens) == (tokens, cost, 0)
    assert open_reservations() == 0


def test_an_agent_budget_applies_to_its_agent_only_and_the_tenant_budget_to_all(
    world: World, setup: BudgetSetup, scripted_llm: ScriptedLLM
) -> None:
    other = agent_on_scripted_model(world.tenant_a, scripted_llm, world.user("operator"))
    agent_budget = budget_add(scope="agent", agent=setup.agent.slug, limit_tokens=setup.worst_case() - 1)
    assert other.run().status == "completed"
    assert setup.run().error_code == "budget_exceeded"
    assert not BudgetPeriod.objects.filter(budget=agent_budget, spent_tokens__gt=0).exists()
    tenant_budget = budget_add(limit_tokens=10 * setup.worst_case())
    assert other.run().status == "completed"
    # Seeded from the month's events: the earlier call of ``other`` counts too.
    assert period_of(tenant_budget).spent_tokens == 2 * other.worst_case()


def test_an_api_key_budget_applies_to_sessions_of_that_key_only(world: World, setup: BudgetSetup) -> None:
    key, key_principal_ = key_principal(world.tenant_a, world.key_a)
    budget_add(scope="api_key", api_key=key.key_id, limit_tokens=setup.worst_case() - 1)
    assert setup.run().status == "completed"  # a member's session
    turn = setup.run(principal=key_principal_)
    assert turn.error_code == "budget_exceeded"
    assert setup.requests() == 1


def test_the_plans_monthly_token_quota_fails_the_turn_with_quota_exceeded(world: World, setup: BudgetSetup) -> None:
    plan = Plan.objects.create(code="quota-test", name="Quota", monthly_token_quota=setup.worst_case() - 1)
    world.tenant_a.plan = plan
    world.tenant_a.save(update_fields=["plan"])
    turn = setup.run()
    assert turn.error_code == "quota_exceeded"
    assert "monthly token quota" in turn.error_message
    assert setup.requests() == 0
    plan.monthly_token_quota = 10 * setup.worst_case()
    plan.save()
    assert setup.run().status == "completed"
    assert BudgetPeriod.objects.get(key=QUOTA_KEY).spent_tokens == setup.worst_case()


def test_periods_follow_the_tenants_timezone_and_a_new_day_starts_a_new_counter(world: World) -> None:
    tenant = world.tenant_a
    tenant.time_zone = "Asia/Tokyo"
    budget = budget_add(period="day", limit_tokens=100)
    # 14:30 UTC on Dec 31 is 23:30 in Tokyo; half an hour later it is Jan 1 there.
    before = dt.datetime(2026, 12, 31, 14, 30, tzinfo=dt.UTC)
    after = before + dt.timedelta(hours=1)
    hold = budget_reserve(tenant=tenant, tokens=100, cost=Decimal(0), now=before)
    budget_settle(hold=hold, tokens=100, cost=Decimal(0))
    budget_fold(hold=hold)
    with pytest.raises(BudgetExceeded):
        budget_reserve(tenant=tenant, tokens=1, cost=Decimal(0), now=before + dt.timedelta(minutes=20))
    hold = budget_reserve(tenant=tenant, tokens=60, cost=Decimal(0), now=after)
    rows = list(BudgetPeriod.objects.filter(budget=budget).order_by("period_start"))
    assert [r.period_start.astimezone(dt.UTC) for r in rows] == [
        dt.datetime(2026, 12, 30, 15, 0, tzinfo=dt.UTC),
        dt.datetime(2026, 12, 31, 15, 0, tzinfo=dt.UTC),
    ]
    assert (rows[0].spent_tokens, rows[1].reserved_tokens) == (100, 60)
    budget_release(hold=hold)


def test_a_month_period_spans_the_calendar_month_in_the_tenants_timezone() -> None:
    start, end = period_bounds("month", dt.datetime(2026, 3, 1, 3, 0, tzinfo=dt.UTC), "America/New_York")
    assert (start.isoformat(), end.isoformat()) == ("2026-02-01T00:00:00-05:00", "2026-03-01T00:00:00-05:00")
    start, end = period_bounds("day", dt.datetime(2026, 3, 8, 12, 0, tzinfo=dt.UTC), "America/New_York")
    assert end.astimezone(dt.UTC) - start.astimezone(dt.UTC) == dt.timedelta(hours=23)  # the day clocks go forward


def test_a_budget_created_mid_month_counts_the_month_so_far(world: World) -> None:
    usage_event_record(kind="llm.input_tokens", quantity=40, unit_price=Decimal("0.5"))
    usage_event_record(kind="kb.query", quantity=1)
    budget = budget_add(limit_tokens=100)
    hold = budget_reserve(tenant=world.tenant_a, tokens=10, cost=Decimal(0))
    row = period_of(budget)
    assert (row.spent_tokens, row.spent_cost, row.reserved_tokens) == (40, Decimal(20), 10)
    budget_release(hold=hold)


def test_expired_reservations_are_released_by_the_sweep(world: World) -> None:
    budget = budget_add(limit_tokens=100)
    budget_reserve(tenant=world.tenant_a, tokens=70, cost=Decimal(0))
    assert budget_reservations_expire() == 0
    later = BudgetReservation.objects.get().expires_at + dt.timedelta(seconds=1)
    assert budget_reservations_expire(now=later) == 1
    row = period_of(budget)
    assert (row.reserved_tokens, open_reservations()) == (0, 0)
    assert budget_reserve(tenant=world.tenant_a, tokens=100, cost=Decimal(0)) is not None


def test_the_beat_schedule_sends_the_reservation_sweep(settings: Any) -> None:
    assert settings.CELERY_BEAT_SCHEDULE["budget-reservations-expire"]["task"] == "billing.budget_reservations_expire"
