"""What both streaming paths share: errors, the stream's state and how a chunk is read,
which endpoints serve a version, token estimates and prices."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db.models import Q

from tenants.models import ModelEndpoint, Tenant


class LLMError(Exception):
    """A model call that did not produce an answer. ``code`` is stable; ``message`` is for users;
    ``fallback_ok`` is true when nothing was streamed yet and the next endpoint may be tried."""

    def __init__(self, code: str, message: str, *, fallback_ok: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fallback_ok = fallback_ok
        # What the failing call streamed before it broke (set by ``stream_chat`` when any text
        # arrived), so the tokens the model did generate are still metered.
        self.partial: StreamResult | None = None


@dataclass
class ToolCallRequest:
    """One tool call the model asked for, assembled from the stream's ``tool_calls`` deltas
    (fragments of ``function.arguments`` concatenated, by ``index``)."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""

    def message(self) -> dict[str, Any]:
        """The call as an entry of an assistant message's ``tool_calls`` (OpenAI format)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class StreamResult:
    """What one streamed call produced: the text, token counts (from the stream's ``usage``
    when the server sends it, otherwise estimated and flagged), the endpoint used, and the tool
    calls the model asked for (``finish_reason`` ``"tool_calls"``), in index order."""

    text: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    usage_estimated: bool = False
    endpoint: ModelEndpoint | None = None
    finish_reason: str = ""
    attempts: list[dict[str, str]] = field(default_factory=list)
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    first_token_at: float | None = None  # time.perf_counter() at the first content or tool-call delta


def _get(obj: Any, name: str) -> Any:
    """``obj[name]`` of a JSON chunk (the direct path) or ``obj.name`` of litellm's objects."""
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def usage_of(chunk: Any) -> tuple[int, int] | None:
    """``(prompt_tokens, completion_tokens)`` of a chunk's ``usage``, or ``None`` without one."""
    usage = _get(chunk, "usage")
    if usage is None or isinstance(usage, str | int | float):
        return None
    prompt = _get(usage, "prompt_tokens")
    completion = _get(usage, "completion_tokens")
    if prompt is None and completion is None:
        return None
    return int(prompt or 0), int(completion or 0)


@dataclass
class StreamState:
    """One call's stream as it is read, by either path: chunks go to ``read`` in order; the
    content deltas go to ``on_delta`` and accumulate in ``result``; ``streamed_any`` says whether
    any text reached the caller (after which no other endpoint may be tried)."""

    result: StreamResult
    on_delta: Callable[[str], None]
    streamed_any: bool = False

    def read(self, chunk: Any) -> None:
        """Read one ``chat.completion.chunk`` (a dict or litellm's object): usage, the first
        choice's content delta and finish reason."""
        usage = usage_of(chunk)
        if usage is not None:
            self.result.input_tokens, self.result.output_tokens = usage
        choices = _get(chunk, "choices") or []
        if not choices:
            return
        choice = choices[0]
        delta = _get(choice, "delta")
        content = _get(delta, "content") if delta is not None else None
        if content:
            if not self.streamed_any:
                self.streamed_any = True
                self.result.first_token_at = self.result.first_token_at or time.perf_counter()
            self.result.text += content
            self.on_delta(content)
        calls = _get(delta, "tool_calls") if delta is not None else None
        if calls:
            self.result.first_token_at = self.result.first_token_at or time.perf_counter()
            self._read_tool_calls(calls)
        finish = _get(choice, "finish_reason")
        if finish:
            self.result.finish_reason = str(finish)

    def _read_tool_calls(self, deltas: Any) -> None:
        # The first delta of a call carries its id and name; later ones carry fragments of its
        # arguments. Servers that send one call per chunk without an index get one by position.
        calls = self.result.tool_calls
        for position, delta in enumerate(deltas):
            index = _get(delta, "index")
            index = int(index) if isinstance(index, int) else position
            call = next((c for c in calls if c.index == index), None)
            if call is None:
                call = ToolCallRequest(index=index)
                calls.append(call)
                calls.sort(key=lambda c: c.index)
            if _get(delta, "id"):
                call.id = str(_get(delta, "id"))
            function = _get(delta, "function")
            if function is not None:
                name = _get(function, "name")
                # Some servers repeat the whole name in every delta of a call: keep it once.
                if name and str(name) != call.name:
                    call.name += str(name)
                arguments = _get(function, "arguments")
                if arguments:
                    call.arguments += str(arguments)

    def check_end(self) -> None:
        """Judge a stream that ended: with no content and no finish reason it is malformed (a cut
        connection that the client took for a normal end); with some text and no finish reason it
        was cut (OpenAI-compatible servers end every answer with one), and the text is partial and
        must not be saved as a completed answer."""
        if not self.streamed_any and not self.result.finish_reason:
            raise LLMError("malformed_stream", "The model's stream ended without an answer.", fallback_ok=True)
        if not self.result.finish_reason:
            raise LLMError("stream_interrupted", "The model's answer was cut off; retry the turn.")


def endpoints_for(*, tenant: Tenant, tier: str, endpoint_id: int | None = None) -> list[ModelEndpoint]:
    """Endpoints to try, in order, for a version of ``tenant``'s agent.

    A pinned ``endpoint_id`` gives just that endpoint (if enabled and the platform's or this
    tenant's own). Otherwise the platform's enabled endpoints of ``tier`` by ``priority``: a
    tenant's own endpoint adds a model that versions may pin, and never takes a tier over for
    the versions that did not pin it. An empty list means no model is configured for the tier.
    """
    if endpoint_id is not None:
        visible = ModelEndpoint.objects.filter(Q(tenant__isnull=True) | Q(tenant=tenant), enabled=True)
        return list(visible.filter(pk=endpoint_id))
    return list(ModelEndpoint.objects.filter(tenant__isnull=True, enabled=True, tier=tier).order_by("priority", "pk"))


def message_tokens(message: dict[str, Any]) -> int:
    """``estimate_tokens`` of one chat message: its content and any tool calls it carries."""
    text = str(message.get("content") or "")
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        text += str(function.get("name") or "") + str(function.get("arguments") or "")
    return estimate_tokens(text)


def estimate_tokens(text: str) -> int:
    """A conservative token estimate for budgeting the prompt: one token per 3 characters.

    English BPE vocabularies average about 4 characters per token (OpenAI's tokenizer guide);
    3 leaves room for code and other languages. Used only where the server reports no usage and
    for context-window trimming, never for prices when real counts exist.
    """
    return max(1, (len(text) + 2) // 3)


def price_per_token(per_million: Decimal) -> Decimal:
    """A price per million tokens as a price per token (the unit of usage events)."""
    return Decimal(per_million) / Decimal(1_000_000)
