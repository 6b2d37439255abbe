"""Console pages: usage and cost of the tenant by day, agent, model, member and API key, with a
CSV export of the same view."""

from __future__ import annotations

import csv
import datetime as dt
from decimal import Decimal
from typing import Any

from django import forms
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.http import urlencode
from django.views.decorators.http import require_GET

from billing.selectors import usage as usage_selectors
from config.errors import ValidationFailed
from config.htmx import domain_errors_as_pages
from tenants.principal import Principal, request_principal

# The page's sections after the daily one: grouping, heading.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("agent", "By agent"),
    ("model", "By model"),
    ("member", "By member"),
    ("api_key", "By API key"),
)
# Longer custom periods list only the days with usage: a row and a bar per empty day would
# bury the rest.
MAX_FILLED_DAYS = 366
# Bars per chart of a grouping (the costliest); its table lists every group.
CHART_GROUPS = 12
CSV_COLUMNS = ("group_by", "key", "label", "input_tokens", "output_tokens", "tokens", "cost", "events")


class UsageFilterForm(forms.Form):
    period = forms.ChoiceField(choices=list(usage_selectors.PERIOD_NAMES.items()), required=False)
    start = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    group_by = forms.ChoiceField(choices=[(g, g) for g in usage_selectors.GROUP_BYS], required=False)


def _filters(request: HttpRequest, principal: Principal) -> tuple[dict[str, Any], usage_selectors.UsagePeriod]:
    """The filter's cleaned values and the period they name; start or end alone mean ``custom``.
    Raises ``ValidationFailed`` for malformed values (the error page says which)."""
    form = UsageFilterForm(request.GET)
    if not form.is_valid():
        problems = "; ".join(f"{field}: {' '.join(str(e) for e in errors)}" for field, errors in form.errors.items())
        raise ValidationFailed(f"The usage filter is not valid ({problems}).", code="invalid_filter")
    values = form.cleaned_data
    name = values["period"] or ("custom" if values["start"] or values["end"] else "this_month")
    values["period"] = name
    period = usage_selectors.usage_period_named(
        principal=principal, name=name, start=values["start"], end=values["end"]
    )
    return values, period


def _filled_days(period: usage_selectors.UsagePeriod, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The daily groups with a zero row for each day without usage (periods up to ``MAX_FILLED_DAYS``)."""
    if (period.end - period.start).days > MAX_FILLED_DAYS:
        return groups
    by_date = {g["date"]: g for g in groups}
    zero = {"input_tokens": 0, "output_tokens": 0, "tokens": 0, "cost": Decimal(0), "events": 0}
    return [
        by_date.get(day) or {"key": day.isoformat(), "label": day.isoformat(), "date": day, **zero}
        for day in period.days()
    ]


def _series(groups: list[dict[str, Any]]) -> dict[str, list[Any]]:
    # Chart.js plots numbers; the tables beside the charts carry the exact decimals.
    return {
        "labels": [g["label"] for g in groups],
        "input_tokens": [g["input_tokens"] for g in groups],
        "output_tokens": [g["output_tokens"] for g in groups],
        "cost": [float(g["cost"]) for g in groups],
    }


@require_GET
@domain_errors_as_pages
def usage_dashboard(request: HttpRequest) -> HttpResponse:
    """Tokens and cost of the period per day (chart and table), by agent, model, member and API
    key; the period filter (``?period=this_month|last_month|last_7_days|last_30_days|custom``,
    ``start``, ``end``); a link to the same view as CSV. Needs ``usage:read`` (403 page)."""
    principal = request_principal(request)
    values, period = _filters(request, principal)
    days = usage_selectors.usage_summary(principal=principal, period=period, group_by="day")
    days["groups"] = _filled_days(period, days["groups"])
    sections = [
        {
            "group_by": group_by,
            "title": title,
            **usage_selectors.usage_summary(principal=principal, period=period, group_by=group_by),
        }
        for group_by, title in SECTIONS
    ]
    query = {"period": values["period"]}
    if values["period"] == "custom":
        query.update(start=period.start.isoformat(), end=period.end.isoformat())
    chart_data = {
        "currency": days["currency"],
        "day": _series(days["groups"]),
        **{s["group_by"]: _series(s["groups"][:CHART_GROUPS]) for s in sections},
    }
    return render(
        request,
        "billing/usage_dashboard.html",
        {
            "period": period,
            "period_name": values["period"],
            "periods": list(usage_selectors.PERIOD_NAMES.items()),
            "last_day": period.end - dt.timedelta(days=1),
            "days": days,
            "sections": sections,
            "totals": days["totals"],
            "currency": days["currency"],
            "query": urlencode(query),
            "chart_data": chart_data,
        },
    )


def _csv_cell(value: Any) -> Any:
    # Names come from tenants' users: keep a spreadsheet from reading one as a formula.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class _Echo:
    def write(self, value: str) -> str:
        return value


@require_GET
@domain_errors_as_pages
def usage_export_csv(request: HttpRequest) -> HttpResponse:
    """The usage page's view as CSV (``CSV_COLUMNS``, one row per group, costs exact): every
    grouping, or only ``?group_by=`` one; the same filter as the page. Needs ``usage:read``."""
    principal = request_principal(request)
    values, period = _filters(request, principal)
    group_bys = [values["group_by"]] if values["group_by"] else list(usage_selectors.GROUP_BYS)
    writer = csv.writer(_Echo())
    lines = [writer.writerow(CSV_COLUMNS)]
    for group_by in group_bys:
        summary = usage_selectors.usage_summary(principal=principal, period=period, group_by=group_by)
        lines.extend(
            writer.writerow(
                [
                    group_by,
                    _csv_cell(g["key"]),
                    _csv_cell(g["label"]),
                    g["input_tokens"],
                    g["output_tokens"],
                    g["tokens"],
                    format(g["cost"], "f"),
                    g["events"],
                ]
            )
            for g in summary["groups"]
        )
    response = HttpResponse("".join(lines), content_type="text/csv; charset=utf-8")
    suffix = f"-{values['group_by']}" if values["group_by"] else ""
    response["Content-Disposition"] = f'attachment; filename="usage-{period.start}-{period.end}{suffix}.csv"'
    return response
