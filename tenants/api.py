"""REST endpoints: who am I, members and invitations, API keys."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Query, Router, Schema, Status

from config.api import keyset_page, principal_of
from tenants import selectors
from tenants.models import ApiKey, Invitation, Membership, Plan
from tenants.schemas import (
    ApiKeyCreated,
    ApiKeyIn,
    ApiKeyOut,
    ApiKeyPage,
    InvitationIn,
    InvitationOut,
    InvitationPage,
    MemberOut,
    MemberPage,
    MeOut,
    RoleIn,
)
from tenants.services import keys as key_services
from tenants.services import members as member_services

router = Router(tags=["tenant"])

# The Plan fields ``GET /me`` returns under ``plan.limits`` (None = unlimited).
PLAN_LIMITS = ("api_requests_per_minute", "chat_turns_per_minute", "kb_searches_per_minute", "monthly_token_quota",
               "max_members", "max_agents", "max_storage_mb")


class PageParams(Schema):
    limit: int = 50
    cursor: str | None = None


def member_out(m: Membership) -> dict[str, Any]:
    return {"id": m.pk, "email": m.user.email, "name": m.user.name, "role": m.role,
            "joined_at": m.created_at, "has_2fa": bool(getattr(m, "has_2fa", False))}


def invitation_out(i: Invitation) -> dict[str, Any]:
    return {"id": i.pk, "email": i.email, "role": i.role, "state": i.state,
            "invited_by": i.invited_by.email if i.invited_by else None,
            "created_at": i.created_at, "expires_at": i.expires_at}


def api_key_out(k: ApiKey) -> dict[str, Any]:
    return {"id": k.pk, "key_id": k.key_id, "name": k.name, "prefix": k.prefix, "scopes": k.scopes,
            "state": k.state, "created_by": k.created_by.email if k.created_by else None,
            "acting_user": k.acting_user.email,
            "created_at": k.created_at, "expires_at": k.expires_at, "last_used_at": k.last_used_at,
            "revoked_at": k.revoked_at}


def plan_out(plan: Plan) -> dict[str, Any]:
    return {"code": plan.code, "name": plan.name, "monthly_fee": plan.monthly_fee, "currency": plan.currency,
            "limits": {name: getattr(plan, name) for name in PLAN_LIMITS}}


@router.get("/me", response=MeOut, summary="The tenant, its plan's limits and the caller")
def me(request: HttpRequest) -> dict[str, Any]:
    principal = principal_of(request)
    principal.require("tenant:read")
    tenant = request.tenant  # type: ignore[attr-defined]
    return {
        "tenant": {"slug": tenant.slug, "name": tenant.name, "status": tenant.status,
                   "plan": tenant.plan.code if tenant.plan_id else None, "region": tenant.region,
                   "require_2fa": tenant.require_2fa},
        "plan": plan_out(tenant.plan) if tenant.plan_id else None,
        "principal": {"type": principal.kind, "id": principal.actor_id, "label": principal.label},
        "role": principal.role,
        "permissions": sorted(principal.permissions),
    }


@router.get("/members/invitations", response=InvitationPage, tags=["members"], summary="Open invitations")
def invitation_list(request: HttpRequest, page: Query[PageParams]) -> dict[str, Any]:
    invitations = selectors.invitation_list(principal=principal_of(request), tenant=request.tenant)  # type: ignore[attr-defined]
    rows, cursor = keyset_page(invitations, cursor=page.cursor, limit=page.limit)
    return {"items": [invitation_out(i) for i in rows], "next_cursor": cursor}


@router.post("/members/invitations", response={201: InvitationOut}, tags=["members"],
             summary="Invite someone by e-mail")
def invitation_create(request: HttpRequest, payload: InvitationIn) -> Status[dict[str, Any]]:
    """The link goes only to the invitee by e-mail: an API caller never sees it (a key that could
    accept its own invitation would leave behind a login that outlives the key)."""
    issued = member_services.invitation_create(
        principal=principal_of(request), tenant=request.tenant, email=payload.email, role=payload.role  # type: ignore[attr-defined]
    )
    return Status(201, invitation_out(issued.invitation))


@router.delete("/members/invitations/{invitation_id}", response=InvitationOut, tags=["members"],
               summary="Revoke an invitation")
def invitation_revoke(request: HttpRequest, invitation_id: int) -> dict[str, Any]:
    principal = principal_of(request)
    invitation = selectors.invitation_get(principal=principal, tenant=request.tenant,  # type: ignore[attr-defined]
                                          invitation_id=invitation_id)
    return invitation_out(member_services.invitation_revoke(principal=principal, invitation=invitation))


@router.get("/members", response=MemberPage, tags=["members"], summary="Members")
def member_list(request: HttpRequest, page: Query[PageParams]) -> dict[str, Any]:
    members = selectors.member_list(principal=principal_of(request), tenant=request.tenant)  # type: ignore[attr-defined]
    rows, cursor = keyset_page(members, cursor=page.cursor, limit=page.limit)
    return {"items": [member_out(m) for m in rows], "next_cursor": cursor}


@router.get("/members/{membership_id}", response=MemberOut, tags=["members"], summary="One member")
def member_get(request: HttpRequest, membership_id: int) -> dict[str, Any]:
    return member_out(selectors.member_get(principal=principal_of(request), tenant=request.tenant,  # type: ignore[attr-defined]
                                           membership_id=membership_id))


@router.patch("/members/{membership_id}", response=MemberOut, tags=["members"], summary="Change a role")
def member_role_change(request: HttpRequest, membership_id: int, payload: RoleIn) -> dict[str, Any]:
    principal = principal_of(request)
    membership = selectors.member_get(principal=principal, tenant=request.tenant, membership_id=membership_id)  # type: ignore[attr-defined]
    member_services.membership_role_change(principal=principal, membership=membership, role=payload.role)
    return member_out(selectors.member_get(principal=principal, tenant=request.tenant, membership_id=membership_id))  # type: ignore[attr-defined]


@router.delete("/members/{membership_id}", response={204: None}, tags=["members"], summary="Remove a member")
def member_remove(request: HttpRequest, membership_id: int) -> Status[None]:
    principal = principal_of(request)
    membership = selectors.member_get(principal=principal, tenant=request.tenant, membership_id=membership_id)  # type: ignore[attr-defined]
    member_services.membership_remove(principal=principal, membership=membership)
    return Status(204, None)


@router.get("/api-keys", response=ApiKeyPage, tags=["api keys"], summary="API keys")
def api_key_list(request: HttpRequest, page: Query[PageParams]) -> dict[str, Any]:
    keys = selectors.api_key_list(principal=principal_of(request), tenant=request.tenant)  # type: ignore[attr-defined]
    rows, cursor = keyset_page(keys, cursor=page.cursor, limit=page.limit)
    return {"items": [api_key_out(k) for k in rows], "next_cursor": cursor}


@router.post("/api-keys", response={201: ApiKeyCreated}, tags=["api keys"], summary="Create an API key")
def api_key_create(request: HttpRequest, payload: ApiKeyIn) -> Status[dict[str, Any]]:
    issued = key_services.api_key_create(
        principal=principal_of(request), tenant=request.tenant, name=payload.name,  # type: ignore[attr-defined]
        scopes=payload.scopes, expires_at=payload.expires_at,
    )
    return Status(201, {**api_key_out(issued.key), "secret": issued.secret})


@router.delete("/api-keys/{key_id}", response=ApiKeyOut, tags=["api keys"], summary="Revoke an API key")
def api_key_revoke(request: HttpRequest, key_id: str) -> dict[str, Any]:
    principal = principal_of(request)
    key = selectors.api_key_get(principal=principal, tenant=request.tenant, key_id=key_id)  # type: ignore[attr-defined]
    return api_key_out(key_services.api_key_revoke(principal=principal, key=key))
