"""Writes on a tenant's tools: create, change (PATCH semantics), delete, and run one once to test it.

Only HTTP tools are created here; the builtins (``kb_search``, ``current_time``, ``calculator``)
are rows made by a migration whose names are reserved, and they cannot be created, changed or
deleted (409 ``builtin_tool``).

Every bad field is ``ValidationFailed`` (422, code ``invalid_tool``, ``details.field`` naming it);
a URL the egress guard refuses is ``EgressDenied`` (422, code ``egress_denied``,
``details.field = "url"``). Secret headers are write-only: stored encrypted as one JSON object
with ``config.crypto.secret_encrypt``; answers and audit events carry only their names.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any
from urllib.parse import urlsplit

import jsonschema
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from agents.models import Agent, AgentVersion, Tool
from agents.runtime.tools import BUILTIN_NAMES, ToolCallInvalid, ToolContext, ToolOutcome
from compliance.services import audit_event_create
from config.crypto import SecretUnreadable, secret_encrypt
from config.egress import EgressDenied, egress_check_url
from config.errors import Conflict, ValidationFailed
from config.text import require_storable
from tenants.principal import Principal

NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Bounds of the stored JSON documents, in characters of their compact JSON text.
PARAMETERS_MAX_CHARS = 20_000
BODY_TEMPLATE_MAX_CHARS = 20_000
DESCRIPTION_MAX_CHARS = 2_000
MAX_HEADERS = 32
HEADER_VALUE_MAX_CHARS = 4_000
TIMEOUT_RANGE = (0.5, 120.0)  # seconds
# RFC 9110 token characters (a field name).
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")
# Headers a tool may not set: hop-by-hop (RFC 9110 section 7.6.1) and those the client owns.
FORBIDDEN_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "host",
        "content-length",
    }
)
# A ``{name}`` placeholder of the URL template; the name is a property of ``parameters``.
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z0-9_-]{1,64})\}")
# What a placeholder becomes when the template is checked by the egress guard.
PLACEHOLDER_SAMPLE = "sample"
# The fields a caller may give (``secret_headers`` is write-only; the rest are stored as given).
FIELDS = (
    "name",
    "description",
    "parameters",
    "side_effect",
    "requires_approval",
    "timeout_seconds",
    "max_response_bytes",
    "method",
    "url",
    "headers",
    "body_template",
)
DEFAULT_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def _invalid(field: str, message: str, **details: Any) -> ValidationFailed:
    return ValidationFailed(f"{field}: {message}", code="invalid_tool", details={"field": field, **details})


def _json_chars(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


# --- Field checks -----------------------------------------------------------------------------


def _clean_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _invalid("name", "1-64 letters, digits, underscores or hyphens.")
    if value in BUILTIN_NAMES:
        raise _invalid("name", f"“{value}” is the name of a builtin tool.")
    return value


def _clean_parameters(value: Any) -> dict[str, Any]:
    if value is None:
        return dict(DEFAULT_PARAMETERS)
    if not isinstance(value, dict):
        raise _invalid("parameters", "must be a JSON object (a JSON Schema).")
    if _json_chars(value) > PARAMETERS_MAX_CHARS:
        raise _invalid("parameters", f"at most {PARAMETERS_MAX_CHARS:,} characters of JSON.")
    try:
        jsonschema.Draft202012Validator.check_schema(value)
    except jsonschema.SchemaError as exc:
        raise _invalid("parameters", f"not a valid JSON Schema (Draft 2020-12): {exc.message}") from None
    if value.get("type") != "object":
        raise _invalid("parameters", 'the schema must describe an object ("type": "object" at the top).')
    return value


def _clean_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(field, "must be true or false.")
    return value


def _clean_number(field: str, value: Any, cast: type, low: float, high: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _invalid(field, "must be a number.")
    try:
        number = cast(value)
    except (TypeError, ValueError, OverflowError):
        raise _invalid(field, "must be a number.") from None
    if cast is float and number != number:  # NaN
        raise _invalid(field, "must be a number.")
    if not low <= number <= high:
        raise _invalid(field, f"must be between {low:g} and {high:g}.")
    return number


def _clean_headers(field: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(field, "must be a JSON object of header name to text value.")
    if len(value) > MAX_HEADERS:
        raise _invalid(field, f"at most {MAX_HEADERS} headers.")
    clean: dict[str, str] = {}
    seen: set[str] = set()
    for name, header_value in value.items():
        if not isinstance(name, str) or not _HEADER_NAME_RE.match(name):
            raise _invalid(field, f"“{name}” is not a valid header name.")
        if name.lower() in FORBIDDEN_HEADERS:
            raise _invalid(field, f"the header “{name}” cannot be set by a tool.")
        if name.lower() in seen:
            raise _invalid(field, f"the header “{name}” is given twice.")
        seen.add(name.lower())
        if not isinstance(header_value, str):
            raise _invalid(field, f"the value of “{name}” must be text.")
        if any(ch in header_value for ch in "\r\n\x00"):
            raise _invalid(field, f"the value of “{name}” contains a line break.")
        if len(header_value) > HEADER_VALUE_MAX_CHARS:
            raise _invalid(field, f"the value of “{name}” is longer than {HEADER_VALUE_MAX_CHARS:,} characters.")
        clean[name] = header_value
    return clean


def url_placeholders(url: str) -> list[str]:
    """The ``{name}`` placeholders of a URL template, in order of appearance (repeats kept)."""
    return PLACEHOLDER_RE.findall(url)


def _clean_url(value: Any, *, parameters: dict[str, Any]) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _invalid("url", "the URL is required.")
    url = value.strip()
    if len(url) > 2000:
        raise _invalid("url", "at most 2,000 characters.")
    sample = PLACEHOLDER_RE.sub(PLACEHOLDER_SAMPLE, url)
    if "{" in sample or "}" in sample:
        raise _invalid("url", "braces are only allowed around a placeholder name, as in {ticket_id}.")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _invalid("url", "the URL cannot be read.") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise _invalid("url", "must be an http:// or https:// URL.")
    if "{" in parts.scheme or "{" in parts.netloc:
        # The guard cannot vouch for a destination chosen at call time: refused as egress.
        raise EgressDenied(
            "Placeholders may appear only in the path or the query, never in the scheme, host or port.",
            details={"field": "url"},
        )
    if "{" in parts.fragment:
        raise _invalid("url", "placeholders may appear only in the path or the query.")
    properties = parameters.get("properties") or {}
    unknown = [name for name in dict.fromkeys(url_placeholders(url)) if name not in properties]
    if unknown:
        raise _invalid(
            "url",
            f"the placeholder(s) {', '.join('{' + n + '}' for n in unknown)} are not properties of parameters.",
            placeholders=unknown,
        )
    return url


def _check_egress(url: str) -> None:
    """The egress guard on the template with each placeholder replaced by a sample value."""
    try:
        egress_check_url(PLACEHOLDER_RE.sub(PLACEHOLDER_SAMPLE, url))
    except EgressDenied as exc:
        raise EgressDenied(exc.message, details={"field": "url"}) from None


def _body_placeholders(value: Any) -> list[str]:
    """Every ``{name}`` in the template's strings: a whole string ``"{name}"`` becomes the
    argument's JSON value, one inside a longer string its text (``agents.runtime.tool_http``)."""
    if isinstance(value, str):
        return PLACEHOLDER_RE.findall(value)
    if isinstance(value, dict):
        return [name for item in value.values() for name in _body_placeholders(item)]
    if isinstance(value, list):
        return [name for item in value for name in _body_placeholders(item)]
    return []


