"""The SCIM 2.0 endpoints (RFC 7644) under ``/scim/v2/`` on a tenant's host.

Authentication: ``Authorization: Bearer <API key>``, a key of this tenant holding the
``scim:provision`` scope (only owners and admins can grant it, and a key never holds more than
its person's role allows today). The key counts against the plan's ``api_requests_per_minute``
like any API call. Views are CSRF-exempt (no cookies are read) and bypass the console's login
gate (``login_not_required``); suspension still applies (``tenants.middleware``).

Every answer is ``application/scim+json``; every error is an RFC 7644 §3.12 error resource.
The views parse and shape; ``tenants.scim.services`` and ``tenants.scim.selectors`` do the work.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any

import structlog
from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from config.errors import DomainError, NotAuthenticated, TooManyRequests
from config.text import require_storable
from tenants.models import Membership, Tenant
from tenants.principal import Principal
from tenants.roles import Role
from tenants.scim import selectors
from tenants.scim.errors import ScimError, bad_request, not_found
from tenants.scim.filters import GROUP_SCHEMA, USER_SCHEMA, filter_parse
from tenants.scim.resources import (
    CONTENT_TYPE,
    DEFAULT_COUNT,
    LIST_SCHEMA,
    MAX_COUNT,
    MAX_OPERATIONS,
    base_url,
    group_resource,
    list_response,
    resource_types,
    schemas,
    service_provider_config,
    user_resource,
)
from tenants.scim.services import (
    UserChanges,
    scim_group_members_change,
    scim_user_create,
    scim_user_deprovision,
    scim_user_update,
)
from tenants.services.keys import api_key_authenticate

logger = structlog.get_logger(__name__)

SCOPE = "scim:provision"
_JSON_MEDIA_TYPE_RE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
_UNSET: Any = object()

Handler = Callable[..., HttpResponse]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> HttpResponse:
    response = HttpResponse(json.dumps(body), status=status, content_type=CONTENT_TYPE)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def _error(exc: ScimError) -> HttpResponse:
    return _json(exc.body(), status=exc.status, headers=exc.headers)


def _domain_error(exc: DomainError) -> ScimError:
    """The SCIM error of a service's domain error (``config.errors``)."""
    if isinstance(exc, TooManyRequests):
        headers = dict(exc.headers)
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return ScimError(429, exc.message, headers=headers)
    if exc.status == 422:
        return ScimError(400, exc.message, scim_type="invalidValue")
    return ScimError(exc.status, exc.message, scim_type="uniqueness" if exc.code == "already_member" else None)


def _authenticate(request: HttpRequest) -> Principal:
    """The SCIM principal of the request's bearer key (see module docstring). It holds
    ``members:read``/``members:write`` for the member services: ``scim:provision`` is granted
    only with roles that hold both, and ``Principal.for_api_key`` keeps it only while the
    key's person still has such a role."""
    header = request.headers.get("Authorization", "").strip()
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ScimError(401, "Authentication required: send 'Authorization: Bearer <API key with the "
                        f"{SCOPE} scope>'.", headers={"WWW-Authenticate": 'Bearer realm="scim"'})
    tenant: Tenant = request.tenant  # type: ignore[attr-defined]
    try:
        key = api_key_authenticate(raw_key=token.strip(), tenant=tenant)
    except NotAuthenticated as exc:
        raise ScimError(401, exc.message, headers={"WWW-Authenticate": 'Bearer realm="scim", error="invalid_token"'}) \
            from exc
    principal = Principal.for_api_key(key)
    structlog.contextvars.bind_contextvars(api_key=key.key_id)
    if not principal.can(SCOPE):
        raise ScimError(403, f"This API key lacks the '{SCOPE}' scope (an owner or admin creates SCIM keys).")
    from config.api import api_request_counted  # the API's module; imported late, it builds the whole API

    api_request_counted(request, principal)
    return dataclasses.replace(principal, permissions=principal.permissions | {"members:read", "members:write"})


