"""The budget fast path: one statement per reservation and per settle, the counters in scope
kept for the running turn, and an asynchronous commit only for a reservation that is its own
transaction. A reservation row gone (released by the sweep, or lost with an asynchronous commit
to a server crash) never loses a settle's spend, and the sweep skips it."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django_tenants.utils import schema_context

from billing.models import Budget, BudgetPeriod, BudgetReservation
from billing.services.budgets import (
    BudgetExceeded,
    budget_fold,
    budget_holds_guard,
    budget_release,
    budget_reservations_expire,
    budget_reserve,
    budget_settle,
)
from tests.agents.conftest import committed
from tests.billing.budget_rows import budget_add, open_reservations, period_of
from tests.billing.test_budget_race import race_tenant  # noqa: F401  (fixture)
from tests.conftest import World

pytestmark = pytest.mark.django_db


@pytest.fixture
def _tenant_a(world: World) -> Any:
    with schema_context(world.tenant_a.schema_name):
        yield


@pytest.mark.usefixtures("_tenant_a")
def test_a_settle_whose_reservation_row_is_gone_still_counts_the_spend(world: World) -> None:
    budget = budget_add(limit_tokens=1000)
    hold = budget_reserve(tenant=world.tenant_a, tokens=300, cost=Decimal("0.3"))
    assert hold is not None
    # As a server crash loses an asynchronously committed reservation: the row and its room.
    BudgetReservation.objects.filter(pk=hold.reservation_id).delete()
    BudgetPeriod.objects.filter(budget=budget).update(reserved_tokens=0, reserved_cost=0)
    budget_settle(hold=hold, tokens=120, cost=Decimal("0.12"))
    row = period_of(budget)
    assert (row.spent_tokens, row.spent_cost) == (120, Decimal("0.12"))
    assert (row.reserved_tokens, row.reserved_cost) == (0, 0)


@pytest.mark.usefixtures("_tenant_a")
def test_the_sweep_and_a_release_skip_a_reservation_already_folded(world: World) -> None:
    budget = budget_add(limit_tokens=1000)
    hold = budget_reserve(tenant=world.tenant_a, tokens=300, cost=Decimal(0))
    other = budget_reserve(tenant=world.tenant_a, tokens=200, cost=Decimal(0))
    budget_settle(hold=hold, tokens=100, cost=Decimal(0))
    budget_fold(hold=hold)
    budget_release(hold=hold)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    assert budget_reservations_expire(now=later) == 1  # only ``other`` was still held
    budget_release(hold=other)
    row = period_of(budget)
    assert (row.spent_tokens, row.reserved_tokens, open_reservations()) == (100, 0, 0)


@pytest.mark.usefixtures("_tenant_a")
def test_a_refused_reservation_changes_nothing(world: World) -> None:
    budget = budget_add(limit_tokens=1000)
    budget_add(name="alert only", limit_tokens=10, action="alert")
    budget_reserve(tenant=world.tenant_a, tokens=900, cost=Decimal(0))
    with pytest.raises(BudgetExceeded):
        budget_reserve(tenant=world.tenant_a, tokens=101, cost=Decimal(0))
    assert (period_of(budget).reserved_tokens, open_reservations()) == (900, 1)
    alert_row = BudgetPeriod.objects.get(budget__name="alert only")
    assert alert_row.reserved_tokens == 900


@pytest.mark.usefixtures("_tenant_a")
def test_a_budget_created_during_a_turn_applies_from_the_next_turn(world: World) -> None:
    with budget_holds_guard():
        budget_reserve(tenant=world.tenant_a, tokens=10, cost=Decimal(0), agent_slug="helpdesk")
        tight = budget_add(name="tight", limit_tokens=5)
        # The turn's counters were loaded by its first call: the new budget is not among them.
        budget_reserve(tenant=world.tenant_a, tokens=10, cost=Decimal(0), agent_slug="helpdesk")
    with budget_holds_guard(), pytest.raises(BudgetExceeded, match="tight"):
        budget_reserve(tenant=world.tenant_a, tokens=10, cost=Decimal(0), agent_slug="helpdesk")
    assert Budget.objects.filter(pk=tight.pk).exists()


@pytest.mark.usefixtures("_tenant_a")
def test_a_budget_deleted_during_a_turn_stops_counting_at_once(world: World) -> None:
    kept = budget_add(name="kept", limit_tokens=1000)
    gone = budget_add(name="gone", limit_tokens=1000)
    with budget_holds_guard():
        first = budget_reserve(tenant=world.tenant_a, tokens=10, cost=Decimal(0))
        budget_settle(hold=first, tokens=10, cost=Decimal(0))
        budget_fold(hold=first)
        gone.delete()  # its counter rows go with it
        hold = budget_reserve(tenant=world.tenant_a, tokens=20, cost=Decimal(0))
        assert hold is not None
        assert [c.key for c in hold.periods.values()] == [f"budget:{kept.pk}"]
        budget_settle(hold=hold, tokens=20, cost=Decimal(0))
        budget_fold(hold=hold)
    assert period_of(kept).spent_tokens == 30


def test_a_reservation_outside_a_transaction_commits_by_itself_and_leaves_later_commits_durable(
    race_tenant: Any,  # noqa: F811
) -> None:
    tenant, _ = race_tenant

    def work() -> tuple[int, str, int, bool]:
        # A thread's own connection autocommits, as a chat worker's does between transactions.
        with schema_context(tenant.schema_name):
            budget = budget_add(name="own transaction", limit_tokens=10**9)
            try:
                hold = budget_reserve(tenant=tenant, tokens=50, cost=Decimal(0))
                assert hold is not None
                with connection.cursor() as cursor:
                    cursor.execute("SHOW synchronous_commit")
                    setting = cursor.fetchone()[0]
                held = period_of(budget).reserved_tokens
                budget_release(hold=hold)
                return held, setting, period_of(budget).reserved_tokens, open_reservations() > 0
            finally:
                BudgetReservation.objects.all().delete()
                budget.delete()

    assert committed(work) == (50, "on", 0, False)
