"""Console URLs of billing: usage, budgets, invoices."""

from django.urls import path

from billing.views import budgets, invoices, usage

urlpatterns = [
    path("usage/", usage.usage_dashboard, name="usage_dashboard"),
    path("usage/export.csv", usage.usage_export_csv, name="usage_export_csv"),
    path("budgets/", budgets.budget_list, name="budget_list"),
    path("budgets/<int:budget_id>/edit/", budgets.budget_edit, name="budget_edit"),
    path("budgets/<int:budget_id>/delete/", budgets.budget_delete, name="budget_delete"),
    path("invoices/", invoices.invoice_list, name="invoice_list"),
    path("invoices/draft/", invoices.invoice_draft, name="invoice_draft"),
    path("invoices/<int:invoice_id>/", invoices.invoice_detail, name="invoice_detail"),
    path("invoices/<int:invoice_id>/finalize/", invoices.invoice_finalize, name="invoice_finalize"),
    path("invoices/<int:invoice_id>/csv/", invoices.invoice_csv, name="invoice_csv"),
    path("invoices/<int:invoice_id>/pdf/", invoices.invoice_pdf_download, name="invoice_pdf"),
]
