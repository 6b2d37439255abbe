"""Plan limits: how many members and agents a tenant may have and how much its documents may
hold (``Plan.max_members``, ``max_agents``, ``max_storage_mb``; ``None`` is unlimited).

A service that adds to a limited resource calls ``plan_limit_check``, which locks the tenant's
row (held until the transaction ends) before it counts, so two concurrent requests cannot both
take the last slot: the second waits for the first to commit and then counts its row. Tenants
whose plan does not limit the resource take no lock. Exceeding a limit is ``Conflict`` (409)
with code ``plan_limit``, the answer invitations gave before agents and storage were limited.
"""

from __future__ import annotations

from collections.abc import Callable

from django.db import connection, transaction

from config.errors import Conflict
from tenants.models import Tenant

PLAN_LIMIT = "plan_limit"
MIB = 1024 * 1024

_NOUNS = {"max_members": "members", "max_agents": "agents (retired ones do not count)"}


def _tenant_of_connection() -> Tenant | None:
    return Tenant.objects.select_related("plan").filter(
        schema_name=connection.schema_name).first()  # type: ignore[attr-defined]


def plan_limit_check(*, limit: str, used: Callable[[], int], adding: int = 1, tenant: Tenant | None = None) -> None:
    """Refuse to add ``adding`` to a resource that ``tenant``'s plan limits.

    ``limit`` is a ``Plan`` field: ``max_members``, ``max_agents`` (counts), or ``max_storage_mb``
    (``used()`` and ``adding`` in bytes, the limit in MiB). ``tenant`` defaults to the tenant whose
    schema the connection is in; none, no plan or a ``None`` limit allows anything. Otherwise the
    tenant's row is locked (``SELECT ... FOR NO KEY UPDATE``, held until the transaction ends) before
    ``used()`` counts, so concurrent callers are serialised and each counts what the others
    committed. Raises ``Conflict`` (code ``plan_limit``; ``details``: ``limit``, ``allowed`` in the
    limit's unit, ``used``), and ``TransactionManagementError`` outside ``transaction.atomic``.
    """
    if not transaction.get_connection().in_atomic_block:
        raise transaction.TransactionManagementError("plan_limit_check needs an atomic block.")
    current = tenant if tenant is not None else _tenant_of_connection()
    if current is None or _allowed(current, limit) is None:
        return
    # FOR NO KEY UPDATE still serialises the checks but, unlike FOR UPDATE, lets rows that only
    # reference the tenant (members, keys) be inserted meanwhile (an upload may hold it a while).
    locked = Tenant.objects.select_related("plan").select_for_update(no_key=True, of=("self",)).get(pk=current.pk)
    allowed = _allowed(locked, limit)
    if allowed is None:
        return
    count = used()
    if limit == "max_storage_mb":
        if count + adding <= allowed * MIB:
            return
        message = (f"The plan allows {allowed} MB of documents; {count / MIB:.1f} MB are stored and this upload "
                   f"adds {adding / MIB:.1f} MB. Delete documents or change the plan.")
    else:
        if count + adding <= allowed:
            return
        message = f"The plan allows {allowed} {_NOUNS.get(limit, limit)}."
    raise Conflict(message, code=PLAN_LIMIT, details={"limit": limit, "allowed": allowed, "used": count})


def _allowed(tenant: Tenant, limit: str) -> int | None:
    plan = tenant.plan if tenant.plan_id else None
    return getattr(plan, limit) if plan is not None else None
