"""Metering, in each tenant's schema."""

from __future__ import annotations

from typing import ClassVar

from django.db import models
from django.utils import timezone


class UsageEvent(models.Model):
    """One metered quantity: tokens of a model call, an embedding batch, a KB query, a tool call.

    Append-only (a database trigger refuses UPDATE, DELETE and TRUNCATE): invoices are
    recomputed from these rows. ``unit_price`` and ``cost`` are snapshots taken when the event
    was recorded, so later price changes never rewrite history. ``cost = quantity * unit_price``
    in ``currency``; prices are per one ``unit``.
    """

    class Kind(models.TextChoices):
        LLM_INPUT_TOKENS = "llm.input_tokens", "Model input tokens"
        LLM_OUTPUT_TOKENS = "llm.output_tokens", "Model output tokens"
        EMBEDDING_TOKENS = "embedding.tokens", "Embedding tokens"
        KB_QUERY = "kb.query", "Knowledge-base query"
        TOOL_CALL = "tool.call", "Tool call"

    kind = models.CharField(max_length=32, choices=Kind.choices)
    quantity = models.BigIntegerField()
    unit = models.CharField(max_length=16)
    model = models.CharField(max_length=200, blank=True)
    agent_id = models.BigIntegerField(null=True, blank=True)
    session_id = models.BigIntegerField(null=True, blank=True)
    turn_id = models.BigIntegerField(null=True, blank=True)
    unit_price = models.DecimalField(max_digits=20, decimal_places=12, default=0)
    cost = models.DecimalField(max_digits=20, decimal_places=12, default=0)
    currency = models.CharField(max_length=3, default="USD")
    # Who caused it: the member (User id) or API key (public id) of the session or request.
    user_id = models.BigIntegerField(null=True, blank=True)
    api_key_id = models.CharField(max_length=24, blank=True)
    request_id = models.CharField(max_length=128, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField()

    class Meta:
        ordering: ClassVar = ["-id"]
        indexes: ClassVar = [
            models.Index(fields=["kind", "-id"], name="usage_kind_id"),
            models.Index(fields=["agent_id", "-id"], name="usage_agent_id"),
            models.Index(fields=["created_at"], name="usage_created_at"),
            # The chat page's per-turn cost query.
            models.Index(fields=["turn_id"], name="usage_turn_id"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.quantity} {self.unit}"


class Budget(models.Model):
    """A spending limit on model usage for one period (``day`` or ``month`` in the tenant's
    timezone), for the whole tenant, one agent (by slug) or one API key (by public id).

    ``limit_tokens`` (model input + output tokens) and/or ``limit_cost`` (in the tenant's
    currency); ``None`` is no limit on that measure. ``alert_thresholds`` are fractions of the
    limit (``[0.8, 1.0]``) at which owners and admins are told, once per period. ``block`` stops
    model calls that would exceed the limit; ``alert`` only tells.
    """

    class Scope(models.TextChoices):
        TENANT = "tenant", "Tenant"
        AGENT = "agent", "Agent"
        API_KEY = "api_key", "API key"

    class Period(models.TextChoices):
        DAY = "day", "Day"
        MONTH = "month", "Month"

    class Action(models.TextChoices):
        BLOCK = "block", "Block"
        ALERT = "alert", "Alert only"

    name = models.CharField(max_length=100, blank=True)
    scope = models.CharField(max_length=10, choices=Scope.choices, default=Scope.TENANT)
    agent = models.CharField(max_length=80, blank=True, help_text="The agent's slug (scope agent).")
    api_key = models.CharField(max_length=24, blank=True, help_text="The API key's public id (scope api_key).")
    period = models.CharField(max_length=8, choices=Period.choices, default=Period.MONTH)
    limit_tokens = models.BigIntegerField(null=True, blank=True)
    limit_cost = models.DecimalField(max_digits=20, decimal_places=6, null=True, blank=True)
    alert_thresholds = models.JSONField(default=list, blank=True)
    action = models.CharField(max_length=8, choices=Action.choices, default=Action.BLOCK)
    created_by_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["id"]
        indexes: ClassVar = [models.Index(fields=["scope", "agent", "api_key"], name="budget_scope")]

    def __str__(self) -> str:
        return self.name or f"{self.scope} {self.period} budget"


class BudgetPeriod(models.Model):
    """The running totals of one budget (or of the plan's monthly token quota, ``budget`` null)
    in one period: what settled calls spent and what calls in flight have reserved.

    ``key`` names the counter (``budget:<id>`` or ``plan:monthly_token_quota``); one row per
    key and period start. Reservations and settlements update these rows under a row lock.
    ``alerted`` lists the thresholds already announced in this period.
    """

    key = models.CharField(max_length=64)
    budget = models.ForeignKey(Budget, null=True, blank=True, on_delete=models.CASCADE, related_name="periods")
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    limit_tokens = models.BigIntegerField(null=True, blank=True)
    limit_cost = models.DecimalField(max_digits=20, decimal_places=6, null=True, blank=True)
    spent_tokens = models.BigIntegerField(default=0)
    spent_cost = models.DecimalField(max_digits=24, decimal_places=12, default=0)
    reserved_tokens = models.BigIntegerField(default=0)
    reserved_cost = models.DecimalField(max_digits=24, decimal_places=12, default=0)
    alerted = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["-period_start", "id"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["key", "period_start"], name="budget_period_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.key} from {self.period_start:%Y-%m-%d}"


class BudgetReservation(models.Model):
    """What one model call in flight holds against budget periods until it is folded into
    them or released: ``periods`` are ``BudgetPeriod`` ids, each reserved ``tokens`` and
    ``cost``. The call's meter transaction records its real usage here (``settled_tokens``,
    ``settled_cost`` in the tenant's currency, ``settled_at``); the fold, after that commit,
    moves it into the counters and deletes the row. The sweep folds a settled row whose fold
    was lost, and releases an unsettled one after ``expires_at`` (a crashed worker)."""

    turn_id = models.BigIntegerField(null=True, blank=True)
    periods = models.JSONField(default=list)
    tokens = models.BigIntegerField()
    cost = models.DecimalField(max_digits=24, decimal_places=12, default=0)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    settled_tokens = models.BigIntegerField(null=True, blank=True)
    settled_cost = models.DecimalField(max_digits=24, decimal_places=12, null=True, blank=True)
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering: ClassVar = ["id"]
        indexes: ClassVar = [models.Index(fields=["expires_at"], name="budget_reservation_expiry")]

    def __str__(self) -> str:
        return f"reservation {self.pk} of {self.tokens} tokens"


class Invoice(models.Model):
    """A tenant's invoice for one calendar month (``period`` ``YYYY-MM`` in the tenant's
    timezone), recomputed from usage events while ``draft``; ``finalized`` gives it the tenant's
    next sequential ``number`` and freezes it (a database trigger refuses changes, except
    voiding); ``void`` cancels a finalized invoice. Amounts are in ``currency``."""

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        FINALIZED = "finalized", "Finalized"
        VOID = "void", "Void"

    number = models.PositiveIntegerField(null=True, blank=True)
    period = models.CharField(max_length=7)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.DRAFT)
    currency = models.CharField(max_length=3, default="USD")
    plan_code = models.CharField(max_length=40, blank=True)
    plan_fee = models.DecimalField(max_digits=20, decimal_places=2, default=0)
    usage_total = models.DecimalField(max_digits=20, decimal_places=2, default=0)
    total = models.DecimalField(max_digits=20, decimal_places=2, default=0)
    events_count = models.BigIntegerField(default=0)
    drafted_at = models.DateTimeField(default=timezone.now)
    finalized_at = models.DateTimeField(null=True, blank=True)
    voided_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["-period", "-id"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["period"], condition=~models.Q(status="void"),
                                    name="invoice_one_per_period"),
            models.UniqueConstraint(fields=["number"], name="invoice_number_unique"),
        ]

    def __str__(self) -> str:
        return f"invoice {self.number or 'draft'} {self.period}"


class InvoiceLine(models.Model):
    """One line of an invoice: the usage of one kind, model endpoint, agent and unit price in
    the period (or the plan's monthly fee, ``kind`` ``plan.fee``). ``amount`` is rounded to
    cents by the invoice's one rounding rule (``billing.services.invoices``)."""

    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    position = models.PositiveIntegerField(default=0)
    kind = models.CharField(max_length=32)
    description = models.CharField(max_length=300, blank=True)
    model = models.CharField(max_length=200, blank=True)
    endpoint = models.CharField(max_length=100, blank=True)
    agent_id = models.BigIntegerField(null=True, blank=True)
    agent_slug = models.CharField(max_length=80, blank=True)
    quantity = models.BigIntegerField(default=0)
    unit = models.CharField(max_length=16, blank=True)
    unit_price = models.DecimalField(max_digits=20, decimal_places=12, default=0)
    amount = models.DecimalField(max_digits=20, decimal_places=2, default=0)

    class Meta:
        ordering: ClassVar = ["invoice_id", "position", "id"]

    def __str__(self) -> str:
        return f"{self.kind} {self.quantity} {self.unit}"
