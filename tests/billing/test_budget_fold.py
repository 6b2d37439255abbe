"""Settle and fold: the meter transaction records a call's real usage on its own reservation row
only (no counter lock); the fold moves it into the counters after that commit, once; the sweep
folds a settled reservation whose fold was lost (of any age) and releases an unsettled one only
once it expired. The counters end equal to the usage events' sums."""

from __future__ import annotations

import datetime as dt
import threading
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection, transaction
from django_tenants.utils import schema_context

from billing.models import Budget, BudgetReservation
from billing.services.budgets import (
    budget_fold,
    budget_holds_guard,
    budget_release,
    budget_reservations_expire,
    budget_reserve,
    budget_settle,
)
from tests.agents.conftest import committed
from tests.billing.budget_rows import (
    agent_on_scripted_model,
    budget_add,
    model_spend,
    open_reservations,
    period_of,
)
from tests.billing.test_budget_race import in_threads, race_tenant  # noqa: F401  (fixture)
from tests.conftest import World
from tests.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.django_db


@pytest.fixture
def _tenant_a(world: World) -> Any:
    with schema_context(world.tenant_a.schema_name):
        yield


def _figures(budget: Budget) -> tuple[int, Decimal, int, Decimal]:
    row = period_of(budget)
    return row.spent_tokens, row.spent_cost, row.reserved_tokens, row.reserved_cost


@pytest.mark.usefixtures("_tenant_a")
def test_a_settle_records_the_usage_on_its_reservation_and_leaves_the_counters_alone(world: World) -> None:
    budget = budget_add(limit_tokens=1000)
    hold = budget_reserve(tenant=world.tenant_a, tokens=300, cost=Decimal("0.3"))
    assert hold is not None
    with transaction.atomic():
        budget_settle(hold=hold, tokens=120, cost=Decimal("0.12"))
    reservation = BudgetReservation.objects.get(pk=hold.reservation_id)
    assert (reservation.settled_tokens, reservation.settled_cost) == (120, Decimal("0.12"))
    assert reservation.settled_at is not None
    # Until the fold, the counters still hold the worst case: admission stays conservative.
    assert _figures(budget) == (0, Decimal(0), 300, Decimal("0.3"))
    budget_fold(hold=hold)
    assert _figures(budget) == (120, Decimal("0.12"), 0, Decimal(0))
    assert open_reservations() == 0


@pytest.mark.usefixtures("_tenant_a")
def test_a_fold_is_idempotent_and_a_later_release_or_sweep_counts_nothing_more(world: World) -> None:
    budget = budget_add(limit_tokens=1000)
    hold = budget_reserve(tenant=world.tenant_a, tokens=300, cost=Decimal(0))
    budget_settle(hold=hold, tokens=100, cost=Decimal(0))
    budget_fold(hold=hold)
    budget_fold(hold=hold)
    budget_release(hold=hold)
    assert budget_reservations_expire(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=1)) == 0
    assert _figures(budget)[:3] == (100, Decimal(0), 0)


@pytest.mark.usefixtures("_tenant_a")
def test_a_fold_leaves_an_unsettled_reservation_to_the_release(world: World) -> None:
    budget = budget_add(limit_tokens=1000)
    hold = budget_reserve(tenant=world.tenant_a, tokens=300, cost=Decimal(0))
    budget_fold(hold=hold)  # as after a meter transaction that rolled back
    assert (_figures(budget)[2], open_reservations()) == (300, 1)
    budget_release(hold=hold)
    assert (_figures(budget)[:3], open_reservations()) == ((0, Decimal(0), 0), 0)


@pytest.mark.usefixtures("_tenant_a")
def test_the_sweep_folds_a_settled_reservation_whose_fold_was_lost_and_the_late_fold_counts_it_once(
    world: World,
) -> None:
    budget = budget_add(limit_tokens=1000)
    hold = budget_reserve(tenant=world.tenant_a, tokens=300, cost=Decimal("0.3"))
    unsettled = budget_reserve(tenant=world.tenant_a, tokens=50, cost=Decimal(0))
    with transaction.atomic():
        budget_settle(hold=hold, tokens=120, cost=Decimal("0.12"))
    # Not expired: the sweep folds a settled reservation of any age, and leaves a live call alone.
    assert budget_reservations_expire() == 1
    assert _figures(budget) == (120, Decimal("0.12"), 50, Decimal(0))
    budget_fold(hold=hold)  # the worker's fold, late
    assert _figures(budget) == (120, Decimal("0.12"), 50, Decimal(0))
    assert open_reservations() == 1
    budget_release(hold=unsettled)


