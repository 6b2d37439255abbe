"""The ``--schema`` option shared by the audit commands."""

from __future__ import annotations

from django.core.management.base import CommandError
from django_tenants.utils import schema_exists

from compliance.selectors import audited_schemas


def schemas_to_audit(schema: str | None) -> list[str]:
    """``[schema]`` when one is named (``public`` or ``t_<slug>``), else every audited schema.

    Raises ``CommandError`` for a named schema that does not exist.
    """
    if not schema:
        return audited_schemas()
    if schema != "public" and not schema_exists(schema):
        raise CommandError(f"No schema {schema!r}")
    return [schema]
