"""Roles, permissions and API-key scopes: one vocabulary for people and programs.

A permission is a string ``<area>:<action>``. A member holds the permissions of their role; an
API key holds the scopes chosen when it was made, which must be a subset of its creator's
permissions at that time (nobody can mint a key more powerful than themselves).

| role     | can                                                                        |
|----------|----------------------------------------------------------------------------|
| owner    | everything, including managing owners and tenant security settings         |
| admin    | everything except managing owners and tenant security settings             |
| operator | build and run: agents, tools, knowledge, chat, own API keys; read members, |
|          | usage, budgets, invoices and approvals                                     |
| approver | decide approval requests of tool calls; read agents, tools, knowledge; chat |
| viewer   | read agents, tools and knowledge, chat with agents; read members           |
| auditor  | read-only: audit trail, usage, budgets, invoices, approvals, members,      |
|          | agents and knowledge                                                       |

Deciding approvals (``approvals:decide``) is held by owner, admin and approver (and API keys
given that scope by one of them); nobody decides a call their own message caused.
"""

from __future__ import annotations

from django.db import models


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    OPERATOR = "operator", "Operator"
    VIEWER = "viewer", "Viewer"
    APPROVER = "approver", "Approver"
    AUDITOR = "auditor", "Auditor"


# Every permission and what it allows; API-key scopes are chosen from these.
PERMISSIONS: dict[str, str] = {
    "tenant:read": "See the tenant's name, plan and dashboard",
    "tenant:admin": "Change the tenant's security settings (e.g. require 2FA)",
    "members:read": "List members and invitations",
    "members:write": "Invite, change roles of and remove members",
    "keys:read": "List API keys",
    "keys:write": "Create and revoke API keys",
    "audit:read": "Read the audit trail",
    "usage:read": "Read usage events and usage summaries",
    "billing:read": "Read budgets and invoices",
    "billing:write": "Create, change and delete budgets; draft and finalize invoices",
    "agents:read": "Read agents and their versions",
    "agents:write": "Create, edit, publish and retire agents",
    "kb:read": "Read and search knowledge collections",
    "kb:write": "Create collections, upload and delete documents",
    "chat": "Chat with agents",
    "tools:read": "Read tools",
    "tools:write": "Create, edit, test and delete tools",
    "approvals:read": "Read approval requests of tool calls",
    "approvals:decide": "Approve or reject tool calls that need approval",
    # Owners and admins only (it implies members:write for the SCIM endpoints, tenants.scim).
    "scim:provision": "Provision and deprovision members from an identity provider over SCIM 2.0",
}

_READ = {"tenant:read", "members:read", "agents:read", "kb:read", "tools:read"}

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    Role.OWNER: frozenset(PERMISSIONS),
    Role.ADMIN: frozenset(PERMISSIONS) - {"tenant:admin"},
    Role.OPERATOR: frozenset(
        _READ | {"keys:read", "keys:write", "usage:read", "billing:read", "agents:write", "kb:write", "chat",
                 "tools:write", "approvals:read"}
    ),
    Role.APPROVER: frozenset(_READ | {"chat", "approvals:read", "approvals:decide"}),
    Role.VIEWER: frozenset(_READ | {"chat"}),
    Role.AUDITOR: frozenset(_READ | {"audit:read", "usage:read", "billing:read", "keys:read", "approvals:read"}),
}

# The scopes offered by default when a key is created in the console.
DEFAULT_KEY_SCOPES = ("tenant:read",)


def permissions_for_role(role: str) -> frozenset[str]:
    """Return the permissions of ``role``; an unknown role has none."""
    return ROLE_PERMISSIONS.get(role, frozenset())


def roles_assignable_by(role: str) -> list[str]:
    """Roles a member with ``role`` may grant: owners grant any, admins any but owner."""
    if role == Role.OWNER:
        return [r.value for r in Role]
    if role == Role.ADMIN:
        return [r.value for r in Role if r != Role.OWNER]
    return []


def unknown_scopes(scopes: list[str] | tuple[str, ...]) -> list[str]:
    """Return the entries of ``scopes`` that are not known permissions, in order."""
    return [s for s in scopes if s not in PERMISSIONS]
