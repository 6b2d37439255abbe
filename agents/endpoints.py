"""Services and selectors for a tenant's own model endpoints (``tenants.ModelEndpoint``).

A tenant manages only the endpoints whose ``tenant`` is its own (``agents:write``) and sees
those and the platform's (``agents:read``); the platform's are managed by staff on the admin
pages. ``ModelEndpoint`` is a shared model, so its rows live in the public schema and are reached
from a tenant's connection through the search path; every query here filters by tenant, so a
foreign tenant's endpoint is "not found", never "forbidden".

The API key is write-only: it is stored encrypted (``config.crypto``), never returned, and audit
events record only whether it was set or cleared (``"key": "set" | "cleared"``).

A tenant's ``api_base`` is a URL the tenant supplied: creating or changing it (or the model)
runs ``agents.runtime.llm.tenant_endpoint_check`` through the egress guard, and a refused one
is ``EgressDenied`` (HTTP 422, code ``egress_denied``, ``details`` naming the field). The
guard checks it again at every connection.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from compliance.services import audit_event_create
from config.crypto import secret_encrypt
from config.egress import EgressDenied
from config.errors import Conflict, NotFound, ValidationFailed
from tenants.models import ModelEndpoint
from tenants.principal import Principal

# The smallest context window accepted: below it no system prompt plus one turn fits.
MIN_CONTEXT_WINDOW = 256
# Fields a caller may set besides the key (the order is the form's and the audit payload's).
EDITABLE_FIELDS = ("name", "model", "api_base", "tier", "priority", "context_window", "input_price_per_mtok",
                   "output_price_per_mtok", "currency", "timeout_seconds", "enabled")
_MAX_PRICE = Decimal("999999.999999")  # max_digits=12, decimal_places=6


def model_endpoint_validate(fields: dict[str, Any]) -> dict[str, Any]:
    """Check and normalize the editable ``fields`` of an endpoint (any subset of ``EDITABLE_FIELDS``).

    Returns the normalized values. Raises ``ValidationFailed`` whose ``details`` maps each bad
    field to a message: ``api_base`` must be empty or an absolute http(s) URL, prices must be
    decimals >= 0 (per million tokens), ``context_window`` >= 256 tokens, ``timeout_seconds``
    > 0, ``tier`` one of ``ModelEndpoint.Tier``, ``currency`` three letters.
    """
    errors: dict[str, str] = {}
    clean: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in EDITABLE_FIELDS:
            errors[name] = "Unknown field."
            continue
        try:
            clean[name] = _clean_field(name, value)
        except ValueError as exc:
            errors[name] = str(exc)
    if errors:
        first = next(iter(errors.items()))
        raise ValidationFailed(f"{first[0]}: {first[1]}", code="invalid_model_endpoint", details=errors)
    return clean


def _clean_field(name: str, value: Any) -> Any:
    if name in ("name", "model"):
        text = str(value or "").strip()
        limit = 100 if name == "name" else 200
        if not text:
            raise ValueError("This field is required.")
        if len(text) > limit:
            raise ValueError(f"At most {limit} characters.")
        return text
    if name == "api_base":
        url = str(value or "").strip()
        if not url:
            return ""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("Must be an http:// or https:// URL.")
        if len(url) > 500:
            raise ValueError("At most 500 characters.")
        return url
    if name == "tier":
        if value not in ModelEndpoint.Tier.values:
            raise ValueError(f"Must be one of {', '.join(ModelEndpoint.Tier.values)}.")
        return str(value)
    if name in ("priority", "context_window"):
        number = _int(value)
        minimum = MIN_CONTEXT_WINDOW if name == "context_window" else 0
        if number < minimum:
            raise ValueError(f"Must be at least {minimum}.")
        if number > 2**31 - 1:
            raise ValueError("Too large.")
        return number
    if name in ("input_price_per_mtok", "output_price_per_mtok"):
        try:
            price = Decimal(str(value))
        except (InvalidOperation, ValueError) as exc:
            raise ValueError("Must be a decimal number.") from exc
        if not price.is_finite() or price < 0:
            raise ValueError("Must be a number >= 0.")
        if price > _MAX_PRICE or -price.as_tuple().exponent > 6:  # type: ignore[operator]
            raise ValueError("At most 999999.999999, with up to 6 decimal places.")
        return price
    if name == "currency":
        code = str(value or "").strip().upper()
        if len(code) != 3 or not code.isalpha():
            raise ValueError("Must be a three-letter ISO 4217 code.")
        return code
    if name == "timeout_seconds":
        try:
            seconds = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError("Must be a number of seconds.") from exc
        if not 0 < seconds <= 3600:
            raise ValueError("Must be more than 0 and at most 3600 seconds.")
        return seconds
    if name == "enabled":
        if not isinstance(value, bool):
            raise ValueError("Must be true or false.")
        return value
    raise ValueError("Unknown field.")


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("Must be a whole number.")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ValueError("Must be a whole number.") from exc


def audit_changes(fields: dict[str, Any], *, key_change: str | None) -> dict[str, Any]:
    """The audit payload of a change: the new value of each non-secret field as text, and
    ``key`` = ``"set"`` / ``"cleared"`` when the API key changed (never the key itself)."""
    payload: dict[str, Any] = {name: str(value) for name, value in fields.items() if name in EDITABLE_FIELDS}
    if key_change:
        payload["key"] = key_change
    return payload


def _egress_check(*, model: str, api_base: str) -> None:
    # Imported here: the runtime module pulls in the HTTP clients, which the pages do not need.
    from agents.runtime.llm import DIRECT_PREFIXES, tenant_endpoint_check

    try:
        tenant_endpoint_check(model=model, api_base=api_base)
    except EgressDenied as exc:
        field = "api_base" if api_base and model.startswith(DIRECT_PREFIXES) else "model"
        raise EgressDenied(exc.message, details={field: exc.message}) from exc


def _tenant_of(principal: Principal) -> Any:
    if principal.tenant is None or principal.tenant.is_public:
        raise NotFound("Model endpoints are managed inside a tenant.")
    return principal.tenant


def model_endpoint_list(*, principal: Principal, include_platform: bool = True) -> QuerySet[ModelEndpoint]:
    """The tenant's own endpoints and, with ``include_platform``, the platform's (``tenant``
    null), ordered by tier, priority and name. Raises ``Forbidden`` without ``agents:read``."""
    principal.require("agents:read")
    tenant = _tenant_of(principal)
    scope = Q(tenant=tenant) | Q(tenant__isnull=True) if include_platform else Q(tenant=tenant)
    return ModelEndpoint.objects.filter(scope).order_by("tier", "priority", "name", "pk")


def model_endpoint_get(*, principal: Principal, endpoint_id: int, include_platform: bool = False) -> ModelEndpoint:
    """One endpoint the tenant owns (or, with ``include_platform``, a platform one).

    Raises ``NotFound`` for other tenants' ids (without revealing that they exist) and
    ``Forbidden`` without ``agents:read``.
    """
    endpoint = model_endpoint_list(principal=principal, include_platform=include_platform).filter(
        pk=endpoint_id).first()
    if endpoint is None:
        raise NotFound("No such model endpoint.")
    return endpoint


def _own(principal: Principal, endpoint: ModelEndpoint) -> None:
    # The callers fetch through model_endpoint_get, but a service must not trust that.
    if endpoint.tenant_id is None or endpoint.tenant_id != _tenant_of(principal).pk:
        raise NotFound("No such model endpoint.")


def _save(endpoint: ModelEndpoint, tenant_id: int) -> None:
    if ModelEndpoint.objects.filter(tenant_id=tenant_id, name=endpoint.name).exclude(pk=endpoint.pk).exists():
        raise Conflict(f"A model endpoint named “{endpoint.name}” already exists.", code="duplicate_name")
    try:
        with transaction.atomic():
            endpoint.save()
    except IntegrityError as exc:  # a concurrent create with the same name
        raise Conflict(f"A model endpoint named “{endpoint.name}” already exists.", code="duplicate_name") from exc


@transaction.atomic
def model_endpoint_create(*, principal: Principal, name: str, model: str, api_key: str = "",
                          **fields: Any) -> ModelEndpoint:
    """Create an endpoint owned by the principal's tenant; ``fields`` are the other
    ``EDITABLE_FIELDS`` (model defaults otherwise). ``api_key`` is stored encrypted.

    Raises ``Forbidden`` without ``agents:write``, ``ValidationFailed`` for bad values,
    ``EgressDenied`` (a ``ValidationFailed``, code ``egress_denied``) for an address or model the
    egress guard refuses, and ``Conflict`` when the tenant already has an endpoint of that name.
    """
    principal.require("agents:write")
    tenant = _tenant_of(principal)
    clean = model_endpoint_validate({"name": name, "model": model, **fields})
    _egress_check(model=clean["model"], api_base=clean.get("api_base", ""))
    now = timezone.now()
    endpoint = ModelEndpoint(tenant=tenant, api_key_encrypted=secret_encrypt(api_key.strip()), created_at=now,
                             updated_at=now, **clean)
    _save(endpoint, tenant.pk)
    audit_event_create(actor=principal, action="model_endpoint.created", target_type="model_endpoint",
                       target_id=endpoint.pk, payload=audit_changes(clean, key_change="set" if api_key else None),
                       schema=tenant.schema_name)
    return endpoint


@transaction.atomic
def model_endpoint_update(*, principal: Principal, endpoint: ModelEndpoint, api_key: str | None = None,
                          clear_api_key: bool = False, **fields: Any) -> ModelEndpoint:
    """Change some of an own endpoint's ``EDITABLE_FIELDS``. A non-empty ``api_key`` replaces
    the stored key; ``clear_api_key`` removes it; otherwise the key is kept.

    Raises ``Forbidden`` without ``agents:write``, ``NotFound`` for an endpoint that is not the
    tenant's own, ``ValidationFailed`` (also for both a new key and ``clear_api_key``),
    ``EgressDenied`` when a changed ``api_base`` or ``model`` is refused by the egress guard, and
    ``Conflict`` for a duplicate name. A change that changes nothing records no audit event.
    """
    principal.require("agents:write")
    tenant = _tenant_of(principal)
    _own(principal, endpoint)
    new_key = (api_key or "").strip()
    if new_key and clear_api_key:
        raise ValidationFailed("Give a new API key or clear it, not both.", code="invalid_model_endpoint",
                               details={"api_key": "Give a new key or clear it, not both."})
    clean = model_endpoint_validate(fields)
    changed = {name: value for name, value in clean.items() if getattr(endpoint, name) != value}
    if "api_base" in changed or "model" in changed:
        _egress_check(model=changed.get("model", endpoint.model), api_base=changed.get("api_base", endpoint.api_base))
    key_change = None
    if new_key:
        key_change = "set"
        endpoint.api_key_encrypted = secret_encrypt(new_key)
    elif clear_api_key and endpoint.api_key_encrypted:
        key_change = "cleared"
        endpoint.api_key_encrypted = ""
    if not changed and key_change is None:
        return endpoint  # idempotent: nothing changed, so nothing to save or audit
    for name, value in changed.items():
        setattr(endpoint, name, value)
    endpoint.updated_at = timezone.now()
    _save(endpoint, tenant.pk)
    audit_event_create(actor=principal, action="model_endpoint.changed", target_type="model_endpoint",
                       target_id=endpoint.pk, payload=audit_changes(changed, key_change=key_change),
                       schema=tenant.schema_name)
    return endpoint


@transaction.atomic
def model_endpoint_delete(*, principal: Principal, endpoint: ModelEndpoint) -> None:
    """Delete an own endpoint. An agent version that pinned it has no model afterwards (its
    turns are refused with ``no_model``): disable an endpoint instead to keep it.

    Raises ``Forbidden`` without ``agents:write`` and ``NotFound`` for an endpoint that is not
    the tenant's own.
    """
    principal.require("agents:write")
    tenant = _tenant_of(principal)
    _own(principal, endpoint)
    pk, name = endpoint.pk, endpoint.name
    endpoint.delete()
    audit_event_create(actor=principal, action="model_endpoint.deleted", target_type="model_endpoint",
                       target_id=pk, payload={"name": name}, schema=tenant.schema_name)
