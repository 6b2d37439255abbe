"""Reads on a tenant's tools (``tools:read``), scoped to the current tenant's schema: another
tenant's tool ids are "not found"."""

from __future__ import annotations

from django.db.models import QuerySet

from agents.models import Tool
from config.errors import NotFound
from tenants.principal import Principal


def tool_list(*, principal: Principal, kind: str | None = None) -> QuerySet[Tool]:
    """The tenant's tools by name, builtins included (``kind`` filters: builtin or http).
    Raises ``Forbidden`` without ``tools:read``."""
    principal.require("tools:read")
    queryset = Tool.objects.order_by("name")
    if kind:
        queryset = queryset.filter(kind=kind)
    return queryset


def tool_get(*, principal: Principal, tool_id: int) -> Tool:
    """One tool by id. Raises ``NotFound`` (also for ids of other tenants' tools) and
    ``Forbidden`` without ``tools:read``."""
    tool = tool_list(principal=principal).filter(pk=tool_id).first()
    if tool is None:
        raise NotFound("No such tool.")
    return tool