def _clean_body_template(value: Any, *, method: str, parameters: dict[str, Any]) -> Any:
    if value is None:
        return None
    if method not in BODY_METHODS:
        raise _invalid("body_template", f"a {method} request has no body; only POST, PUT and PATCH take one.")
    if _json_chars(value) > BODY_TEMPLATE_MAX_CHARS:
        raise _invalid("body_template", f"at most {BODY_TEMPLATE_MAX_CHARS:,} characters of JSON.")
    properties = parameters.get("properties") or {}
    unknown = [name for name in dict.fromkeys(_body_placeholders(value)) if name not in properties]
    if unknown:
        raise _invalid(
            "body_template",
            f"the placeholder(s) {', '.join(unknown)} are not properties of parameters.",
            placeholders=unknown,
        )
    return value


def tool_fields_clean(fields: dict[str, Any]) -> dict[str, Any]:
    """Check every field of an HTTP tool (``fields`` holds each of ``FIELDS``); returns them
    normalized (method upper-cased, URL stripped, ``requires_approval=None`` made the side
    effect's default: true for write, false for read).

    Raises ``ValidationFailed`` (``invalid_tool``, ``details.field``; ``invalid_characters`` for
    NUL or unpaired surrogates). Does not run the egress guard (``tool_create``/``tool_update`` do).
    """
    for name in ("name", "description", "url", "parameters", "headers", "body_template"):
        require_storable(fields.get(name), field=name)
    clean: dict[str, Any] = {"name": _clean_name(fields["name"])}
    description = fields.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str) or len(description) > DESCRIPTION_MAX_CHARS:
        raise _invalid("description", f"text of at most {DESCRIPTION_MAX_CHARS:,} characters.")
    clean["description"] = description.strip()
    clean["parameters"] = _clean_parameters(fields.get("parameters"))
    side_effect = fields.get("side_effect")
    if side_effect not in Tool.SideEffect.values:
        raise _invalid("side_effect", "must be read or write.")
    clean["side_effect"] = side_effect
    approval = fields.get("requires_approval")
    clean["requires_approval"] = (
        side_effect == Tool.SideEffect.WRITE if approval is None else _clean_bool("requires_approval", approval)
    )
    clean["timeout_seconds"] = _clean_number("timeout_seconds", fields.get("timeout_seconds"), float, *TIMEOUT_RANGE)
    clean["max_response_bytes"] = _clean_number(
        "max_response_bytes", fields.get("max_response_bytes"), int, 1, settings.EGRESS_MAX_RESPONSE_BYTES
    )
    method = fields.get("method")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise _invalid("method", f"must be one of {', '.join(METHODS)}.")
    clean["method"] = method.upper()
    clean["url"] = _clean_url(fields.get("url"), parameters=clean["parameters"])
    clean["headers"] = _clean_headers("headers", fields.get("headers"))
    clean["body_template"] = _clean_body_template(
        fields.get("body_template"), method=clean["method"], parameters=clean["parameters"]
    )
    return clean


