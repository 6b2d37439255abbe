"""Console URLs of billing: usage, budgets, invoices."""

from django.urls import path

from billing.views import budgets, invoices, usage

urlpatterns = [
    path("usage/", usage.usage_dashboard, name="usage_dashboard"),
    path("budgets/", budgets.budget_list, name="budget_list"),
    path("budgets/<int:budget_id>/edit/", budgets.budget_edit, name="budget_edit"),
    path("budgets/<int:budget_id>/delete/", budgets.budget_delete, name="budget_delete"),
    path("invoices/", invoices.invoice_list, name="invoice_list"),
]
