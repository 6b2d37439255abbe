"""SCIM reads, scoped to one tenant: members as SCIM users, roles as SCIM groups."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.db.models import QuerySet

from tenants.models import Membership, Tenant
from tenants.roles import Role
from tenants.scim.filters import GroupFacts, Node, group_matches, users_q


def _members(tenant: Tenant) -> QuerySet[Membership]:
    return Membership.objects.filter(tenant=tenant).select_related("user")


@dataclass(frozen=True)
class UserPage:
    """One page of a user listing: ``rows`` in creation order, ``total`` matching in all."""

    rows: list[Membership]
    total: int


def scim_user_list(*, tenant: Tenant, node: Node | None, start_index: int, count: int) -> UserPage:
    """Members of ``tenant`` matching the parsed filter ``node`` (all when ``None``), the page
    from 1-based ``start_index`` holding at most ``count``. Two queries (count and page)
    whatever the page's size; ``count`` 0 costs one. Raises ``ScimError`` 400 ``invalidFilter``
    (``tenants.scim.filters.users_q``)."""
    members = _members(tenant)
    if node is not None:
        members = members.filter(users_q(node))
    total = members.count()
    if count == 0 or start_index > total:
        return UserPage(rows=[], total=total)
    offset = start_index - 1
    return UserPage(rows=list(members.order_by("created_at", "pk")[offset:offset + count]), total=total)


def scim_user_get(*, tenant: Tenant, scim_id: uuid.UUID) -> Membership | None:
    """The member of ``tenant`` whose SCIM id is ``scim_id`` (user loaded), or ``None``,
    also for another tenant's member."""
    return _members(tenant).filter(scim_id=scim_id).first()


def scim_users_by_id(*, tenant: Tenant, scim_ids: list[uuid.UUID]) -> dict[uuid.UUID, Membership]:
    """The members of ``tenant`` among ``scim_ids``, by SCIM id (ids of other tenants are left out)."""
    return {m.scim_id: m for m in _members(tenant).filter(scim_id__in=scim_ids)}


def scim_group_list(*, tenant: Tenant, node: Node | None) -> list[str]:
    """The roles (as SCIM groups) matching the parsed filter ``node``, in ``Role`` order. A
    ``members`` comparison reads the tenant's members once."""
    roles_by_member: dict[str, str] | None = None

    def member_role(scim_id: str) -> str | None:
        nonlocal roles_by_member
        if roles_by_member is None:
            roles_by_member = {str(s): r for s, r in
                               Membership.objects.filter(tenant=tenant).values_list("scim_id", "role")}
        return roles_by_member.get(scim_id.lower())

    def facts(role: str) -> GroupFacts:
        return GroupFacts(id=role, display_name=role, has_member=lambda scim_id: member_role(scim_id) == role)

    roles = [str(r) for r in Role.values]
    if node is None:
        return roles
    return [role for role in roles if group_matches(node, facts(role))]


def scim_group_members(*, tenant: Tenant, roles: list[str]) -> dict[str, list[Membership]]:
    """The members holding each of ``roles`` (users loaded), in creation order; one query."""
    result: dict[str, list[Membership]] = {role: [] for role in roles}
    if roles:
        for membership in _members(tenant).filter(role__in=roles).order_by("created_at", "pk"):
            result[membership.role].append(membership)
    return result