def _clean_secret_headers(value: Any, *, headers: dict[str, str]) -> dict[str, str]:
    require_storable(value, field="secret_headers")
    secrets = _clean_headers("secret_headers", value)
    clash = sorted({n.lower() for n in secrets} & {n.lower() for n in headers})
    if clash:
        raise _invalid("secret_headers", f"the header(s) {', '.join(clash)} are also plain headers.")
    return secrets


def tool_secret_header_names(tool: Tool) -> list[str]:
    """The names of a tool's secret headers, sorted (``[]`` when none, or when they cannot be
    decrypted any more: the tool then needs its secrets given again)."""
    try:
        return sorted(tool.secret_headers())
    except SecretUnreadable:
        return []


# --- Usage by agents ----------------------------------------------------------------------------


def tool_active_users(names: list[str] | None = None) -> dict[str, list[Agent]]:
    """Agents that are not retired and whose active version lists a tool, by tool name (``names``
    limits the tools looked at; ``None``: all). One query."""
    queryset = (
        Agent.objects.exclude(status=Agent.Status.RETIRED)
        .filter(active_version__isnull=False)
        .select_related("active_version")
        .only("id", "slug", "name", "status", "active_version__tools")
        .order_by("slug")
    )
    if names is not None:
        queryset = queryset.filter(active_version__tools__overlap=names)
    users: dict[str, list[Agent]] = {}
    for agent in queryset:
        for name in dict.fromkeys(agent.active_version.tools):  # type: ignore[union-attr]
            users.setdefault(name, []).append(agent)
    return users


def _refuse_builtin(tool: Tool, verb: str) -> None:
    if tool.kind == Tool.Kind.BUILTIN:
        raise Conflict(f"“{tool.name}” is a builtin tool and cannot be {verb}.", code="builtin_tool")


def _save(tool: Tool) -> None:
    if Tool.objects.filter(name=tool.name).exclude(pk=tool.pk).exists():
        raise Conflict(f"A tool named “{tool.name}” already exists.", code="duplicate_tool", details={"field": "name"})
    try:
        with transaction.atomic():
            tool.save()
    except IntegrityError as exc:  # a concurrent create with the same name
        raise Conflict(
            f"A tool named “{tool.name}” already exists.", code="duplicate_tool", details={"field": "name"}
        ) from exc


def _audit_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """What an audit event records of tool fields: plain header names only (a value may be a
    credential someone put in the wrong field), everything else as given."""
    payload = {name: value for name, value in fields.items() if name != "headers"}
    if "headers" in fields:
        payload["header_names"] = sorted(fields["headers"])
    return payload


def _audit_waiver(principal: Principal, tool: Tool) -> None:
    if tool.side_effect == Tool.SideEffect.WRITE and not tool.requires_approval:
        audit_event_create(
            actor=principal,
            action="tool.approval_waived",
            target_type="tool",
            target_id=tool.pk,
            payload={"name": tool.name},
        )


# --- Services ---------------------------------------------------------------------------------


