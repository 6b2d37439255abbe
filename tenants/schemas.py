"""API shapes for the control plane."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from ninja import Field, Schema


class TenantOut(Schema):
    slug: str
    name: str
    status: str
    plan: str | None
    region: str
    require_2fa: bool


class PrincipalOut(Schema):
    type: str = Field(description="user or api_key")
    id: str
    label: str = Field(description="The user's e-mail or the key's prefix")


class PlanLimitsOut(Schema):
    """The plan's limits; null is unlimited."""

    api_requests_per_minute: int | None = Field(description="REST API requests per minute, per API key or member")
    chat_turns_per_minute: int | None = Field(description="Chat messages per minute, per API key or member")
    kb_searches_per_minute: int | None = Field(description="Knowledge-base searches per minute, per API key or member")
    monthly_token_quota: int | None = Field(description="Model tokens (input + output) per calendar month, tenant-wide")
    max_members: int | None = Field(description="Members plus open invitations")
    max_agents: int | None = Field(description="Agents that are not retired")
    max_storage_mb: int | None = Field(description="MiB of stored documents")


class PlanOut(Schema):
    code: str
    name: str
    monthly_fee: Decimal = Field(description="In ``currency``, as a decimal string")
    currency: str
    limits: PlanLimitsOut


class MeOut(Schema):
    tenant: TenantOut
    plan: PlanOut | None = Field(description="The tenant's plan and its limits; null when it has none")
    principal: PrincipalOut
    role: str | None = Field(description="The member's role; null for API keys")
    permissions: list[str] = Field(
        description="The role's permissions, or the key's scopes that its person's role grants today")


class MemberOut(Schema):
    id: int
    email: str
    name: str
    role: str
    joined_at: dt.datetime
    has_2fa: bool


class MemberPage(Schema):
    items: list[MemberOut]
    next_cursor: str | None


class RoleIn(Schema):
    role: str


class InvitationIn(Schema):
    email: str = Field(max_length=254)
    role: str


class InvitationOut(Schema):
    id: int
    email: str
    role: str
    state: str
    invited_by: str | None
    created_at: dt.datetime
    expires_at: dt.datetime


class InvitationPage(Schema):
    items: list[InvitationOut]
    next_cursor: str | None


class ApiKeyIn(Schema):
    name: str = Field(max_length=100)
    scopes: list[str] = Field(min_length=1, max_length=50)
    expires_at: dt.datetime | None = None


class ApiKeyOut(Schema):
    id: int
    key_id: str
    name: str
    prefix: str
    scopes: list[str]
    state: str
    created_by: str | None = Field(description="Who made the key; null when a key or the system did")
    acting_user: str = Field(description="The member the key acts for: it never holds more than their role")
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


class ApiKeyCreated(ApiKeyOut):
    secret: str = Field(description="The whole key. Shown only in this response; store it now.")


class ApiKeyPage(Schema):
    items: list[ApiKeyOut]
    next_cursor: str | None
