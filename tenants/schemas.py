"""API shapes for the control plane."""

from __future__ import annotations

import datetime as dt

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


class MeOut(Schema):
    tenant: TenantOut
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
