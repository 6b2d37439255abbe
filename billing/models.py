"""Metering, in each tenant's schema."""

from __future__ import annotations

from typing import ClassVar

from django.db import models


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
    request_id = models.CharField(max_length=128, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField()

    class Meta:
        ordering: ClassVar = ["-id"]
        indexes: ClassVar = [
            models.Index(fields=["kind", "-id"], name="usage_kind_id"),
            models.Index(fields=["agent_id", "-id"], name="usage_agent_id"),
            models.Index(fields=["created_at"], name="usage_created_at"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.quantity} {self.unit}"
