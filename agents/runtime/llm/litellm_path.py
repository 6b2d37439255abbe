"""The litellm path: every provider that does not speak OpenAI's protocol directly.

litellm's own retries are off (fallback to the next endpoint is ``stream_chat``'s decision, and
only before any token reached the user).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from django.conf import settings

from agents.runtime.llm.common import LLMError, StreamResult, StreamState, usage_of
from tenants.models import ModelEndpoint

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _classify(exc: Exception) -> LLMError:
    import litellm

    name = type(exc).__name__
    if isinstance(exc, litellm.Timeout) or "Timeout" in name:
        return LLMError("model_timeout", "The model did not answer in time.", fallback_ok=True)
    if isinstance(exc, litellm.RateLimitError):
        return LLMError("model_rate_limited", "The model is rate-limited; try again shortly.", fallback_ok=True)
    if isinstance(exc, litellm.APIConnectionError):
        return LLMError("model_unreachable", "The model server could not be reached.", fallback_ok=True)
    if isinstance(exc, litellm.ContextWindowExceededError):
        return LLMError("context_too_long", "The conversation is too long for the model.")
    if isinstance(exc, litellm.AuthenticationError):
        return LLMError("model_auth_failed", "The model endpoint refused its credentials.", fallback_ok=True)
    if isinstance(exc, litellm.BadRequestError):
        return LLMError("model_bad_request", "The model refused the request.")
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and status >= 500:
        return LLMError("model_error", f"The model server failed (HTTP {status}).", fallback_ok=True)
    return LLMError("model_error", "The model call failed.", fallback_ok=True)


def _iterate(response: Any) -> Iterator[Any]:
    yield from response


def _close(response: Any) -> None:
    closer = getattr(response, "close", None) or getattr(getattr(response, "completion_stream", None), "close", None)
    if callable(closer):
        with contextlib.suppress(Exception):  # closing a stream we are abandoning
            closer()


def stream_litellm(
    endpoint: ModelEndpoint,
    messages: list[dict[str, Any]],
    *,
    temperature: float,
    max_tokens: int,
    response_format: dict[str, Any] | None,
    state: StreamState,
    should_stop: Any,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
) -> None:
    """Stream one call through ``litellm.completion(stream=True)`` into ``state``; raises
    ``LLMError`` classified from litellm's exceptions (``_classify``)."""
    import litellm

    kwargs: dict[str, Any] = {
        "model": endpoint.model,
        "messages": messages,
        "stream": True,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "timeout": min(endpoint.timeout_seconds, settings.LLM_TIMEOUT_SECONDS),
        "num_retries": 0,
        "stream_options": {"include_usage": True},
    }
    if endpoint.api_base:
        kwargs["api_base"] = endpoint.api_base
    api_key = endpoint.api_key()
    # OpenAI-compatible servers without auth still need a non-empty key in the client.
    kwargs["api_key"] = api_key or "none"
    if response_format:
        kwargs["response_format"] = response_format
    if tools:
        kwargs["tools"] = tools
        if tool_choice:
            kwargs["tool_choice"] = tool_choice
        # With tools, litellm first imports its MCP gateway (it needs the ``mcp`` package, not
        # installed) to look for MCP tools; ours are plain functions, so that step is skipped.
        kwargs["_skip_mcp_handler"] = True
    result: StreamResult = state.result
    try:
        response = litellm.completion(**kwargs)
        for chunk in _iterate(response):
            state.read(chunk)
            if should_stop():
                result.finish_reason = "cancelled"
                _close(response)
                return
    except LLMError:
        raise
    except Exception as exc:
        error = _classify(exc)
        if state.streamed_any:
            raise LLMError("stream_interrupted", "The model's answer was cut off; retry the turn.") from exc
        raise error from exc
    _from_provider(response, result)
    state.check_end()


def _from_provider(response: Any, result: StreamResult) -> None:
    """Replace the finish reason and usage seen in litellm's chunks by what the server sent.

    litellm's stream wrapper invents both when the server sends none: a final chunk with
    ``finish_reason="stop"`` (so a cut stream looks complete) and, with ``include_usage``, a usage
    chunk counted by its own tokenizer (so an estimate looks like the server's count). The
    wrapper keeps the server's own finish reason in ``received_finish_reason`` (or
    ``intermittent_finish_reason``) and the chunks it built from the server's data in
    ``chunks``; a response without those attributes (not litellm's wrapper) is left as read.
    """
    if not hasattr(response, "received_finish_reason"):
        return
    finish = getattr(response, "received_finish_reason", None) or getattr(response, "intermittent_finish_reason", None)
    result.finish_reason = str(finish) if finish else ""
    result.input_tokens = result.output_tokens = 0
    for chunk in reversed(getattr(response, "chunks", None) or []):
        usage = usage_of(chunk)
        if usage is not None:
            result.input_tokens, result.output_tokens = usage
            break
