"""REST endpoints for the tenant's single sign-on settings: ``GET/PUT /sso``.

Owners and admins (``members:write``). ``client_secret`` is write-only: reads say only whether
one is set (``client_secret_set``). Rules: ``tenants.services.sso``.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Field, Router, Schema
from pydantic import StrictBool, StrictStr, model_validator

from config.api import principal_of
from tenants.services.sso import SsoSettings, sso_settings_get, sso_settings_update

router = Router(tags=["single sign-on"])


class SsoSettingsIn(Schema):
    enabled: StrictBool | None = Field(None, description="Single sign-on on or off; omitted: unchanged")
    display_name: StrictStr | None = Field(None, description='Shown as "Sign in with <display_name>"')
    issuer_url: StrictStr | None = Field(
        None, description="The IdP's issuer URL (discovery at <issuer>/.well-known/openid-configuration), "
        "checked by the egress guard")
    client_id: StrictStr | None = Field(None, description="The OAuth client id registered at the IdP")
    client_secret: StrictStr = Field("", description="Write-only client secret; '' keeps the current one")
    scopes: list[StrictStr] | None = Field(None, description="OAuth scopes; 'openid' is always included")
    groups_claim: StrictStr | None = Field(None, description="The claim whose values map to roles, e.g. 'groups'")
    role_mapping: dict[str, StrictStr] | None = Field(
        None, description="Group value -> role (admin, operator, approver, auditor, viewer; never owner)")
    default_role: StrictStr | None = Field(
        None, description="Role when no group maps; '' refuses people whose groups map to no role")
    allowed_email_domains: list[StrictStr] | None = Field(
        None, description="Only addresses at these domains may sign in (at least one while enabled)")
    enforce_sso: StrictBool | None = Field(
        None, description="Refuse password sign-in on this tenant's host to members other than owners")

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, value: Any) -> Any:
        # As billing settings: with every field optional a JSON array would pass as "change nothing".
        if not isinstance(getattr(value, "_obj", value), dict):
            raise ValueError("the body must be a JSON object")
        return value


class SsoSettingsOut(Schema):
    enabled: bool
    display_name: str
    issuer_url: str
    client_id: str
    client_secret_set: bool
    scopes: list[str]
    groups_claim: str
    role_mapping: dict[str, str]
    default_role: str
    allowed_email_domains: list[str]
    enforce_sso: bool


def _out(current: SsoSettings) -> dict[str, Any]:
    return {
        "enabled": current.enabled, "display_name": current.display_name, "issuer_url": current.issuer_url,
        "client_id": current.client_id, "client_secret_set": current.client_secret_set, "scopes": current.scopes,
        "groups_claim": current.groups_claim, "role_mapping": current.role_mapping,
        "default_role": current.default_role, "allowed_email_domains": current.allowed_email_domains,
        "enforce_sso": current.enforce_sso,
    }


@router.get("/sso", response=SsoSettingsOut, summary="The tenant's single sign-on settings")
def sso_get(request: HttpRequest) -> dict[str, Any]:
    return _out(sso_settings_get(principal=principal_of(request), tenant=request.tenant))  # type: ignore[attr-defined]


@router.put("/sso", response=SsoSettingsOut, summary="Change the tenant's single sign-on settings")
def sso_put(request: HttpRequest, payload: SsoSettingsIn) -> dict[str, Any]:
    return _out(sso_settings_update(
        principal=principal_of(request), tenant=request.tenant,  # type: ignore[attr-defined]
        enabled=payload.enabled, display_name=payload.display_name, issuer_url=payload.issuer_url,
        client_id=payload.client_id, client_secret=payload.client_secret, scopes=payload.scopes,
        groups_claim=payload.groups_claim, role_mapping=payload.role_mapping, default_role=payload.default_role,
        allowed_email_domains=payload.allowed_email_domains, enforce_sso=payload.enforce_sso,
    ))