def scim_endpoint(methods: set[str]) -> Callable[[Handler], Handler]:
    """Wrap a view ``view(request, principal, ...)``: answer only ``methods`` (else 405),
    authenticate (``_authenticate``), and turn ``ScimError`` and domain errors into SCIM error
    resources."""

    def decorate(view: Handler) -> Handler:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                if request.method not in methods:
                    raise ScimError(405, f"{request.method} is not allowed here; use {', '.join(sorted(methods))}.",
                                    headers={"Allow": ", ".join(sorted(methods))})
                principal = _authenticate(request)
                return view(request, principal, *args, **kwargs)
            except ScimError as exc:
                return _error(exc)
            except DomainError as exc:
                return _error(_domain_error(exc))

        return csrf_exempt(login_not_required(wrapped))

    return decorate


def _body(request: HttpRequest) -> dict[str, Any]:
    media_type = (request.content_type or "").lower()
    if not _JSON_MEDIA_TYPE_RE.match(media_type):
        raise ScimError(415, f"Send a JSON body with 'Content-Type: {CONTENT_TYPE}', not '{media_type or 'none'}'.")
    try:
        data = json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"The body is not JSON: {exc}", "invalidSyntax") from exc
    if not isinstance(data, dict):
        raise bad_request("The body must be a JSON object.", "invalidSyntax")
    require_storable(data, field="body")
    return data


def _require_schema(data: dict[str, Any], schema: str) -> None:
    listed = data.get("schemas")
    if not isinstance(listed, list) or schema not in listed:
        raise bad_request(f"The body's 'schemas' must list '{schema}'.", "invalidSyntax")


def _page(request: HttpRequest) -> tuple[int, int]:
    """``startIndex`` (1-based; below 1 reads as 1) and ``count`` (0..``MAX_COUNT``; negative
    reads as 0), as RFC 7644 §3.4.2.4 says."""
    try:
        start = int(request.GET.get("startIndex", "1"))
        count = int(request.GET.get("count", str(DEFAULT_COUNT)))
    except ValueError as exc:
        raise bad_request("startIndex and count are integers.") from exc
    return max(start, 1), min(max(count, 0), MAX_COUNT)


def _members_excluded(request: HttpRequest) -> bool:
    excluded = {a.strip().lower() for a in request.GET.get("excludedAttributes", "").split(",")}
    attributes = {a.strip().lower() for a in request.GET.get("attributes", "").split(",") if a.strip()}
    return "members" in excluded or bool(attributes and "members" not in attributes)


def _membership(tenant: Tenant, resource_id: str) -> Membership:
    try:
        scim_id = uuid.UUID(resource_id)
    except ValueError:
        raise not_found("User", resource_id) from None
    membership = selectors.scim_user_get(tenant=tenant, scim_id=scim_id)
    if membership is None:
        raise not_found("User", resource_id)
    return membership


# ---- Users ------------------------------------------------------------------------------------

def _bool(value: Any, name: str) -> bool:
    # Entra ID sends booleans as strings ("False") in PATCH operations.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "false"}:
        return value.lower() == "true"
    raise bad_request(f"'{name}' is a boolean.")


def _display_name(data: dict[str, Any]) -> Any:
    name = data.get("name")
    if isinstance(data.get("displayName"), str) and data["displayName"].strip():
        return data["displayName"]
    if isinstance(name, dict):
        if isinstance(name.get("formatted"), str) and name["formatted"].strip():
            return name["formatted"]
        parts = [name.get("givenName"), name.get("familyName")]
        joined = " ".join(p for p in parts if isinstance(p, str) and p.strip())
        if joined:
            return joined
    return _UNSET


def _email_of(data: dict[str, Any]) -> Any:
    user_name = data.get("userName")
    if user_name is not None:
        return user_name
    emails = data.get("emails")
    if isinstance(emails, list):
        for email in emails:
            if isinstance(email, dict) and email.get("primary") and isinstance(email.get("value"), str):
                return email["value"]
    return None


@scim_endpoint({"GET", "POST"})
def users(request: HttpRequest, principal: Principal) -> HttpResponse:
    """``GET /Users`` (``filter``, ``startIndex``, ``count``) and ``POST /Users``."""
    tenant: Tenant = request.tenant  # type: ignore[attr-defined]
    base = base_url(request)
    if request.method == "POST":
        data = _body(request)
        _require_schema(data, USER_SCHEMA)
        if "active" in data and not _bool(data["active"], "active"):
            raise bad_request("A user is created active: create them when they should have access.")
        display = _display_name(data)
        membership = scim_user_create(principal=principal, tenant=tenant, user_name=_email_of(data),
                                      external_id=data.get("externalId"),
                                      display_name="" if display is _UNSET else display)
        resource = user_resource(membership, base=base)
        return _json(resource, status=201, headers={"Location": resource["meta"]["location"]})
    start, count = _page(request)
    text = request.GET.get("filter")
    node = filter_parse(text, schema=USER_SCHEMA) if text else None
    page = selectors.scim_user_list(tenant=tenant, node=node, start_index=start, count=count)
    return _json(list_response([user_resource(m, base=base) for m in page.rows], total=page.total,
                               start_index=start))


