"""Who is acting: a member in the browser, an API key, staff, or the system itself.

Services take a ``Principal`` rather than a request, so the same rule holds whether the call
came from a page, the REST API, a WebSocket, a worker or a management command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from config.errors import Forbidden
from tenants.roles import permissions_for_role

if TYPE_CHECKING:
    from django.http import HttpRequest

    from tenants.models import ApiKey, Membership, Tenant, User

PrincipalKind = Literal["user", "api_key", "staff", "system"]


@dataclass(frozen=True)
class Principal:
    """An authenticated actor and what it may do in ``tenant`` (``None`` on the public host)."""

    kind: PrincipalKind
    tenant: Tenant | None
    permissions: frozenset[str]
    user: User | None = None
    api_key: ApiKey | None = None
    role: str | None = None
    label: str = field(default="")

    @classmethod
    def for_member(cls, membership: Membership) -> Principal:
        """A tenant member acting in the browser or over a session-authenticated API call."""
        return cls(
            kind="user",
            tenant=membership.tenant,
            permissions=permissions_for_role(membership.role),
            user=membership.user,
            role=membership.role,
            label=membership.user.email,
        )

    @classmethod
    def for_api_key(cls, key: ApiKey) -> Principal:
        """A program authenticated by ``key``, as ``api_key_authenticate`` returns it.

        It holds the key's scopes that the role of the key's person (``key.acting_user``) in the
        key's tenant grants today: ``key.acting_role``, which ``api_key_authenticate`` reads in
        the same query as the key. A key without it holds nothing (fails closed). ``role`` stays
        ``None`` on the principal: a key never acts with a member's role-assignment rights
        (``tenants.services.members``).
        """
        role = getattr(key, "acting_role", None)
        return cls(
            kind="api_key",
            tenant=key.tenant,
            permissions=frozenset(key.scopes) & permissions_for_role(role or ""),
            api_key=key,
            label=key.prefix,
        )

    @classmethod
    def for_staff(cls, user: User) -> Principal:
        """A staff user on the admin pages; acts on the control plane, not inside tenants."""
        return cls(kind="staff", tenant=None, permissions=frozenset(), user=user, label=user.email)

    @classmethod
    def system(cls, label: str = "system", tenant: Tenant | None = None) -> Principal:
        """The platform itself (migrations, seeders, sweepers, management commands)."""
        return cls(kind="system", tenant=tenant, permissions=frozenset(), label=label)

    @property
    def actor_id(self) -> str:
        """A stable id for audit records: user pk, key id, or the system label."""
        if self.user is not None:
            return str(self.user.pk)
        if self.api_key is not None:
            return self.api_key.key_id
        return self.label

    @property
    def person(self) -> User | None:
        """The human this principal acts for: the member or staff user, an API key's
        ``acting_user``, or ``None`` for the system."""
        if self.user is not None:
            return self.user
        if self.api_key is not None:
            return self.api_key.acting_user
        return None

    def can(self, permission: str) -> bool:
        """True when this principal holds ``permission`` (the system holds every one)."""
        return self.kind == "system" or permission in self.permissions

    def require(self, permission: str) -> None:
        """Raise ``Forbidden`` unless this principal holds ``permission``."""
        if not self.can(permission):
            raise Forbidden(f"This action needs the '{permission}' permission.", code="permission_denied")


def request_principal(request: HttpRequest) -> Principal:
    """The principal ``tenants.middleware`` attached to a console or API request (a member, an API
    key or staff). Views behind that middleware call this instead of reading the attribute."""
    return request.principal  # type: ignore[attr-defined, no-any-return]
