"""The audit trail: one append-only, hash-chained table in every schema (public and tenants)."""

from __future__ import annotations

from typing import ClassVar

from django.db import models


class AuditEvent(models.Model):
    """One recorded action. Rows are never updated or deleted (a database trigger refuses it).

    ``seq`` numbers the events of this schema's chain from 1 without gaps; ``prev_hash`` is the
    ``hash`` of event ``seq - 1`` (64 zeros for the first) and ``hash`` is computed by
    ``compliance.chain.event_hash`` under the signing key named by ``key_id`` (``''`` for events
    written before the chain was keyed, hashed by ``compliance.chain.plain_event_hash``). Unique
    ``seq`` and ``prev_hash`` make a forked chain impossible to store even if a writer skipped the
    chain lock.
    """

    seq = models.BigIntegerField(unique=True)
    created_at = models.DateTimeField()
    actor_type = models.CharField(max_length=16)
    actor_id = models.CharField(max_length=64, blank=True)
    actor_label = models.CharField(max_length=254, blank=True)
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    payload = models.JSONField(default=dict)
    request_id = models.CharField(max_length=128, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    prev_hash = models.CharField(max_length=64, unique=True)
    hash = models.CharField(max_length=64, unique=True)
    key_id = models.CharField(max_length=16, blank=True, default="")

    class Meta:
        ordering: ClassVar = ["-seq"]
        indexes: ClassVar = [
            models.Index(fields=["action", "-seq"], name="audit_action_seq"),
            models.Index(fields=["actor_label", "-seq"], name="audit_actor_seq"),
            models.Index(fields=["created_at"], name="audit_created_at"),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} by {self.actor_label or self.actor_type}"