def _user_patch_changes(operations: list[dict[str, Any]]) -> UserChanges:
    """Fold PATCH operations on a user into one ``UserChanges`` (later operations win)."""
    fields: dict[str, Any] = {}

    def assign(path: str, value: Any) -> None:
        path = path.strip()
        lower = path.lower()
        if lower.startswith(USER_SCHEMA.lower() + ":"):
            lower = lower[len(USER_SCHEMA) + 1:]
        if lower == "active":
            fields["active"] = _bool(value, "active")
        elif lower == "externalid":
            fields["external_id"] = value
        elif lower == "username":
            fields["user_name"] = value
        elif lower in {"displayname", "name.formatted"}:
            fields["display_name"] = value
        elif lower == "name" and isinstance(value, dict):
            display = _display_name({"name": value})
            if display is not _UNSET:
                fields["display_name"] = display
        elif lower.startswith("emails"):
            email = value if isinstance(value, str) else _email_of({"emails": value if isinstance(value, list) else []})
            if email is not None:
                fields["user_name"] = email
        # Attributes this portal does not keep (title, phoneNumbers, the enterprise extension...)
        # are accepted and not stored, as IdPs send every mapped attribute.

    for operation in operations:
        op = str(operation.get("op", "")).lower()
        path = operation.get("path")
        value = operation.get("value")
        if op not in {"add", "replace", "remove"}:
            raise bad_request(f"Unknown PATCH op '{operation.get('op')}': use add, replace or remove.",
                              "invalidSyntax")
        if path is not None and not isinstance(path, str):
            raise bad_request("A PATCH operation's path is a string.", "invalidPath")
        if op == "remove":
            if not path:
                raise bad_request("A remove operation needs a path.", "noTarget")
            if path.strip().lower() == "externalid":
                fields["external_id"] = None
            continue
        if path:
            assign(path, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                assign(key, item)
        else:
            raise bad_request("An add or replace operation without a path takes an object of attributes.")
    return UserChanges(**fields)


def _operations(data: dict[str, Any]) -> list[dict[str, Any]]:
    _require_schema(data, "urn:ietf:params:scim:api:messages:2.0:PatchOp")
    operations = data.get("Operations")
    if not isinstance(operations, list) or not operations:
        raise bad_request("A PATCH body has a non-empty 'Operations' list.", "invalidSyntax")
    if len(operations) > MAX_OPERATIONS:
        raise bad_request(f"At most {MAX_OPERATIONS} operations per PATCH.", "tooMany")
    if not all(isinstance(o, dict) for o in operations):
        raise bad_request("Each PATCH operation is an object with 'op', 'path' and 'value'.", "invalidSyntax")
    return operations


@scim_endpoint({"GET", "PUT", "PATCH", "DELETE"})
def user_detail(request: HttpRequest, principal: Principal, resource_id: str) -> HttpResponse:
    """``GET``, ``PUT``, ``PATCH`` and ``DELETE /Users/<id>``."""
    tenant: Tenant = request.tenant  # type: ignore[attr-defined]
    membership = _membership(tenant, resource_id)
    base = base_url(request)
    if request.method == "GET":
        return _json(user_resource(membership, base=base))
    if request.method == "DELETE":
        scim_user_deprovision(principal=principal, membership=membership, reason="deleted")
        return HttpResponse(status=204)
    data = _body(request)
    if request.method == "PUT":
        _require_schema(data, USER_SCHEMA)
        changes = UserChanges(user_name=_email_of(data), external_id=data.get("externalId"),
                              display_name=_display_name(data),
                              active=_bool(data.get("active", True), "active"))
    else:
        changes = _user_patch_changes(_operations(data))
    updated = scim_user_update(principal=principal, membership=membership, changes=changes)
    if updated is None:
        # Deactivated: the membership is gone; answer with what the IdP set (RFC 7644 §3.5.1).
        return _json({**user_resource(membership, base=base), "active": False})
    updated = selectors.scim_user_get(tenant=tenant, scim_id=updated.scim_id) or updated
    return _json(user_resource(updated, base=base))


# ---- Groups -----------------------------------------------------------------------------------

def _role(resource_id: str) -> str:
    role = resource_id.lower()
    if role not in Role.values:
        raise not_found("Group", resource_id)
    return role


@scim_endpoint({"GET", "POST"})
def groups(request: HttpRequest, principal: Principal) -> HttpResponse:
    """``GET /Groups`` (``filter``, ``startIndex``, ``count``, ``excludedAttributes``). Groups are
    the roles and cannot be created: ``POST`` answers 409 for a role's name, else 400."""
    tenant: Tenant = request.tenant  # type: ignore[attr-defined]
    if request.method == "POST":
        data = _body(request)
        name = str(data.get("displayName", ""))
        if name.lower() in Role.values:
            raise ScimError(409, f"The group '{name.lower()}' exists (id '{name.lower()}'): groups are this "
                            "workspace's roles; link to it.", scim_type="uniqueness")
        raise bad_request(f"Groups are this workspace's roles ({', '.join(Role.values)}); '{name}' is not one. "
                          "Push a group with one of these names.")
    start, count = _page(request)
    text = request.GET.get("filter")
    node = filter_parse(text, schema=GROUP_SCHEMA) if text else None
    matched = selectors.scim_group_list(tenant=tenant, node=node)
    page = matched[start - 1:start - 1 + count]
    members = None if _members_excluded(request) else selectors.scim_group_members(tenant=tenant, roles=page)
    base = base_url(request)
    resources = [group_resource(role, base=base, members=None if members is None else members[role])
                 for role in page]
    return _json(list_response(resources, total=len(matched), start_index=start))


def _members_of(tenant: Tenant, value: Any) -> list[Membership]:
    """The memberships a PATCH/PUT ``members`` value names (``[{"value": "<user id>"}]``);
    400 ``invalidValue`` for an id that is no member of this tenant."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) and isinstance(v.get("value"), str)
                                              for v in value):
        raise bad_request("'members' is a list of objects with a 'value' (a user id).")
    wanted: dict[uuid.UUID, str] = {}
    for item in value:
        try:
            wanted[uuid.UUID(item["value"])] = item["value"]
        except ValueError:
            raise bad_request(f"No user {item['value']} in this workspace.") from None
    found = selectors.scim_users_by_id(tenant=tenant, scim_ids=list(wanted))
    missing = [raw for scim_id, raw in wanted.items() if scim_id not in found]
    if missing:
        raise bad_request(f"No user {', '.join(missing)} in this workspace.")
    return list(found.values())


_MEMBER_FILTER_RE = re.compile(r'^members\[\s*value\s+eq\s+"([^"]+)"\s*\]$', re.IGNORECASE)


def _group_changes(tenant: Tenant, role: str, operations: list[dict[str, Any]],
                   current: list[Membership]) -> tuple[list[Membership], list[Membership]]:
    """Memberships to add to and remove from ``role``'s group for these PATCH operations."""
    add: dict[int, Membership] = {}
    remove: dict[int, Membership] = {}

    def check_name(value: Any) -> None:
        if value is not None and str(value).lower() != role:
            raise bad_request(f"Groups are roles: the group '{role}' cannot be renamed.", "mutability")

    def replace_members(value: Any) -> None:
        wanted = {m.pk: m for m in _members_of(tenant, value)}
        add.clear()
        add.update(wanted)
        remove.clear()
        remove.update({m.pk: m for m in current if m.pk not in wanted})

    for operation in operations:
        op = str(operation.get("op", "")).lower()
        path = operation.get("path")
        value = operation.get("value")
        if op not in {"add", "replace", "remove"}:
            raise bad_request(f"Unknown PATCH op '{operation.get('op')}': use add, replace or remove.",
                              "invalidSyntax")
        if path is not None and not isinstance(path, str):
            raise bad_request("A PATCH operation's path is a string.", "invalidPath")
        lower = (path or "").strip().lower()
        if op == "remove":
            match = _MEMBER_FILTER_RE.match((path or "").strip())
            if match:
                targets = _members_of(tenant, [{"value": match[1]}])
            elif lower == "members":
                targets = _members_of(tenant, value) if value is not None else list(current)
            elif not lower:
                raise bad_request("A remove operation needs a path.", "noTarget")
            else:
                raise bad_request(f"Cannot remove '{path}' from a group; only members.", "invalidPath")
            for m in targets:
                add.pop(m.pk, None)
                remove[m.pk] = m
        elif lower == "members":
            if op == "replace":
                replace_members(value)
            else:
                for m in _members_of(tenant, value):
                    remove.pop(m.pk, None)
                    add[m.pk] = m
        elif lower == "displayname":
            check_name(value)
        elif lower == "externalid":
            continue  # roles have no external id to keep; accepted so that IdPs that send it go on
        elif not lower and isinstance(value, dict):
            check_name(value.get("displayName"))
            if "members" in value:
                if op == "replace":
                    replace_members(value["members"])
                else:
                    for m in _members_of(tenant, value["members"]):
                        remove.pop(m.pk, None)
                        add[m.pk] = m
        else:
            raise bad_request(f"Cannot {op} '{path}' on a group; use members or displayName.", "invalidPath")
    return list(add.values()), list(remove.values())


@scim_endpoint({"GET", "PUT", "PATCH", "DELETE"})
def group_detail(request: HttpRequest, principal: Principal, resource_id: str) -> HttpResponse:
    """``GET``, ``PUT`` and ``PATCH /Groups/<role>``; ``DELETE`` is refused (roles stay)."""
    tenant: Tenant = request.tenant  # type: ignore[attr-defined]
    role = _role(resource_id)
    base = base_url(request)
    if request.method == "DELETE":
        raise bad_request(f"The group '{role}' is a role of this workspace and cannot be deleted.", "mutability")
    if request.method in {"PUT", "PATCH"}:
        data = _body(request)
        current = selectors.scim_group_members(tenant=tenant, roles=[role])[role]
        if request.method == "PUT":
            _require_schema(data, GROUP_SCHEMA)
            if str(data.get("displayName", role)).lower() != role:
                raise bad_request(f"Groups are roles: the group '{role}' cannot be renamed.", "mutability")
            wanted = {m.pk: m for m in _members_of(tenant, data.get("members", []))}
            add, remove = list(wanted.values()), [m for m in current if m.pk not in wanted]
        else:
            add, remove = _group_changes(tenant, role, _operations(data), current)
        scim_group_members_change(principal=principal, tenant=tenant, role=role, add=add, remove=remove)
        if request.method == "PATCH" and not request.GET:
            return HttpResponse(status=204)  # RFC 7644 §3.5.2: 204 when the body is not asked for
    members = None if _members_excluded(request) else selectors.scim_group_members(tenant=tenant, roles=[role])[role]
    return _json(group_resource(role, base=base, members=members))


# ---- Discovery --------------------------------------------------------------------------------

@scim_endpoint({"GET"})
def service_provider_config_view(request: HttpRequest, principal: Principal) -> HttpResponse:
    """``GET /ServiceProviderConfig``."""
    return _json(service_provider_config(base_url(request)))


def _listing(resources: list[dict[str, Any]], resource_id: str | None, kind: str) -> HttpResponse:
    if resource_id is None:
        return _json({"schemas": [LIST_SCHEMA], "totalResults": len(resources), "startIndex": 1,
                      "itemsPerPage": len(resources), "Resources": resources})
    for resource in resources:
        if resource["id"] == resource_id:
            return _json(resource)
    raise not_found(kind, resource_id)


@scim_endpoint({"GET"})
def resource_types_view(request: HttpRequest, principal: Principal, resource_id: str | None = None) -> HttpResponse:
    """``GET /ResourceTypes`` and ``/ResourceTypes/<User|Group>``."""
    return _listing(resource_types(base_url(request)), resource_id, "ResourceType")


@scim_endpoint({"GET"})
def schemas_view(request: HttpRequest, principal: Principal, resource_id: str | None = None) -> HttpResponse:
    """``GET /Schemas`` and ``/Schemas/<urn>``."""
    return _listing(schemas(base_url(request)), resource_id, "Schema")


@csrf_exempt
@login_not_required
def scim_not_found(request: HttpRequest, rest: str = "") -> HttpResponse:
    """Any other path under ``/scim/v2/``: a SCIM 404, not the console's HTML page."""
    return _error(ScimError(404, f"No SCIM endpoint at {request.path}."))
