"""HTTP tools: one request to a tenant's service through the egress guard, within the tool's time.

The request is built from the tool and the call's arguments:

- ``url``: each ``{param}`` placeholder becomes the argument's text, URL-encoded
  (``urllib.parse.quote(text, safe="")``); a placeholder the call gives no argument for is an
  error (``tool_error``), nothing is sent.
- The other arguments: query parameters for GET and DELETE (a list repeats its parameter, an
  object is sent as JSON text, null is left out); for POST, PUT and PATCH the JSON body, unless
  ``body_template`` is set: then every JSON string of the template that is exactly
  ``"{param}"`` becomes the argument's JSON value (its type kept; a missing argument drops the
  object member, or is null in an array) and a ``{param}`` inside a longer string becomes the
  argument's text (a missing one is an error). Object keys are not substituted.
- Headers: ``tool.headers``, then the decrypted secret headers (they win), ``Idempotency-Key``
  (``context.idempotency_key``) for write tools, a ``User-Agent``, and ``Content-Type:
  application/json`` with a body.

The text of an argument: a string as it is, ``true``/``false``, a number as Python writes it,
null as nothing, anything else as compact JSON.

Time: ``tool.timeout_seconds`` bounds the whole call, from resolving the host through the last
byte of the body. The request runs on its own short-lived thread (so that a name lookup, a
connect, a wait for headers and a slow body all count against one deadline, which httpx's
per-operation timeouts cannot do); the caller stops waiting at the deadline (``tool_timeout``)
and the thread stops reading at its next byte or by its own timeouts. A write that timed out may
still have reached the service: the message says so, and ``Idempotency-Key`` lets the service
drop a retry.

Size: the body is read up to ``tool.max_response_bytes``; a larger answer is an error
(``response_too_large``, not a truncation: a cut JSON document is not one, and the model should
not act on half an answer), which says whether the service accepted the request.

Secrets: the secret header values appear in neither the ``request`` record (their values read
``[redacted]``), the logs, nor the output or response excerpt (any occurrence of a secret value
in what the service answered is replaced by ``[redacted]``, so an echoing service cannot leak
it to the model).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import structlog
from django.db import connections

from agents.models import Tool
from agents.runtime.tools import ToolContext, ToolOutcome
from config.crypto import SecretUnreadable, secret_decrypt
from config.egress import EgressDenied, EgressResponseRefused, egress_client

logger = structlog.get_logger(__name__)

USER_AGENT = "agent-ops-portal-tool/1.0"
REDACTED = "[redacted]"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
QUERY_METHODS = frozenset({"GET", "DELETE"})
# Characters of the body kept in ``ToolOutcome.response`` and in an error's output.
RESPONSE_EXCERPT_CHARS = 2000

_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_-]+)\}")
_MISSING = object()

_client_lock = threading.Lock()
_client: httpx.Client | None = None


def _guarded_client() -> httpx.Client:
    """The egress guard's client (``config.egress.egress_client``), one per process, shared by
    the worker's threads; each request passes its own timeout."""
    global _client
    with _client_lock:
        if _client is None:
            _client = egress_client(limits=httpx.Limits(max_connections=256, max_keepalive_connections=32))
        return _client


