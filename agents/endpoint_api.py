"""REST endpoints for a tenant's own model endpoints (``/api/v1/model-endpoints``).

``agents:read`` lists and reads (the tenant's own endpoints and the platform's, marked
``"scope": "platform"``); ``agents:write`` creates, changes and deletes the tenant's own. The
API key is write-only: answers carry only ``has_api_key``.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any, Literal

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema, Status

from agents import endpoints as services
from config.api import keyset_page, principal_of
from tenants.models import ModelEndpoint

router = Router(tags=["model endpoints"])


class ModelEndpointIn(Schema):
    name: str = Field(max_length=100)
    model: str = Field(max_length=200, description="litellm model string, e.g. openai/gpt-4o-mini")
    api_base: str = Field("", description="OpenAI-compatible base URL (http or https); empty for the provider's")
    api_key: str = Field("", description="Write-only: stored encrypted and never returned")
    tier: str = "standard"
    priority: int = 100
    context_window: int = 8192
    input_price_per_mtok: Decimal = Decimal(0)
    output_price_per_mtok: Decimal = Decimal(0)
    currency: str = "USD"
    timeout_seconds: float = 60.0
    enabled: bool = True


class ModelEndpointPatch(Schema):
    name: str | None = Field(None, max_length=100)
    model: str | None = Field(None, max_length=200)
    api_base: str | None = None
    api_key: str | None = Field(None, description="Write-only: a non-empty value replaces the stored key")
    clear_api_key: bool = Field(False, description="Remove the stored key")
    tier: str | None = None
    priority: int | None = None
    context_window: int | None = None
    input_price_per_mtok: Decimal | None = None
    output_price_per_mtok: Decimal | None = None
    currency: str | None = None
    timeout_seconds: float | None = None
    enabled: bool | None = None


class ModelEndpointOut(Schema):
    id: int
    scope: Literal["tenant", "platform"]
    name: str
    model: str
    api_base: str | None = Field(description="Null for platform endpoints")
    has_api_key: bool
    tier: str
    priority: int
    context_window: int
    input_price_per_mtok: Decimal = Field(description="Per million input tokens, in currency")
    output_price_per_mtok: Decimal = Field(description="Per million output tokens, in currency")
    currency: str
    timeout_seconds: float
    enabled: bool
    created_at: dt.datetime
    updated_at: dt.datetime


class ModelEndpointPage(Schema):
    items: list[ModelEndpointOut]
    next_cursor: str | None


class ModelEndpointFilters(Schema):
    limit: int = 50
    cursor: str | None = None
    include_platform: bool = True


def model_endpoint_out(e: ModelEndpoint) -> dict[str, Any]:
    """The answer shape of one endpoint; never the key. A platform endpoint's base URL is the
    platform's infrastructure, so it is withheld."""
    platform = e.tenant_id is None
    return {"id": e.pk, "scope": "platform" if platform else "tenant", "name": e.name, "model": e.model,
            "api_base": None if platform else e.api_base, "has_api_key": e.has_api_key, "tier": e.tier,
            "priority": e.priority, "context_window": e.context_window,
            "input_price_per_mtok": e.input_price_per_mtok, "output_price_per_mtok": e.output_price_per_mtok,
            "currency": e.currency, "timeout_seconds": e.timeout_seconds, "enabled": e.enabled,
            "created_at": e.created_at, "updated_at": e.updated_at}


@router.get("/model-endpoints", response=ModelEndpointPage, summary="Model endpoints (own and platform)")
def model_endpoint_list(request: HttpRequest, filters: Query[ModelEndpointFilters]) -> dict[str, Any]:
    """The tenant's own endpoints and, unless ``include_platform=false``, the platform's, by id."""
    endpoints = services.model_endpoint_list(principal=principal_of(request),
                                             include_platform=filters.include_platform)
    rows, cursor = keyset_page(endpoints, cursor=filters.cursor, limit=filters.limit, descending=False)
    return {"items": [model_endpoint_out(e) for e in rows], "next_cursor": cursor}


@router.post("/model-endpoints", response={201: ModelEndpointOut}, summary="Create an own model endpoint")
def model_endpoint_create(request: HttpRequest, payload: ModelEndpointIn) -> Status[dict[str, Any]]:
    endpoint = services.model_endpoint_create(principal=principal_of(request), **payload.dict())
    return Status(201, model_endpoint_out(endpoint))


@router.get("/model-endpoints/{endpoint_id}", response=ModelEndpointOut, summary="One model endpoint")
def model_endpoint_get(request: HttpRequest, endpoint_id: int) -> dict[str, Any]:
    return model_endpoint_out(services.model_endpoint_get(principal=principal_of(request), endpoint_id=endpoint_id,
                                                          include_platform=True))


@router.patch("/model-endpoints/{endpoint_id}", response=ModelEndpointOut, summary="Change an own model endpoint")
def model_endpoint_update(request: HttpRequest, endpoint_id: int, payload: ModelEndpointPatch) -> dict[str, Any]:
    principal = principal_of(request)
    principal.require("agents:write")
    endpoint = services.model_endpoint_get(principal=principal, endpoint_id=endpoint_id)
    endpoint = services.model_endpoint_update(principal=principal, endpoint=endpoint,
                                              **payload.dict(exclude_unset=True))
    return model_endpoint_out(endpoint)


@router.delete("/model-endpoints/{endpoint_id}", response={204: None}, summary="Delete an own model endpoint")
def model_endpoint_delete(request: HttpRequest, endpoint_id: int) -> Status[None]:
    principal = principal_of(request)
    principal.require("agents:write")
    services.model_endpoint_delete(principal=principal,
                                   endpoint=services.model_endpoint_get(principal=principal, endpoint_id=endpoint_id))
    return Status(204, None)
