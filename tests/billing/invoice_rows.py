"""Rows shared by the invoice tests: usage events at set times, a plan, a drafted invoice."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from django_tenants.utils import schema_context

from billing.models import Invoice, UsageEvent
from billing.services import usage_event_values
from billing.services.invoices import invoice_draft
from tenants.models import Plan, Tenant
from tenants.principal import Principal


def event_at(schema: str, at: dt.datetime, **fields: Any) -> UsageEvent:
    """A usage event in ``schema`` whose ``created_at`` is ``at`` (the service stamps "now")."""
    fields.setdefault("kind", UsageEvent.Kind.LLM_INPUT_TOKENS)
    fields.setdefault("quantity", 1000)
    fields.setdefault("unit_price", Decimal("0.000002500000"))
    fields.setdefault("model", "openai/gpt-test")
    with schema_context(schema):
        return UsageEvent.objects.create(**{**usage_event_values(**fields), "created_at": at})


def plan_set(tenant: Tenant, *, fee: str = "49.00", currency: str = "USD", code: str = "pro-test") -> Plan:
    plan = Plan.objects.create(code=code, name=code.title(), monthly_fee=Decimal(fee), currency=currency)
    Tenant.objects.filter(pk=tenant.pk).update(plan=plan)
    tenant.plan = plan
    return plan


def drafted(tenant: Tenant, period: str) -> Invoice:
    """``period``'s invoice of ``tenant``, drafted by the system."""
    tenant = Tenant.objects.select_related("plan").get(pk=tenant.pk)
    with schema_context(tenant.schema_name):
        return invoice_draft(principal=Principal.system("tests", tenant=tenant), period=period).invoice