class _Refusal(Exception):
    """The call cannot be made as configured or asked; nothing was sent."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _url_fill(template: str, arguments: dict[str, Any]) -> tuple[str, set[str]]:
    used: set[str] = set()

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in arguments or arguments[name] is None:
            raise _Refusal("tool_error", f"The tool's URL needs the argument '{name}', which the call did not give.")
        used.add(name)
        return quote(_text(arguments[name]), safe="")

    return _PLACEHOLDER.sub(fill, template), used


def _template_fill(node: Any, arguments: dict[str, Any]) -> Any:
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node)
        if whole is not None:
            return arguments.get(whole.group(1), _MISSING)

        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in arguments:
                raise _Refusal(
                    "tool_error", f"The tool's body template needs the argument '{name}', which the call did not give."
                )
            return _text(arguments[name])

        return _PLACEHOLDER.sub(fill, node)
    if isinstance(node, dict):
        filled = {key: _template_fill(value, arguments) for key, value in node.items()}
        return {key: value for key, value in filled.items() if value is not _MISSING}
    if isinstance(node, list):
        return [None if value is _MISSING else value for value in (_template_fill(v, arguments) for v in node)]
    return node


def _query_params(arguments: dict[str, Any]) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    for name, value in arguments.items():
        if value is None:
            continue
        if isinstance(value, list):
            params.extend((name, _text(item)) for item in value if item is not None)
        else:
            params.append((name, _text(value)))
    return params


def _secret_headers(tool: Tool) -> dict[str, str]:
    if not tool.secret_headers_encrypted:
        return {}
    try:
        secrets = json.loads(secret_decrypt(tool.secret_headers_encrypted))
    except (SecretUnreadable, ValueError) as exc:
        raise _Refusal(
            "tool_error", "The tool's secret headers cannot be read; ask an administrator to set them again."
        ) from exc
    if not isinstance(secrets, dict):
        raise _Refusal("tool_error", "The tool's secret headers are not a set of header names and values.")
    return {str(name): _text(value) for name, value in secrets.items()}


@dataclass
class _Prepared:
    method: str
    url: str
    params: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes | None
    body_shown: Any
    secret_names: frozenset[str]
    secret_values: tuple[str, ...]
    record: dict[str, Any] = field(default_factory=dict)


def _prepare(tool: Tool, arguments: dict[str, Any], context: ToolContext) -> _Prepared:
    method = (tool.method or "GET").upper()
    if method not in METHODS:
        raise _Refusal("tool_error", f"The tool's method {method} is not supported.")
    url, used = _url_fill(tool.url, arguments)
    rest = {name: value for name, value in arguments.items() if name not in used}
    params: list[tuple[str, str]] = []
    body_value: Any = None
    has_body = method not in QUERY_METHODS
    if not has_body:
        params = _query_params(rest)
    elif tool.body_template is not None:
        body_value = _template_fill(tool.body_template, arguments)
        if body_value is _MISSING:
            body_value = None
    else:
        body_value = rest
    headers = {str(name): _text(value) for name, value in (tool.headers or {}).items()}
    secrets = _secret_headers(tool)
    lowered = {name.lower() for name in secrets}
    headers = {name: value for name, value in headers.items() if name.lower() not in lowered}
    headers.update(secrets)
    if tool.side_effect == Tool.SideEffect.WRITE and context.idempotency_key:
        headers["Idempotency-Key"] = context.idempotency_key
    headers["User-Agent"] = USER_AGENT
    body: bytes | None = None
    if has_body:
        body = json.dumps(body_value, ensure_ascii=False).encode()
        headers["Content-Type"] = "application/json"
    prepared = _Prepared(
        method=method,
        url=url,
        params=params,
        headers=headers,
        body=body,
        body_shown=body_value,
        secret_names=frozenset(lowered),
        secret_values=tuple(sorted({v for v in secrets.values() if v}, key=len, reverse=True)),
    )
    return prepared


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


@dataclass
class _Exchange:
    status: int = 0
    reason: str = ""
    content_type: str = ""
    location: str = ""
    body: bytes = b""
    too_large: bool = False


def _send(
    client: httpx.Client, request: httpx.Request, *, max_bytes: int, deadline: float, cancelled: threading.Event
) -> _Exchange:
    response = client.send(request, stream=True)
    try:
        exchange = _Exchange(
            status=response.status_code,
            reason=response.reason_phrase,
            content_type=response.headers.get("content-type", ""),
            location=response.headers.get("location", ""),
        )
        received = bytearray()
        for chunk in response.iter_raw():
            if cancelled.is_set() or time.monotonic() > deadline:
                raise httpx.ReadTimeout("The tool's time ran out while its response was read.")
            received.extend(chunk)
            if len(received) > max_bytes:
                exchange.too_large = True
                del received[max_bytes:]
                break
        exchange.body = bytes(received)
        return exchange
    finally:
        response.close()


def _on_own_thread(work: Any, *, seconds: float, cancelled: threading.Event) -> tuple[bool, Any, BaseException | None]:
    """``(finished, value, error)`` of ``work()`` run on a new daemon thread, waiting at most
    ``seconds``; ``cancelled`` is set when the wait gives up."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to the caller, which classifies it
            box["error"] = exc
        finally:
            # The guard reads the staff allowlist rows on this thread's own connection.
            connections.close_all()
            done.set()

    threading.Thread(target=run, name="tool-http", daemon=True).start()
    if not done.wait(max(0.0, seconds)):
        cancelled.set()
        return False, None, None
    return True, box.get("value"), box.get("error")


def _decoded(exchange: _Exchange) -> str:
    charset = "utf-8"
    match = re.search(r"charset=([\w.:-]+)", exchange.content_type, re.IGNORECASE)
    if match:
        charset = match.group(1)
    try:
        return exchange.body.decode(charset, errors="replace")
    except LookupError:
        return exchange.body.decode("utf-8", errors="replace")


def _seconds(value: float) -> str:
    return f"{value:g} s"