@transaction.atomic
def tool_create(
    *,
    principal: Principal,
    name: Any,
    url: Any,
    description: Any = "",
    kind: Any = Tool.Kind.HTTP,
    parameters: Any = None,
    side_effect: Any = Tool.SideEffect.READ,
    requires_approval: Any = None,
    timeout_seconds: Any = 10.0,
    max_response_bytes: Any = 65536,
    method: Any = "GET",
    headers: Any = None,
    secret_headers: Any = None,
    body_template: Any = None,
) -> Tool:
    """Create an HTTP tool of the principal's tenant. ``parameters`` is a JSON Schema object
    (default: an object with no properties); ``requires_approval=None`` means true for a write
    tool, false for a read one (a write tool explicitly set not to need approval is audited as
    ``tool.approval_waived``); ``timeout_seconds`` 0.5-120; ``max_response_bytes`` 1 to
    ``EGRESS_MAX_RESPONSE_BYTES``; ``secret_headers`` (header -> value) is stored encrypted.

    Raises ``Forbidden`` without ``tools:write``; ``ValidationFailed`` (``invalid_tool`` with
    ``details.field``; also for a ``kind`` other than http); ``EgressDenied`` when the guard
    refuses the URL; ``Conflict`` (``duplicate_tool``) for a name the tenant already uses.
    """
    principal.require("tools:write")
    if kind != Tool.Kind.HTTP:
        raise _invalid("kind", "only http tools can be created (the builtins exist already).")
    clean = tool_fields_clean(
        {
            "name": name,
            "description": description,
            "parameters": parameters,
            "side_effect": side_effect,
            "requires_approval": requires_approval,
            "timeout_seconds": timeout_seconds,
            "max_response_bytes": max_response_bytes,
            "method": method,
            "url": url,
            "headers": headers,
            "body_template": body_template,
        }
    )
    secrets = _clean_secret_headers(secret_headers, headers=clean["headers"])
    if Tool.objects.filter(name=clean["name"]).exists():
        raise Conflict(
            f"A tool named “{clean['name']}” already exists.", code="duplicate_tool", details={"field": "name"}
        )
    _check_egress(clean["url"])
    now = timezone.now()
    tool = Tool(
        kind=Tool.Kind.HTTP,
        secret_headers_encrypted=secret_encrypt(json.dumps(secrets)) if secrets else "",
        created_by=principal.label[:200],
        created_at=now,
        updated_at=now,
        **clean,
    )
    _save(tool)
    audit_event_create(
        actor=principal,
        action="tool.created",
        target_type="tool",
        target_id=tool.pk,
        payload={**_audit_fields(clean), "write_only_header_names": sorted(secrets)},
    )
    _audit_waiver(principal, tool)
    return tool


@transaction.atomic
def tool_update(*, principal: Principal, tool: Tool, **changes: Any) -> Tool:
    """Change some fields of an HTTP tool (PATCH: fields left out keep their value). ``changes``
    keys are ``FIELDS`` and ``secret_headers`` (given: replaces the whole set; ``{}`` clears it).
    Changing ``side_effect`` without ``requires_approval`` resets it to the new side effect's
    default. The egress guard runs again when the URL changes. A change that changes nothing
    writes nothing and no audit event (idempotent).

    Raises ``Forbidden`` without ``tools:write``; ``Conflict`` ``builtin_tool`` for a builtin,
    ``duplicate_tool`` for a taken name, ``tool_in_use`` (``details.agents``) when renaming a tool
    that an agent version lists; ``ValidationFailed`` and ``EgressDenied`` as ``tool_create``.
    """
    principal.require("tools:write")
    unknown = sorted(set(changes) - {*FIELDS, "secret_headers", "kind"})
    if unknown:
        raise _invalid(unknown[0], "unknown field.", fields=unknown)
    tool = Tool.objects.select_for_update().get(pk=tool.pk)
    _refuse_builtin(tool, "changed")
    if "kind" in changes and changes.pop("kind") != tool.kind:
        raise _invalid("kind", "the kind of a tool cannot be changed.")
    secrets = changes.pop("secret_headers", None)
    current = {name: getattr(tool, name) for name in FIELDS}
    merged = {**current, **changes}
    if "side_effect" in changes and "requires_approval" not in changes and changes["side_effect"] != tool.side_effect:
        merged["requires_approval"] = None
    clean = tool_fields_clean(merged)
    changed = {name: value for name, value in clean.items() if value != current[name]}
    secret_change = None
    if secrets is not None:
        new_secrets = _clean_secret_headers(secrets, headers=clean["headers"])
        old_secrets = tool.secret_headers() if tool.secret_headers_encrypted else {}
        if new_secrets != old_secrets:
            secret_change = sorted(new_secrets)
            tool.secret_headers_encrypted = secret_encrypt(json.dumps(new_secrets)) if new_secrets else ""
    elif "headers" in changed:
        _clean_secret_headers(
            tool.secret_headers() if tool.secret_headers_encrypted else {}, headers=clean["headers"]
        )
    if not changed and secret_change is None:
        return tool
    if "name" in changed:
        listing = list(
            AgentVersion.objects.filter(tools__contains=[tool.name])
            .order_by("agent__slug")
            .values_list("agent__slug", flat=True)
            .distinct()
        )
        if listing:
            raise Conflict(
                f"“{tool.name}” is listed by agent versions ({', '.join(listing)}); add a new tool "
                "instead of renaming it.",
                code="tool_in_use",
                details={"agents": listing},
            )
    if "url" in changed:
        _check_egress(clean["url"])
    for name, value in changed.items():
        setattr(tool, name, value)
    tool.updated_at = timezone.now()
    _save(tool)
    payload = _audit_fields(changed)
    if secret_change is not None:
        payload["write_only_header_names"] = secret_change
    audit_event_create(
        actor=principal,
        action="tool.updated",
        target_type="tool",
        target_id=tool.pk,
        payload={
            "name": tool.name,
            "changed": sorted(set(changed) | ({"secret_headers"} if secret_change is not None else set())),
            **payload,
        },
    )
    if {"side_effect", "requires_approval"} & set(changed):
        _audit_waiver(principal, tool)
    return tool


