"""The public audit chain and every chain's signed checkpoints on the staff pages (read-only)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from compliance.models import AuditEvent
from tenants.models import AuditCheckpoint


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Append-only rows: staff may read them, never add, change or delete (a trigger refuses too)."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ("seq", "created_at", "actor_label", "action", "target_type", "target_id", "ip")
    list_filter = ("action", "actor_type")
    search_fields = ("actor_label", "action", "target_id", "request_id")
    readonly_fields = [f.name for f in AuditEvent._meta.fields]


@admin.register(AuditCheckpoint)
class AuditCheckpointAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "schema_name", "seq", "hash", "legacy_events", "key_id")
    list_filter = ("schema_name",)
    readonly_fields = [f.name for f in AuditCheckpoint._meta.fields]
