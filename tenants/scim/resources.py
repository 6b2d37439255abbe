"""SCIM 2.0 resources as JSON (RFC 7643): users (members), groups (roles) and the discovery
documents IdPs read (``ServiceProviderConfig``, ``ResourceTypes``, ``Schemas``).

A SCIM User of tenant T is a ``Membership`` in T: ``id`` is ``Membership.scim_id``, ``userName``
and ``emails`` the person's sign-in address, ``externalId`` the IdP's id kept on the membership.
A SCIM Group is one of the portal's roles (``tenants.roles.Role``): ``id`` and ``displayName``
are the role's value (``admin``); its members are the members holding that role.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.http import HttpRequest

from tenants.models import Membership
from tenants.roles import Role
from tenants.scim.filters import GROUP_SCHEMA, USER_SCHEMA

LIST_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
CONTENT_TYPE = "application/scim+json"
# Page size when the client asks none, and the most one page holds (RFC 7644 §3.4.2.4).
DEFAULT_COUNT = 100
MAX_COUNT = 200
MAX_OPERATIONS = 100


def base_url(request: HttpRequest) -> str:
    """``<scheme>://<host the IdP called>/scim/v2``: ``meta.location`` and ``$ref`` start with it,
    so a tenant's custom domain stays the domain its IdP talks to."""
    return request.build_absolute_uri("/scim/v2")


def _iso(value: Any) -> str:
    return value.isoformat().replace("+00:00", "Z")


def group_display(role: str) -> str:
    """A role's display name, which is its value (``admin``): IdPs map groups by name."""
    return str(role)


def user_resource(membership: Membership, *, base: str) -> dict[str, Any]:
    """The SCIM User of ``membership`` (its ``user`` loaded). ``active`` is always true: a
    deactivated person has no membership, so no resource."""
    user = membership.user
    location = f"{base}/Users/{membership.scim_id}"
    resource: dict[str, Any] = {
        "schemas": [USER_SCHEMA],
        "id": str(membership.scim_id),
        "userName": user.email,
        "displayName": user.name or user.email,
        "name": {"formatted": user.name or ""},
        "emails": [{"value": user.email, "type": "work", "primary": True}],
        "active": True,
        "groups": [{"value": membership.role, "display": group_display(membership.role),
                    "$ref": f"{base}/Groups/{membership.role}", "type": "direct"}],
        "meta": {"resourceType": "User", "created": _iso(membership.created_at),
                 "lastModified": _iso(membership.created_at), "location": location},
    }
    if membership.scim_external_id is not None:
        resource["externalId"] = membership.scim_external_id
    return resource


def group_resource(role: str, *, base: str, members: Iterable[Membership] | None) -> dict[str, Any]:
    """The SCIM Group of ``role``; ``members`` (their users loaded) or ``None`` to leave the
    attribute out (``excludedAttributes=members``)."""
    resource: dict[str, Any] = {
        "schemas": [GROUP_SCHEMA],
        "id": str(role),
        "displayName": group_display(role),
        "meta": {"resourceType": "Group", "location": f"{base}/Groups/{role}"},
    }
    if members is not None:
        resource["members"] = [
            {"value": str(m.scim_id), "display": m.user.email, "type": "User",
             "$ref": f"{base}/Users/{m.scim_id}"}
            for m in members
        ]
    return resource


def list_response(resources: list[dict[str, Any]], *, total: int, start_index: int) -> dict[str, Any]:
    """A ``ListResponse`` page (RFC 7644 §3.4.2)."""
    return {"schemas": [LIST_SCHEMA], "totalResults": total, "startIndex": start_index,
            "itemsPerPage": len(resources), "Resources": resources}


def service_provider_config(base: str) -> dict[str, Any]:
    """What this server supports (RFC 7643 §5)."""
    return {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
        "documentationUri": f"{base}/ServiceProviderConfig",
        "patch": {"supported": True},
        "bulk": {"supported": False, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": True, "maxResults": MAX_COUNT},
        "changePassword": {"supported": False},
        "sort": {"supported": False},
        "etag": {"supported": False},
        "authenticationSchemes": [{
            "type": "oauthbearertoken", "name": "Bearer token",
            "description": "A workspace API key with the scim:provision scope: 'Authorization: Bearer aop_...'.",
            "primary": True,
        }],
        "meta": {"resourceType": "ServiceProviderConfig", "location": f"{base}/ServiceProviderConfig"},
    }


def resource_types(base: str) -> list[dict[str, Any]]:
    """The ``ResourceType`` documents of User and Group (RFC 7643 §6)."""
    return [
        {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"], "id": "User", "name": "User",
         "endpoint": "/Users", "description": "A member of this workspace", "schema": USER_SCHEMA,
         "meta": {"resourceType": "ResourceType", "location": f"{base}/ResourceTypes/User"}},
        {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"], "id": "Group", "name": "Group",
         "endpoint": "/Groups", "description": "A role of this workspace; its members hold that role",
         "schema": GROUP_SCHEMA,
         "meta": {"resourceType": "ResourceType", "location": f"{base}/ResourceTypes/Group"}},
    ]


def _attribute(name: str, *, type_: str = "string", multi: bool = False, required: bool = False,
               mutability: str = "readWrite", uniqueness: str = "none", case_exact: bool = False,
               sub: list[dict[str, Any]] | None = None, description: str = "") -> dict[str, Any]:
    attribute: dict[str, Any] = {
        "name": name, "type": type_, "multiValued": multi, "description": description, "required": required,
        "caseExact": case_exact, "mutability": mutability, "returned": "default", "uniqueness": uniqueness,
    }
    if sub is not None:
        attribute["subAttributes"] = sub
    return attribute


def schemas(base: str) -> list[dict[str, Any]]:
    """The ``Schema`` documents of the attributes this server keeps (RFC 7643 §7)."""
    user_attributes = [
        _attribute("userName", required=True, uniqueness="server", mutability="immutable",
                   description="The person's sign-in e-mail address; it cannot change through SCIM."),
        _attribute("externalId", case_exact=True, description="The identity provider's id of the person."),
        _attribute("displayName", description="Set when the account is created by SCIM."),
        _attribute("name", type_="complex", sub=[_attribute("formatted"), _attribute("givenName"),
                                                 _attribute("familyName")]),
        _attribute("emails", type_="complex", multi=True, mutability="immutable",
                   sub=[_attribute("value"), _attribute("type"), _attribute("primary", type_="boolean")]),
        _attribute("active", type_="boolean", description="false removes the member from this workspace."),
        _attribute("groups", type_="complex", multi=True, mutability="readOnly",
                   sub=[_attribute("value"), _attribute("display")],
                   description="The member's role, as a group."),
    ]
    group_attributes = [
        _attribute("displayName", required=True, mutability="immutable", uniqueness="server",
                   description=f"The role: one of {', '.join(Role.values)}."),
        _attribute("members", type_="complex", multi=True,
                   sub=[_attribute("value", mutability="immutable"), _attribute("display", mutability="readOnly")]),
    ]
    return [
        {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"], "id": USER_SCHEMA, "name": "User",
         "description": "A member of this workspace", "attributes": user_attributes,
         "meta": {"resourceType": "Schema", "location": f"{base}/Schemas/{USER_SCHEMA}"}},
        {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"], "id": GROUP_SCHEMA, "name": "Group",
         "description": "A role of this workspace", "attributes": group_attributes,
         "meta": {"resourceType": "Schema", "location": f"{base}/Schemas/{GROUP_SCHEMA}"}},
    ]