@pytest.mark.usefixtures("_tenant_a")
def test_the_guard_folds_a_settled_reservation_its_turn_did_not_fold(world: World) -> None:
    budget = budget_add(limit_tokens=1000)
    with budget_holds_guard():
        hold = budget_reserve(tenant=world.tenant_a, tokens=300, cost=Decimal(0))
        with transaction.atomic():
            budget_settle(hold=hold, tokens=90, cost=Decimal(0))
        # The fold never ran (an exception right after the meter commit).
    assert (_figures(budget)[:3], open_reservations()) == ((90, Decimal(0), 0), 0)


@pytest.mark.usefixtures("_tenant_a")
def test_a_threshold_crossed_by_a_fold_the_sweep_made_is_announced_once(
    world: World, django_capture_on_commit_callbacks: Any
) -> None:
    budget = budget_add(name="Swept", action="alert", limit_tokens=100)
    hold = budget_reserve(tenant=world.tenant_a, tokens=90, cost=Decimal(0))
    budget_settle(hold=hold, tokens=90, cost=Decimal(0))
    with django_capture_on_commit_callbacks() as swept:
        assert budget_reservations_expire() == 1
    with django_capture_on_commit_callbacks() as late:
        budget_fold(hold=hold)
        again = budget_reserve(tenant=world.tenant_a, tokens=5, cost=Decimal(0))
        budget_settle(hold=again, tokens=5, cost=Decimal(0))
        budget_fold(hold=again)
    assert [c.keywords["threshold"] for c in swept] == [0.8]
    assert [c.keywords["budget_id"] for c in swept] == [budget.pk]
    assert late == []
    assert period_of(budget).alerted == [0.8]


def test_counters_after_turns_equal_the_usage_events_sums(world: World, scripted_llm: ScriptedLLM) -> None:
    with schema_context(world.tenant_a.schema_name):
        # The model reports fewer prompt tokens than reserved: the fold counts the real usage.
        setup = agent_on_scripted_model(world.tenant_a, scripted_llm, world.user("operator"), exact=False)
        budget = budget_add(scope="agent", agent=setup.agent.slug, limit_tokens=10**6, limit_cost=Decimal(100))
        turns = [setup.run() for _ in range(3)]
        assert [t.status for t in turns] == ["completed"] * 3
        tokens, cost = model_spend(agent_id=setup.agent.pk)
        assert 0 < tokens < 3 * setup.worst_case()
        assert _figures(budget) == (tokens, cost, 0, Decimal(0))
        assert open_reservations() == 0


def test_the_meter_transaction_does_not_lock_the_counters(race_tenant: Any) -> None:  # noqa: F811
    tenant, _ = race_tenant
    schema = tenant.schema_name
    budget_id = committed(
        lambda: _in(
            schema, lambda: budget_add(name="No lock", scope="api_key", api_key="fold-lock-key", limit_tokens=10**9).pk
        )
    )
    settled, reserved = threading.Event(), threading.Event()

    def work(i: int) -> str:
        if i == 0:
            hold = budget_reserve(tenant=tenant, tokens=50, cost=Decimal(0), api_key_id="fold-lock-key")
            with transaction.atomic():
                budget_settle(hold=hold, tokens=40, cost=Decimal(0))
                settled.set()
                # The meter transaction stays open until the other call has reserved.
                assert reserved.wait(10)
            budget_fold(hold=hold)
            return "settled"
        assert settled.wait(10)
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '3s'")  # a counter lock held by the settle would time out
        hold = budget_reserve(tenant=tenant, tokens=50, cost=Decimal(0), api_key_id="fold-lock-key")
        reserved.set()
        budget_release(hold=hold)
        return "reserved"

    try:
        assert in_threads(schema, 2, work) == ["settled", "reserved"]

        def read() -> tuple[int, int, int]:
            with schema_context(schema):
                row = period_of(Budget.objects.get(pk=budget_id))
                return row.spent_tokens, row.reserved_tokens, BudgetReservation.objects.count()

        assert committed(read)[:2] == (40, 0)
    finally:
        reserved.set()
        committed(lambda: _in(schema, lambda: Budget.objects.filter(pk=budget_id).delete()))


def _in(schema: str, function: Any) -> Any:
    with schema_context(schema):
        return function()
