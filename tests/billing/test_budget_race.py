"""Budgets under concurrency, with committed rows and one database connection per thread (as
worker threads have): 50 concurrent turns against a budget of N calls' worst case make exactly
N model requests; concurrent settles announce each threshold once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from django.core import mail
from django.db import connections
from django_tenants.utils import schema_context

from agents.models import Turn
from agents.runtime.orchestrator import turn_run
from billing.models import Budget, BudgetPeriod, BudgetReservation, UsageEvent
from billing.services.budgets import budget_fold, budget_reserve, budget_settle
from compliance.models import AuditEvent
from tests.agents.conftest import committed
from tests.billing.budget_rows import agent_on_scripted_model, budget_add
from tests.conftest import World
from tests.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def race_tenant(django_db_setup: World, django_db_blocker: Any) -> Any:
    """A tenant of its own (committed): the rows these tests commit (usage and audit events are
    append-only) must not show up in other tests' counts of tenant A."""
    import uuid

    from django.db import connection

    from tenants.models import User
    from tenants.principal import Principal
    from tenants.roles import Role
    from tenants.services.provisioning import tenant_create
    from tests.factories import member_add

    slug = f"race{uuid.uuid4().hex[:8]}"
    with django_db_blocker.unblock():
        tenant = tenant_create(actor=Principal.system("tests"), slug=slug, name="Race",
                               owner_email=f"owner@{slug}.test").tenant
        member_add(tenant=tenant, email=f"admin@{slug}.test", role=Role.ADMIN, password="x" * 12)
        member_add(tenant=tenant, email=f"viewer@{slug}.test", role=Role.VIEWER, password="x" * 12)
        owner = User.objects.get(email=f"owner@{slug}.test")
        connection.set_schema_to_public()
    return tenant, owner

TURNS = 50
ALLOWED_CALLS = 7


def in_threads(schema: str, count: int, work: Callable[[int], Any]) -> list[Any]:
    """``work(i)`` for i in range(count), each in its own thread and database connection, all
    released together by a barrier."""
    barrier = threading.Barrier(count)

    def run(i: int) -> Any:
        try:
            with schema_context(schema):
                barrier.wait()
                return work(i)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def test_fifty_concurrent_turns_against_a_budget_of_n_calls_make_n_model_requests(
    race_tenant: Any, scripted_llm: ScriptedLLM
) -> None:
    tenant, owner = race_tenant
    schema = tenant.schema_name

    def prepare() -> tuple[Any, int, list[int]]:
        with schema_context(schema):
            setup = agent_on_scripted_model(tenant, scripted_llm, owner)
            worst = setup.worst_case()
            # Calls overlap: each answer waits before its first token.
            scripted_llm.script(setup.model, tokens=["tok "] * 8, prompt_tokens=worst - 8, first_token_delay=0.3)
            budget = budget_add(scope="agent", agent=setup.agent.slug, limit_tokens=ALLOWED_CALLS * worst)
            turns = [setup.ask().pk for _ in range(TURNS)]
            return setup, budget.pk, turns

    setup, budget_id, turn_ids = committed(prepare)
    try:
        in_threads(schema, TURNS, lambda i: turn_run(turn_ids[i]))

        def outcome() -> dict[str, Any]:
            with schema_context(schema):
                turns = list(Turn.objects.filter(pk__in=turn_ids))
                row = BudgetPeriod.objects.get(budget_id=budget_id)
                spent = sum(e.quantity for e in UsageEvent.objects.filter(turn_id__in=turn_ids,
                                                                           kind__startswith="llm."))
                return {"completed": sum(t.status == "completed" for t in turns),
                        "refused": sum(t.error_code == "budget_exceeded" for t in turns),
                        "limit": row.limit_tokens, "spent": row.spent_tokens, "events": spent,
                        "reserved": row.reserved_tokens,
                        "reservations": BudgetReservation.objects.filter(turn_id__in=turn_ids).count()}

        result = committed(outcome)
        assert len(scripted_llm.requests_for(setup.model)) == ALLOWED_CALLS
        assert result["completed"] == ALLOWED_CALLS
        assert result["refused"] == TURNS - ALLOWED_CALLS
        assert result["spent"] == result["events"] <= result["limit"]
        assert (result["reserved"], result["reservations"]) == (0, 0)
    finally:
        committed(lambda: _delete_budget(schema, budget_id))


def _delete_budget(schema: str, budget_id: int) -> None:
    with schema_context(schema):
        Budget.objects.filter(pk=budget_id).delete()


def test_concurrent_folds_announce_each_threshold_once(race_tenant: Any, mailoutbox: list[Any]) -> None:
    tenant, _ = race_tenant
    schema = tenant.schema_name
    settles = 20

    def prepare() -> int:
        with schema_context(schema):
            # An API-key budget of a key id nobody uses, so no other test's calls count here.
            return budget_add(name="Alerting", scope="api_key", api_key="race-alert-key", action="alert",
                              limit_tokens=settles * 10).pk

    budget_id = committed(prepare)
    try:
        def call(i: int) -> None:
            hold = budget_reserve(tenant=tenant, tokens=10, cost=Decimal(0), api_key_id="race-alert-key")
            from django.db import transaction

            with transaction.atomic():
                budget_settle(hold=hold, tokens=10, cost=Decimal(0))
            budget_fold(hold=hold)

        in_threads(schema, settles, call)

        def read() -> tuple[list[float], list[float]]:
            with schema_context(schema):
                row = BudgetPeriod.objects.get(budget_id=budget_id)
                audits = AuditEvent.objects.filter(action="budget.threshold_crossed", target_id=str(budget_id))
                return row.alerted, sorted(float(a.payload["threshold"]) for a in audits)

        alerted, audited = committed(read)
        assert alerted == [0.8, 1.0]
        assert audited == [0.8, 1.0]
        subjects = sorted(m.subject for m in mail.outbox)
        assert len(subjects) == 2
        assert any("80%" in s for s in subjects) and any("100%" in s for s in subjects)
        recipients = set(mail.outbox[0].to)
        assert {f"owner@{tenant.slug}.test", f"admin@{tenant.slug}.test"} <= recipients
        assert f"viewer@{tenant.slug}.test" not in recipients
    finally:
        committed(lambda: _delete_budget(schema, budget_id))
