"""REST endpoints for a tenant's tools (``/api/v1/tools``).

``tools:read`` lists and reads (the builtins are listed with ``"kind": "builtin"``);
``tools:write`` creates, changes, deletes and test-runs HTTP tools. Builtins cannot be changed
or deleted (409 ``builtin_tool``); a tool listed by the active version of an agent that is not
retired cannot be deleted (409 ``tool_in_use``). Secret headers are write-only: answers carry
only ``secret_header_names``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema, Status
from pydantic import ConfigDict

from agents import tool_selectors as selectors
from agents import tool_services as services
from agents.models import Tool
from config.api import keyset_page, principal_of

router = Router(tags=["tools"])


class ToolIn(Schema):
    """A new HTTP tool. ``url`` may hold ``{param}`` placeholders (properties of ``parameters``)
    in its path and query; ``body_template`` (POST, PUT, PATCH) is JSON whose ``"{param}"``
    strings become the arguments' values."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=200, description="1-64 letters, digits, underscores or hyphens; unique")
    description: str = Field("", description="What the tool does, as the model reads it")
    kind: str = Field("http", description="Only http (the builtins exist already)")
    parameters: dict[str, Any] | None = Field(
        None, description='A JSON Schema (Draft 2020-12) with "type": "object" at the top; default: no arguments'
    )
    side_effect: str = Field("read", description="read or write")
    requires_approval: bool | None = Field(None, description="Default: true for write tools, false for read")
    timeout_seconds: float = Field(10.0, description="0.5-120 seconds")
    max_response_bytes: int = Field(65536, description="1 to the platform's response cap")
    method: str = Field("GET", description="GET, POST, PUT, PATCH or DELETE")
    url: str = Field(max_length=4000, description="http(s) URL template")
    headers: dict[str, str] = Field(default_factory=dict, description="Plain headers (returned as given)")
    secret_headers: dict[str, str] = Field(
        default_factory=dict, description="Write-only headers, stored encrypted, never returned"
    )
    body_template: Any = Field(None, description="JSON body template (POST, PUT, PATCH only)")


class ToolPatch(Schema):
    """Fields to change; those left out keep their value. ``secret_headers`` replaces the whole
    set when given (``{}`` clears it)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    side_effect: str | None = None
    requires_approval: bool | None = Field(
        None, description="null: the side effect's default; changing side_effect alone also resets it"
    )
    timeout_seconds: float | None = None
    max_response_bytes: int | None = None
    method: str | None = None
    url: str | None = Field(None, max_length=4000)
    headers: dict[str, str] | None = None
    secret_headers: dict[str, str] | None = None
    body_template: Any = None


class ToolOut(Schema):
    id: int
    name: str
    description: str
    kind: str
    parameters: dict[str, Any]
    side_effect: str
    requires_approval: bool
    timeout_seconds: float
    max_response_bytes: int
    method: str
    url: str
    headers: dict[str, str]
    secret_header_names: list[str] = Field(description="Names of the write-only headers (values never returned)")
    body_template: Any = None
    used_by: list[str] = Field(description="Slugs of the agents whose active version lists this tool")
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime


class ToolPage(Schema):
    items: list[ToolOut]
    next_cursor: str | None


class ToolFilters(Schema):
    limit: int = 50
    cursor: str | None = None


class ToolTestIn(Schema):
    arguments: dict[str, Any] = Field(
        default_factory=dict, description="The call's arguments, checked against the tool's parameters"
    )


class ToolTestOut(Schema):
    status: str = Field(description="ok or error")
    error_code: str
    output: str
    request: dict[str, Any] | None = Field(description="What was sent (secret header values redacted)")
    response: dict[str, Any] | None = Field(description="What came back (status, headers, body excerpt)")
    duration_ms: int


def tool_out(tool: Tool, *, used_by: dict[str, list[Any]]) -> dict[str, Any]:
    """A tool as ``ToolOut``; ``used_by`` is ``tool_services.tool_active_users()``."""
    return {
        "id": tool.pk,
        "name": tool.name,
        "description": tool.description,
        "kind": tool.kind,
        "parameters": tool.parameters or {},
        "side_effect": tool.side_effect,
        "requires_approval": tool.requires_approval,
        "timeout_seconds": tool.timeout_seconds,
        "max_response_bytes": tool.max_response_bytes,
        "method": tool.method,
        "url": tool.url,
        "headers": tool.headers or {},
        "secret_header_names": services.tool_secret_header_names(tool),
        "body_template": tool.body_template,
        "used_by": [agent.slug for agent in used_by.get(tool.name, [])],
        "created_by": tool.created_by,
        "created_at": tool.created_at,
        "updated_at": tool.updated_at,
    }


def _one(tool: Tool) -> dict[str, Any]:
    return tool_out(tool, used_by=services.tool_active_users([tool.name]))


@router.get("/tools", response=ToolPage, summary="Tools, oldest first (builtins included)")
def tool_list(request: HttpRequest, filters: Query[ToolFilters]) -> dict[str, Any]:
    tools = selectors.tool_list(principal=principal_of(request))
    rows, cursor = keyset_page(tools, cursor=filters.cursor, limit=filters.limit, descending=False)
    used_by = services.tool_active_users([t.name for t in rows]) if rows else {}
    return {"items": [tool_out(t, used_by=used_by) for t in rows], "next_cursor": cursor}


@router.post("/tools", response={201: ToolOut}, summary="Create an HTTP tool")
def tool_create(request: HttpRequest, payload: ToolIn) -> Status[dict[str, Any]]:
    principal = principal_of(request)
    # The answer is the tool read back, which needs tools:read: refuse before anything is written.
    principal.require("tools:read")
    tool = services.tool_create(principal=principal, **payload.dict())
    return Status(201, _one(tool))


@router.get("/tools/{tool_id}", response=ToolOut, summary="One tool")
def tool_get(request: HttpRequest, tool_id: int) -> dict[str, Any]:
    return _one(selectors.tool_get(principal=principal_of(request), tool_id=tool_id))


@router.patch("/tools/{tool_id}", response=ToolOut, summary="Change an HTTP tool (fields left out are kept)")
def tool_update(request: HttpRequest, tool_id: int, payload: ToolPatch) -> dict[str, Any]:
    principal = principal_of(request)
    tool = selectors.tool_get(principal=principal, tool_id=tool_id)
    return _one(services.tool_update(principal=principal, tool=tool, **payload.dict(exclude_unset=True)))


@router.delete("/tools/{tool_id}", response={204: None}, summary="Delete an HTTP tool no active agent uses")
def tool_delete(request: HttpRequest, tool_id: int) -> Status[None]:
    principal = principal_of(request)
    services.tool_delete(principal=principal, tool=selectors.tool_get(principal=principal, tool_id=tool_id))
    return Status(204, None)


@router.post("/tools/{tool_id}/test", response=ToolTestOut, summary="Run a tool once with sample arguments")
def tool_test(request: HttpRequest, tool_id: int, payload: ToolTestIn) -> dict[str, Any]:
    """The outcome of one call (200 also when the tool itself failed: ``status`` error with its
    ``error_code``); 422 for arguments the tool's schema refuses."""
    principal = principal_of(request)
    principal.require("tools:write")
    tool = selectors.tool_get(principal=principal, tool_id=tool_id)
    outcome = services.tool_test_run(principal=principal, tool=tool, arguments=payload.arguments)
    return {
        "status": outcome.status,
        "error_code": outcome.error_code,
        "output": outcome.output,
        "request": outcome.request,
        "response": outcome.response,
        "duration_ms": outcome.duration_ms,
    }
