"""Tools at run time: what the model is offered, checking its arguments, running a call.

The orchestrator's tool loop uses only this module's public names (the contract below); how a
call is executed (HTTP through the egress guard, the builtins) lives here too.

- ``tools_for_version(version) -> dict[str, Tool]``: the version's tools by name, one query;
  names that no longer name a tool are left out.
- ``openai_tools(tools) -> list[dict]``: OpenAI ``tools`` entries
  (``{"type": "function", "function": {"name", "description", "parameters"}}``).
- ``tool_arguments_parse(*, name, raw, allowed) -> tuple[Tool, dict]``: raises
  ``ToolCallInvalid`` (codes ``unknown_tool``, ``tool_not_allowed``, ``invalid_json``,
  ``invalid_arguments``) with a message written for the model.
- ``tool_execute(tool, arguments, *, context) -> ToolOutcome``: runs a call within the tool's
  timeout; never raises for the tool's own failure (``status="error"`` with ``error_code``:
  ``tool_timeout``, ``egress_denied``, ``http_error``, ``tool_error``, ...).
- ``tool_result_text(outcome, *, max_chars) -> str``: the result as the model reads it, cut to
  ``max_chars`` and fenced as untrusted data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BUILTIN_NAMES = ("kb_search", "current_time", "calculator")


class ToolCallInvalid(Exception):
    """A tool call that must not run; ``message`` is what the model is told."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ToolContext:
    """What a call may need besides its arguments: where it runs and, for ``kb_search``, the
    agent version's collections and retrieval settings. ``idempotency_key`` is stable for one
    tool call (sent as ``Idempotency-Key`` by HTTP tools, so a service can drop a repeat)."""

    schema: str
    agent_id: int | None
    session_id: int | None
    turn_id: int | None
    collection_ids: tuple[int, ...] = ()
    retrieval_mode: str = "hybrid"
    max_chunks_per_document: int | None = None
    idempotency_key: str = ""


@dataclass
class ToolOutcome:
    """The result of one call. ``output`` is the full text result (JSON text for structured
    results); ``request``/``response`` describe the HTTP exchange with secret header values
    redacted (``None`` for builtins); ``hits`` are ``kb_search``'s ``SearchHit`` rows (to cite)."""

    status: str  # "ok" | "error"
    output: str
    error_code: str = ""
    duration_ms: int = 0
    request: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    hits: list[Any] = field(default_factory=list)
