"""Model calls: which endpoints serve a version, streaming, fallback.

Fallback is tried only while it is safe: an endpoint that fails before sending any token
(connection refused, timeout, HTTP 5xx or 429) hands over to the next endpoint of the tier. Once
tokens have reached the user, a failure ends the turn (``stream_interrupted``) instead of
starting the answer again elsewhere. litellm's own retries are off for the same reason.

Two paths share one stream state (``common.StreamState``: content, finish reason, usage):
endpoints speaking the OpenAI chat-completions protocol (``DIRECT_PREFIXES``) are streamed with
httpx directly (``direct``); every other provider goes through litellm (``litellm_path``).

Egress: a tenant's own endpoint is a URL the tenant supplied, so it never reaches the network
unguarded. It is streamed only by the direct path, through the egress guard's client
(``config.egress.egress_client``: resolved and checked at connect time, pinned to the checked
address, no redirects, size and time caps). litellm is not given a tenant's ``api_base``: its
providers open their own HTTP clients (and some, such as ``ollama/``, default to a local
address), which the guard cannot wrap. So a tenant endpoint with an ``api_base`` must speak the
OpenAI protocol (``DIRECT_PREFIXES``), and one without goes through litellm only for a provider of
``HOSTED_PROVIDERS``, whose fixed public base URL the tenant cannot change
(``tenant_endpoint_check``, at save time and again before each call). Platform endpoints
(``tenant`` null) are staff's and keep the plain client, so the local model on 127.0.0.1 works.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from agents.runtime.llm.common import (
    LLMError,
    StreamResult,
    StreamState,
    ToolCallRequest,
    endpoints_for,
    estimate_tokens,
    message_tokens,
    price_per_token,
)
from agents.runtime.llm.direct import DIRECT_PREFIXES, OPENAI_API_BASE, stream_direct
from agents.runtime.llm.litellm_path import stream_litellm
from config.egress import EgressDenied, EgressTarget, egress_check_url
from config.telemetry import llm_call_observed
from tenants.models import ModelEndpoint

logger = structlog.get_logger(__name__)

__all__ = [
    "DIRECT_PREFIXES",
    "HOSTED_PROVIDERS",
    "OPENAI_API_BASE",
    "LLMError",
    "StreamResult",
    "StreamState",
    "ToolCallRequest",
    "endpoints_for",
    "estimate_tokens",
    "price_per_token",
    "stream_chat",
    "tenant_endpoint_check",
]

# litellm providers a tenant endpoint may use without an api_base: hosted services whose base URL
# is fixed in litellm (public, not the tenant's to choose). Local-server providers (ollama,
# lm_studio, vllm, ...) default to a local address and are left out on purpose.
HOSTED_PROVIDERS = frozenset(
    {
        "anthropic",
        "gemini",
        "mistral",
        "groq",
        "cohere",
        "cohere_chat",
        "deepseek",
        "together_ai",
        "fireworks_ai",
        "openrouter",
        "xai",
        "perplexity",
        "deepinfra",
    }
)


def tenant_endpoint_check(*, model: str, api_base: str) -> EgressTarget | None:
    """Check where a tenant's own endpoint would send requests, before saving it and before
    each call: an ``api_base`` needs an OpenAI-protocol model (``DIRECT_PREFIXES``) and must
    pass the egress guard (``config.egress.egress_check_url``); without one, the model is
    either direct (OpenAI's public API) or a litellm provider of ``HOSTED_PROVIDERS``.

    Returns the checked target of the ``api_base`` (``None`` without one). Raises
    ``EgressDenied`` (HTTP 422, code ``egress_denied``) saying why.
    """
    direct = model.startswith(DIRECT_PREFIXES)
    if api_base:
        if not direct:
            raise EgressDenied(
                f"An endpoint with its own API base must use an OpenAI-compatible model string "
                f"({' or '.join(DIRECT_PREFIXES)}...)."
            )
        return egress_check_url(api_base)
    provider = model.split("/", 1)[0] if "/" in model else ""
    if not direct and provider not in HOSTED_PROVIDERS:
        raise EgressDenied(
            f"Without an API base, a model string must name a hosted provider "
            f"({', '.join(sorted(p + '/' for p in HOSTED_PROVIDERS | {'openai'}))})."
        )
    return None


def _tenant_route_check(endpoint: ModelEndpoint) -> None:
    """Refuse a tenant endpoint whose route ``tenant_endpoint_check`` refuses (a row saved before
    the guard, or changed behind the services) without resolving its host: the direct path's
    client checks the address itself when it connects."""
    direct = endpoint.model.startswith(DIRECT_PREFIXES)
    try:
        if endpoint.api_base and direct:
            return
        tenant_endpoint_check(model=endpoint.model, api_base=endpoint.api_base)
    except EgressDenied as exc:
        raise LLMError(
            "egress_denied", f"The model endpoint's address is not allowed: {exc.message}", fallback_ok=True
        ) from exc


def _one_call(stream: Callable[..., None]) -> Callable[..., None]:
    """One model call on a path (``direct.stream_direct`` or ``litellm_path.stream_litellm``)
    that reads the stream into ``result``, calling ``on_delta`` for content; the other keyword
    arguments (temperature, max_tokens, response_format, should_stop, tools, tool_choice) pass
    through."""

    def call(endpoint: ModelEndpoint, messages: list[dict[str, Any]], *, on_delta: Callable[[str], None],
             result: StreamResult, **options: Any) -> None:
        stream(endpoint, messages, state=StreamState(result=result, on_delta=on_delta), **options)

    return call


_stream_direct = _one_call(stream_direct)
_stream_one = _one_call(stream_litellm)


def _estimate(result: StreamResult, messages: list[dict[str, Any]]) -> None:
    result.usage_estimated = True
    result.input_tokens = sum(message_tokens(m) for m in messages)
    output = result.text + "".join(c.name + c.arguments for c in result.tool_calls)
    result.output_tokens = estimate_tokens(output) if output else 0


def stream_chat(
    *,
    endpoints: list[ModelEndpoint],
    messages: list[dict[str, Any]],
    temperature: float,
    max_tokens: int,
    response_format: dict[str, Any] | None = None,
    on_delta: Callable[[str], None],
    should_stop: Callable[[], bool],
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    metrics: bool = True,
) -> StreamResult:
    """Stream a chat completion from the first endpoint that works, calling ``on_delta(text)``
    for every content delta. ``should_stop()`` is polled between chunks (cancellation).
    ``metrics=False`` leaves the call out of the model-call metrics (a health probe's call).

    ``messages`` are OpenAI chat messages (assistant messages may carry ``tool_calls``, ``tool``
    messages a ``tool_call_id``). ``tools`` (OpenAI ``tools`` entries) are offered with
    ``tool_choice`` (``auto``, ``required`` or ``none``); the calls the model makes are in
    ``result.tool_calls`` (``finish_reason`` ``"tool_calls"``).

    Returns the ``StreamResult``; raises ``LLMError`` (the last endpoint's error, or
    ``no_model`` when ``endpoints`` is empty); an error after some text carries that text and its
    token counts (estimated unless the server sent usage) in ``error.partial``. Token counts come
    from the stream's final usage chunk (``stream_options.include_usage``); a server that sends
    none gets estimates.
    """
    if not endpoints:
        raise LLMError("no_model", "No model endpoint is configured for this agent's tier.")
    last: LLMError | None = None
    for endpoint in endpoints:
        result = StreamResult(endpoint=endpoint)
        started = time.perf_counter()
        stream = _stream_direct if endpoint.model.startswith(DIRECT_PREFIXES) else _stream_one
        # The span and the model-call metrics (config.telemetry); they read the token counts on exit.
        with llm_call_observed(endpoint, result, metrics=metrics):
            try:
                if endpoint.tenant_id is not None:
                    _tenant_route_check(endpoint)
                stream(
                    endpoint,
                    messages,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    response_format=response_format,
                    on_delta=on_delta,
                    should_stop=should_stop,
                    result=result,
                    tools=tools,
                    tool_choice=tool_choice,
                )
            except LLMError as error:
                last = error
                logger.warning(
                    "llm_call_failed",
                    endpoint=endpoint.name,
                    code=error.code,
                    cause=repr(error.__cause__)[:500],
                    seconds=round(time.perf_counter() - started, 3),
                )
                if error.fallback_ok and not result.text:
                    continue
                if result.text:
                    if result.input_tokens == 0 and result.output_tokens == 0:
                        _estimate(result, messages)
                    error.partial = result
                raise
            if result.input_tokens == 0 and result.output_tokens == 0:
                _estimate(result, messages)
            return result
    assert last is not None
    raise last