def http_execute(tool: Tool, arguments: dict[str, Any], *, context: ToolContext, started: float) -> ToolOutcome:
    """Send ``tool``'s request for ``arguments`` through the egress guard (module docstring for
    how it is built), finishing by ``started + tool.timeout_seconds`` (``time.monotonic``).

    Returns ``status="ok"`` with the body as ``output`` for a 2xx answer; otherwise
    ``status="error"`` with ``error_code``: ``tool_error`` (the URL or body cannot be built, the
    secret headers cannot be read, a bad header), ``egress_denied`` (the guard refused the
    address; nothing was sent), ``tool_timeout``, ``tool_unreachable`` (no connection),
    ``response_too_large``, ``http_error`` (a non-2xx answer, redirects included: the output
    gives the status and the start of the body). ``request`` and ``response`` are recorded
    whenever a request was built. Never raises for the service's failure.
    """
    try:
        prepared = _prepare(tool, arguments, context)
    except _Refusal as refusal:
        return ToolOutcome(status="error", output=refusal.message, error_code=refusal.code)
    client = _guarded_client()
    deadline = started + max(0.001, float(tool.timeout_seconds))
    try:
        request = client.build_request(
            prepared.method,
            prepared.url,
            params=httpx.QueryParams(tuple(prepared.params)) if prepared.params else None,
            content=prepared.body,
            headers=prepared.headers,
            timeout=httpx.Timeout(max(0.001, deadline - time.monotonic())),
        )
    except Exception as exc:  # httpx.InvalidURL, a header value with a line break, ...
        logger.info("tool.request_invalid", tool=tool.name, error=type(exc).__name__)
        return ToolOutcome(
            status="error",
            output=f"The tool's request cannot be built: {_scrub(str(exc), prepared.secret_values)}",
            error_code="tool_error",
        )
    record = {
        "method": prepared.method,
        "url": str(request.url),
        "headers": {
            name: (REDACTED if name.lower() in prepared.secret_names else value)
            for name, value in prepared.headers.items()
        },
        "body": prepared.body_shown if prepared.body is not None else None,
    }
    cancelled = threading.Event()
    finished, exchange, error = _on_own_thread(
        lambda: _send(client, request, max_bytes=tool.max_response_bytes, deadline=deadline, cancelled=cancelled),
        seconds=deadline - time.monotonic(),
        cancelled=cancelled,
    )
    write = tool.side_effect == Tool.SideEffect.WRITE

    def failed(code: str, message: str, response: dict[str, Any] | None = None) -> ToolOutcome:
        return ToolOutcome(
            status="error",
            output=_scrub(message, prepared.secret_values),
            error_code=code,
            request=record,
            response=response,
        )

    if not finished or isinstance(error, httpx.TimeoutException):
        maybe = " The request may have reached the service." if write else ""
        return failed(
            "tool_timeout",
            f"The tool {tool.name} did not finish within {_seconds(float(tool.timeout_seconds))}.{maybe}",
        )
    if isinstance(error, EgressDenied):
        return failed("egress_denied", f"The tool's address is not allowed: {error.message} Nothing was sent.")
    if isinstance(error, EgressResponseRefused):
        return failed("response_too_large", f"The tool's response was refused: {error}")
    if isinstance(error, httpx.ConnectError):
        return failed("tool_unreachable", f"The tool's service could not be reached ({type(error).__name__}).")
    if error is not None:
        logger.info("tool.request_failed", tool=tool.name, error=type(error).__name__)
        return failed("tool_error", f"The tool's request failed ({type(error).__name__}).")
    assert isinstance(exchange, _Exchange)
    text = _scrub(_decoded(exchange), prepared.secret_values)
    response = {
        "status": exchange.status,
        "content_type": exchange.content_type,
        "body_excerpt": text[:RESPONSE_EXCERPT_CHARS],
    }
    if exchange.too_large:
        accepted = "accepted" if 200 <= exchange.status < 300 else "did not accept"
        return failed(
            "response_too_large",
            f"The tool's service answered HTTP {exchange.status} ({accepted} the "
            f"request) with a response larger than {tool.max_response_bytes} bytes, "
            "which is not read.",
            response,
        )
    if not 200 <= exchange.status < 300:
        head = f"HTTP {exchange.status} {exchange.reason}".strip()
        if 300 <= exchange.status < 400:
            head += " (redirects are not followed"
            head += (
                f"; Location: {_scrub(exchange.location, prepared.secret_values)[:500]})" if exchange.location else ")"
            )
        excerpt = text[:RESPONSE_EXCERPT_CHARS]
        return failed("http_error", f"{head}\n{excerpt}" if excerpt else head, response)
    output = text if text.strip() else f"HTTP {exchange.status} {exchange.reason} (no content)".strip()
    return ToolOutcome(status="ok", output=output, request=record, response=response)
