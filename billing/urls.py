"""Console URLs of billing: usage, budgets, invoices."""

from django.urls import path

from billing.views import budgets, invoices, usage

urlpatterns = [
    path("usage/", usage.usage_dashboard, name="usage_dashboard"),
    path("usage/export.csv", usage.usage_export_csv, name="usage_export_csv"),
    path("budgets/", budgets.budget_list, name="budget_list"),
    path("invoices/", invoices.invoice_list, name="invoice_list"),
]
