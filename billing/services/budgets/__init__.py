"""Budgets: enforcement around model calls (``enforcement``: reserve, settle, fold, release, the
plan's monthly token quota), threshold alerts (``alerts``), and the budgets' own records
(``records``: create, change, delete). How it works: docs/billing-budgets.md."""

from billing.services.budgets.alerts import budget_alert_send, webhook_post, webhook_signature
from billing.services.budgets.enforcement import (
    QUOTA_KEY,
    BudgetExceeded,
    BudgetHold,
    budget_fold,
    budget_holds_guard,
    budget_release,
    budget_reservations_expire,
    budget_reserve,
    budget_room_check,
    budget_settle,
    counters_for,
    period_bounds,
)
from billing.services.budgets.records import budget_create, budget_delete, budget_update

__all__ = [
    "QUOTA_KEY",
    "BudgetExceeded",
    "BudgetHold",
    "budget_alert_send",
    "budget_create",
    "budget_delete",
    "budget_fold",
    "budget_holds_guard",
    "budget_release",
    "budget_reservations_expire",
    "budget_reserve",
    "budget_room_check",
    "budget_settle",
    "budget_update",
    "counters_for",
    "period_bounds",
    "webhook_post",
    "webhook_signature",
]
