"""Console pages: budgets with their current period (progress bars), and their forms for
members with ``billing:write``. Rules and permissions live in the services and selectors."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from billing.forms import BudgetForm, budget_initial
from billing.selectors import budgets as selectors
from billing.services import budgets as services
from config.errors import DomainError
from config.htmx import domain_errors_as_pages, render_page
from tenants.principal import request_principal


@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def budget_list(request: HttpRequest) -> HttpResponse:
    """The budgets with spent / reserved / limit of their current period; POST creates one."""
    principal = request_principal(request)
    form = BudgetForm(request.POST or None)
    if request.method == "POST":
        principal.require("billing:write")
        if form.is_valid():
            try:
                budget = services.budget_create(principal=principal, **form.budget_fields())
            except DomainError as exc:
                form.add_domain_error(exc)
            else:
                messages.success(request, f"Budget “{budget}” created.")
                return redirect("budget_list")
    return render_page(
        request,
        "billing/budget_list.html",
        {
            "states": selectors.budget_list(principal=principal),
            "form": form,
            "can_write": principal.can("billing:write"),
        },
        partial="budget-table",
        status=422 if form.errors else 200,
    )


@require_http_methods(["GET", "POST"])
@domain_errors_as_pages
def budget_edit(request: HttpRequest, budget_id: int) -> HttpResponse:
    principal = request_principal(request)
    principal.require("billing:write")
    budget = selectors.budget_get(principal=principal, budget_id=budget_id)
    form = BudgetForm(request.POST or None, initial=budget_initial(budget))
    if request.method == "POST" and form.is_valid():
        try:
            services.budget_update(principal=principal, budget=budget, **form.budget_fields())
        except DomainError as exc:
            form.add_domain_error(exc)
            budget.refresh_from_db()
        else:
            messages.success(request, f"Budget “{budget}” saved.")
            return redirect("budget_list")
    return render_page(
        request, "billing/budget_edit.html", {"budget": budget, "form": form}, status=422 if form.errors else 200
    )


@require_POST
@domain_errors_as_pages
def budget_delete(request: HttpRequest, budget_id: int) -> HttpResponse:
    principal = request_principal(request)
    principal.require("billing:write")
    budget = selectors.budget_get(principal=principal, budget_id=budget_id)
    name = str(budget)
    services.budget_delete(principal=principal, budget=budget)
    messages.success(request, f"Budget “{name}” deleted.")
    return redirect("budget_list")
