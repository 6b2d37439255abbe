"""The OpenAI-compatible path: endpoints speaking the chat-completions protocol (``openai/`` and
``hosted_vllm/`` models: vLLM, llama.cpp, OpenAI itself) streamed with httpx directly.

litellm's stream wrapper costs about 1 ms of CPU per chunk (the openai SDK's model construction
plus its own chunk building, measured with cProfile), so one worker process could relay only
some hundreds of tokens per second in all; parsing the server-sent events directly costs about
30 us per chunk (``tests/bench/bench_chat.py`` shows the effect).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from django.conf import settings

from agents.runtime.llm.common import LLMError, StreamResult, StreamState
from config.egress import EgressDenied
from tenants.models import ModelEndpoint

# Model strings whose endpoint speaks OpenAI's chat-completions protocol, streamed with httpx.
DIRECT_PREFIXES = ("openai/", "hosted_vllm/")
# The base URL of a direct endpoint without an api_base.
OPENAI_API_BASE = "https://api.openai.com/v1"
_http: Any = None
_guarded_http: Any = None
_http_lock = threading.Lock()


def _http_client() -> Any:
    """One pooled httpx client per process, shared by the worker's threads (httpx clients are
    thread-safe); timeouts are set per request."""
    global _http
    import httpx

    with _http_lock:
        if _http is None:
            _http = httpx.Client(
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=64), follow_redirects=False
            )
        return _http


def _guarded_http_client() -> Any:
    """The egress guard's client (``config.egress.egress_client``) for tenants' own endpoints,
    one per process like ``_http_client``."""
    global _guarded_http
    import httpx

    from config.egress import egress_client

    with _http_lock:
        if _guarded_http is None:
            _guarded_http = egress_client(limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        return _guarded_http


def _status_error(status: int, body: str) -> LLMError:
    """An HTTP error answer of a chat-completions endpoint, classified as litellm would."""
    lowered = body.lower()
    if status == 429:
        return LLMError("model_rate_limited", "The model is rate-limited; try again shortly.", fallback_ok=True)
    if status in (401, 403):
        return LLMError("model_auth_failed", "The model endpoint refused its credentials.", fallback_ok=True)
    if status == 400 and ("context_length" in lowered or "context length" in lowered or "too long" in lowered):
        return LLMError("context_too_long", "The conversation is too long for the model.")
    if status in (400, 422):
        return LLMError("model_bad_request", "The model refused the request.")
    return LLMError("model_error", f"The model server failed (HTTP {status}).", fallback_ok=True)


def stream_direct(
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
    """Stream one call for an OpenAI-compatible endpoint: POST ``{api_base}/chat/completions``
    with ``stream: true`` and read the server-sent events (``data: {chunk}`` lines,
    ``data: [DONE]``) into ``state``.

    The finish reason and usage are only what the server sent, so a stream cut after some tokens
    (no finish reason) is ``stream_interrupted`` and one with no chunks ``malformed_stream``. The
    timeout (the endpoint's, capped by ``LLM_TIMEOUT_SECONDS``) bounds connecting and each wait
    for bytes, as litellm's does. A tenant's own endpoint goes through the egress guard's client:
    a destination it refuses (also one that re-resolved to a private address since it was saved)
    is ``egress_denied`` and no request leaves.
    """
    import httpx

    base = (endpoint.api_base or OPENAI_API_BASE).rstrip("/")
    client = _http_client() if endpoint.tenant_id is None else _guarded_http_client()
    body: dict[str, Any] = {
        "model": endpoint.model.split("/", 1)[1],
        "messages": messages,
        "stream": True,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
    }
    if response_format:
        body["response_format"] = response_format
    if tools:
        body["tools"] = tools
        if tool_choice:
            body["tool_choice"] = tool_choice
    # OpenAI-compatible servers without auth still accept any bearer token.
    headers = {"Authorization": f"Bearer {endpoint.api_key() or 'none'}", "Accept": "text/event-stream"}
    timeout = httpx.Timeout(min(endpoint.timeout_seconds, settings.LLM_TIMEOUT_SECONDS))
    result: StreamResult = state.result
    try:
        with client.stream("POST", f"{base}/chat/completions", json=body, headers=headers, timeout=timeout) as response:
            if 300 <= response.status_code < 400:
                # Redirects are not followed: an answer must come from the endpoint itself.
                raise LLMError(
                    "model_error",
                    f"The model server answered with a redirect (HTTP {response.status_code}).",
                    fallback_ok=True,
                )
            if response.status_code >= 400:
                response.read()
                raise _status_error(response.status_code, response.text[:2000])
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError("a stream chunk is not a JSON object")
                if chunk.get("error"):
                    raise LLMError(
                        "model_error",
                        "The model server reported an error mid-stream.",
                        fallback_ok=not state.streamed_any,
                    )
                state.read(chunk)
                if should_stop():
                    result.finish_reason = "cancelled"
                    return
    except LLMError:
        raise
    except EgressDenied as exc:
        raise LLMError(
            "egress_denied", f"The model endpoint's address is not allowed: {exc.message}", fallback_ok=True
        ) from exc
    except httpx.TimeoutException as exc:
        if state.streamed_any:
            raise LLMError("stream_interrupted", "The model's answer was cut off; retry the turn.") from exc
        raise LLMError("model_timeout", "The model did not answer in time.", fallback_ok=True) from exc
    except (httpx.HTTPError, ValueError) as exc:  # transport errors; JSON that does not parse
        if state.streamed_any:
            raise LLMError("stream_interrupted", "The model's answer was cut off; retry the turn.") from exc
        if isinstance(exc, ValueError):
            raise LLMError("malformed_stream", "The model's stream could not be read.", fallback_ok=True) from exc
        raise LLMError("model_unreachable", "The model server could not be reached.", fallback_ok=True) from exc
    state.check_end()
