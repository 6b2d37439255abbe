"""Console forms of billing: budgets (shape only; the rules live in the services)."""

from __future__ import annotations

from typing import Any

from django import forms

from billing.models import Budget
from config.errors import DomainError, ValidationFailed


class BudgetForm(forms.Form):
    """A budget's fields; ``alert_thresholds`` as comma-separated fractions ("0.8, 1.0")."""

    name = forms.CharField(max_length=100, required=False)
    scope = forms.ChoiceField(choices=Budget.Scope.choices, initial=Budget.Scope.TENANT)
    agent = forms.CharField(max_length=80, required=False, help_text="The agent's slug (scope agent).")
    api_key = forms.CharField(
        max_length=40,
        required=False,
        label="API key",
        help_text="The key's public id, e.g. 3fk29x0qzm1c (scope API key).",
    )
    period = forms.ChoiceField(choices=Budget.Period.choices, initial=Budget.Period.MONTH)
    limit_tokens = forms.IntegerField(min_value=1, required=False, label="Token limit")
    limit_cost = forms.DecimalField(min_value=0, max_digits=20, decimal_places=6, required=False, label="Cost limit")
    alert_thresholds = forms.CharField(
        initial="0.8, 1.0", required=False, label="Alert at", help_text="Fractions of the limit, comma-separated."
    )
    action = forms.ChoiceField(choices=Budget.Action.choices, initial=Budget.Action.BLOCK)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for field in self.fields.values():
            field.widget.attrs.setdefault(
                "class", "form-select" if isinstance(field.widget, forms.Select) else "form-control"
            )

    def clean_alert_thresholds(self) -> list[Any]:
        raw = str(self.cleaned_data.get("alert_thresholds") or "").strip()
        if not raw:
            return [0.8, 1.0]
        try:
            return [float(part) for part in raw.replace(";", ",").split(",") if part.strip()]
        except ValueError:
            raise forms.ValidationError("Write fractions such as 0.8, 1.0.") from None

    def budget_fields(self) -> dict[str, Any]:
        return dict(self.cleaned_data)

    def add_domain_error(self, exc: DomainError) -> None:
        """Show a service's error on the field it names, or above the form."""
        details = exc.details if isinstance(exc, ValidationFailed) and isinstance(exc.details, list) else []
        named = [d for d in details if isinstance(d, dict) and d.get("field") in self.fields]
        for detail in named:
            self.add_error(detail["field"], str(detail.get("message") or exc.message))
        if not named:
            self.add_error(None, exc.message)


def budget_initial(budget: Budget) -> dict[str, Any]:
    return {
        "name": budget.name,
        "scope": budget.scope,
        "agent": budget.agent,
        "api_key": budget.api_key,
        "period": budget.period,
        "limit_tokens": budget.limit_tokens,
        "limit_cost": budget.limit_cost,
        "alert_thresholds": ", ".join(f"{t:g}" for t in budget.alert_thresholds or []),
        "action": budget.action,
    }