@transaction.atomic
def tool_delete(*, principal: Principal, tool: Tool) -> None:
    """Delete an HTTP tool. Versions that list it (none of them active) keep the name, which
    then names no tool and is left out of what the model is offered.

    Raises ``Forbidden`` without ``tools:write``; ``Conflict`` ``builtin_tool`` for a builtin and
    ``tool_in_use`` (``details.agents``: the slugs) when the active version of an agent that is
    not retired lists it.
    """
    principal.require("tools:write")
    tool = Tool.objects.select_for_update().get(pk=tool.pk)
    _refuse_builtin(tool, "deleted")
    agents = [agent.slug for agent in tool_active_users([tool.name]).get(tool.name, [])]
    if agents:
        raise Conflict(
            f"“{tool.name}” is used by the active version of {', '.join(agents)}; publish versions without it first.",
            code="tool_in_use",
            details={"agents": agents},
        )
    pk, name = tool.pk, tool.name
    tool.delete()
    audit_event_create(actor=principal, action="tool.deleted", target_type="tool", target_id=pk, payload={"name": name})


def tool_test_run(*, principal: Principal, tool: Tool, arguments: dict[str, Any]) -> ToolOutcome:
    """Run ``tool`` once with ``arguments`` (checked against its schema as a model's call would
    be), outside any agent or turn, and return the outcome (``status`` ok | error,
    ``error_code``, ``output``, ``request``/``response`` with secret header values redacted,
    ``duration_ms``). Audited as ``tool.tested`` with the arguments and the outcome's status.

    Raises ``Forbidden`` without ``tools:write`` and ``ValidationFailed`` (code ``invalid_json``,
    ``invalid_arguments``, ..., ``details.field = "arguments"``) for arguments the tool would
    refuse. The tool's own failure (timeout, refused address, HTTP error) is an ``error``
    outcome, not an exception.
    """
    from agents.runtime.tools import tool_arguments_parse, tool_execute

    principal.require("tools:write")
    require_storable(arguments, field="arguments")
    if not isinstance(arguments, dict):
        raise ValidationFailed(
            "arguments must be a JSON object.", code="invalid_arguments", details={"field": "arguments"}
        )
    try:
        _, parsed = tool_arguments_parse(name=tool.name, raw=json.dumps(arguments), allowed={tool.name: tool})
    except ToolCallInvalid as exc:
        raise ValidationFailed(exc.message, code=exc.code, details={"field": "arguments"}) from None
    schema: str = connection.schema_name  # type: ignore[attr-defined]
    # No transaction around the call: the request may take up to the tool's timeout.
    outcome = tool_execute(
        tool,
        parsed,
        context=ToolContext(
            schema=schema, agent_id=None, session_id=None, turn_id=None, idempotency_key=f"test-{uuid.uuid4()}"
        ),
    )
    with transaction.atomic():
        audit_event_create(
            actor=principal,
            action="tool.tested",
            target_type="tool",
            target_id=tool.pk,
            payload={
                "name": tool.name,
                "arguments": parsed,
                "status": outcome.status,
                "error_code": outcome.error_code,
            },
        )
    return outcome
