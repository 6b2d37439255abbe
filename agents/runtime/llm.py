"""Model calls: which endpoints serve a version, streaming, fallback.

Fallback is tried only while it is safe: an endpoint that fails before sending any token
(connection refused, timeout, HTTP 5xx or 429) hands over to the next endpoint of the tier. Once
tokens have reached the user, a failure ends the turn (``stream_interrupted``) instead of
starting the answer again elsewhere. litellm's own retries are off for the same reason.

Endpoints speaking the OpenAI chat-completions protocol (``openai/`` and ``hosted_vllm/``
models: vLLM, llama.cpp, OpenAI itself) are streamed with httpx directly; every other provider
goes through litellm. litellm's stream wrapper costs about 1 ms of CPU per chunk (the openai
SDK's model construction plus its own chunk building, measured with cProfile), so one worker
process could relay only some hundreds of tokens per second in all; parsing the server-sent
events directly costs about 30 us per chunk (``tests/bench/bench_chat.py`` shows the effect).

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

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import structlog
from django.conf import settings
from django.db.models import Q

from config.egress import EgressDenied, EgressTarget, egress_check_url
from tenants.models import ModelEndpoint, Tenant

logger = structlog.get_logger(__name__)

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


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
class StreamResult:
    """What one streamed call produced: the text, token counts (from the stream's ``usage``
    when the server sends it, otherwise estimated and flagged), and the endpoint used."""

    text: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    usage_estimated: bool = False
    endpoint: ModelEndpoint | None = None
    finish_reason: str = ""
    attempts: list[dict[str, str]] = field(default_factory=list)


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
    return list(ModelEndpoint.objects.filter(tenant__isnull=True, enabled=True, tier=tier)
                .order_by("priority", "pk"))


def estimate_tokens(text: str) -> int:
    """A conservative token estimate for budgeting the prompt: one token per 3 characters.

    English BPE vocabularies average about 4 characters per token (OpenAI's tokenizer guide);
    3 leaves room for code and other languages. Used only where the server reports no usage and
    for context-window trimming, never for prices when real counts exist.
    """
    return max(1, (len(text) + 2) // 3)


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


def _usage_of(chunk: Any) -> tuple[int, int] | None:
    usage = getattr(chunk, "usage", None)
    if usage is None:
        return None
    prompt = getattr(usage, "prompt_tokens", None)
    completion = getattr(usage, "completion_tokens", None)
    if prompt is None and completion is None:
        return None
    return int(prompt or 0), int(completion or 0)


def _stream_one(endpoint: ModelEndpoint, messages: list[dict[str, str]], *, temperature: float,
                max_tokens: int, response_format: dict[str, Any] | None,
                on_delta: Callable[[str], None], should_stop: Callable[[], bool], result: StreamResult) -> None:
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
    streamed_any = False
    try:
        response = litellm.completion(**kwargs)
        for chunk in _iterate(response):
            usage = _usage_of(chunk)
            if usage is not None:
                result.input_tokens, result.output_tokens = usage
            choices = getattr(chunk, "choices", None) or []
            if not choices:
                continue
            choice = choices[0]
            delta = getattr(getattr(choice, "delta", None), "content", None)
            if delta:
                streamed_any = True
                result.text += delta
                on_delta(delta)
            if getattr(choice, "finish_reason", None):
                result.finish_reason = str(choice.finish_reason)
            if should_stop():
                result.finish_reason = "cancelled"
                _close(response)
                return
    except LLMError:
        raise
    except Exception as exc:
        error = _classify(exc)
        if streamed_any:
            raise LLMError("stream_interrupted", "The model's answer was cut off; retry the turn.") from exc
        raise error from exc
    _from_provider(response, result)
    # A stream that ends with no content and no finish reason is malformed (a cut connection that
    # the client took for a normal end).
    if not streamed_any and not result.finish_reason:
        raise LLMError("malformed_stream", "The model's stream ended without an answer.", fallback_ok=True)
    # OpenAI-compatible servers end every answer with a finish reason. A stream that stops after
    # some tokens without one was cut (the connection closed, which the HTTP client reads as a
    # normal end of body): the text is partial and must not be saved as a completed answer.
    if not result.finish_reason:
        raise LLMError("stream_interrupted", "The model's answer was cut off; retry the turn.")


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
        usage = _usage_of(chunk)
        if usage is not None:
            result.input_tokens, result.output_tokens = usage
            break


# Model strings whose endpoint speaks OpenAI's chat-completions protocol, streamed with httpx.
DIRECT_PREFIXES = ("openai/", "hosted_vllm/")
# The base URL of a direct endpoint without an api_base.
OPENAI_API_BASE = "https://api.openai.com/v1"
# litellm providers a tenant endpoint may use without an api_base: hosted services whose base URL
# is fixed in litellm (public, not the tenant's to choose). Local-server providers (ollama,
# lm_studio, vllm, ...) default to a local address and are left out on purpose.
HOSTED_PROVIDERS = frozenset({"anthropic", "gemini", "mistral", "groq", "cohere", "cohere_chat", "deepseek",
                              "together_ai", "fireworks_ai", "openrouter", "xai", "perplexity", "deepinfra"})
_http: Any = None
_guarded_http: Any = None
_http_lock = threading.Lock()


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
            raise EgressDenied(f"An endpoint with its own API base must use an OpenAI-compatible model string "
                               f"({' or '.join(DIRECT_PREFIXES)}...).")
        return egress_check_url(api_base)
    provider = model.split("/", 1)[0] if "/" in model else ""
    if not direct and provider not in HOSTED_PROVIDERS:
        raise EgressDenied(f"Without an API base, a model string must name a hosted provider "
                           f"({', '.join(sorted(p + '/' for p in HOSTED_PROVIDERS | {'openai'}))}).")
    return None


def _http_client() -> Any:
    """One pooled httpx client per process, shared by the worker's threads (httpx clients are
    thread-safe); timeouts are set per request."""
    global _http
    import httpx

    with _http_lock:
        if _http is None:
            _http = httpx.Client(limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
                                 follow_redirects=False)
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


def _stream_direct(endpoint: ModelEndpoint, messages: list[dict[str, str]], *, temperature: float,
                   max_tokens: int, response_format: dict[str, Any] | None,
                   on_delta: Callable[[str], None], should_stop: Callable[[], bool], result: StreamResult) -> None:
    """``_stream_one`` for OpenAI-compatible endpoints: POST ``{api_base}/chat/completions`` with
    ``stream: true`` and read the server-sent events (``data: {chunk}`` lines, ``data: [DONE]``).

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
    # OpenAI-compatible servers without auth still accept any bearer token.
    headers = {"Authorization": f"Bearer {endpoint.api_key() or 'none'}", "Accept": "text/event-stream"}
    timeout = httpx.Timeout(min(endpoint.timeout_seconds, settings.LLM_TIMEOUT_SECONDS))
    streamed_any = False
    try:
        with client.stream("POST", f"{base}/chat/completions", json=body, headers=headers,
                           timeout=timeout) as response:
            if 300 <= response.status_code < 400:
                # Redirects are not followed: an answer must come from the endpoint itself.
                raise LLMError("model_error", f"The model server answered with a redirect (HTTP "
                               f"{response.status_code}).", fallback_ok=True)
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
                    raise LLMError("model_error", "The model server reported an error mid-stream.",
                                   fallback_ok=not streamed_any)
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    result.input_tokens = int(usage.get("prompt_tokens") or 0)
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                choices = chunk.get("choices") or []
                if not choices:
                    continue
                choice = choices[0]
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    streamed_any = True
                    result.text += delta
                    on_delta(delta)
                if choice.get("finish_reason"):
                    result.finish_reason = str(choice["finish_reason"])
                if should_stop():
                    result.finish_reason = "cancelled"
                    return
    except LLMError:
        raise
    except EgressDenied as exc:
        raise LLMError("egress_denied", f"The model endpoint's address is not allowed: {exc.message}",
                       fallback_ok=True) from exc
    except httpx.TimeoutException as exc:
        if streamed_any:
            raise LLMError("stream_interrupted", "The model's answer was cut off; retry the turn.") from exc
        raise LLMError("model_timeout", "The model did not answer in time.", fallback_ok=True) from exc
    except (httpx.HTTPError, ValueError) as exc:  # transport errors; JSON that does not parse
        if streamed_any:
            raise LLMError("stream_interrupted", "The model's answer was cut off; retry the turn.") from exc
        if isinstance(exc, ValueError):
            raise LLMError("malformed_stream", "The model's stream could not be read.", fallback_ok=True) from exc
        raise LLMError("model_unreachable", "The model server could not be reached.", fallback_ok=True) from exc
    if not streamed_any and not result.finish_reason:
        raise LLMError("malformed_stream", "The model's stream ended without an answer.", fallback_ok=True)
    # See _stream_one: no finish reason after some tokens means the stream was cut.
    if not result.finish_reason:
        raise LLMError("stream_interrupted", "The model's answer was cut off; retry the turn.")


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
        raise LLMError("egress_denied", f"The model endpoint's address is not allowed: {exc.message}",
                       fallback_ok=True) from exc


def _iterate(response: Any) -> Iterator[Any]:
    yield from response


def _close(response: Any) -> None:
    closer = getattr(response, "close", None) or getattr(getattr(response, "completion_stream", None), "close", None)
    if callable(closer):
        with contextlib.suppress(Exception):  # closing a stream we are abandoning
            closer()


def stream_chat(*, endpoints: list[ModelEndpoint], messages: list[dict[str, str]], temperature: float,
                max_tokens: int, response_format: dict[str, Any] | None = None,
                on_delta: Callable[[str], None], should_stop: Callable[[], bool]) -> StreamResult:
    """Stream a chat completion from the first endpoint that works, calling ``on_delta(text)``
    for every content delta. ``should_stop()`` is polled between chunks (cancellation).

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
        try:
            if endpoint.tenant_id is not None:
                _tenant_route_check(endpoint)
            stream(endpoint, messages, temperature=temperature, max_tokens=max_tokens,
                   response_format=response_format, on_delta=on_delta, should_stop=should_stop, result=result)
        except LLMError as error:
            last = error
            logger.warning("llm_call_failed", endpoint=endpoint.name, code=error.code,
                           cause=repr(error.__cause__)[:500], seconds=round(time.perf_counter() - started, 3))
            if error.fallback_ok and not result.text:
                continue
            if result.text:
                if result.input_tokens == 0 and result.output_tokens == 0:
                    result.usage_estimated = True
                    result.input_tokens = sum(estimate_tokens(m["content"]) for m in messages)
                    result.output_tokens = estimate_tokens(result.text)
                error.partial = result
            raise
        if result.input_tokens == 0 and result.output_tokens == 0:
            result.usage_estimated = True
            result.input_tokens = sum(estimate_tokens(m["content"]) for m in messages)
            result.output_tokens = estimate_tokens(result.text) if result.text else 0
        return result
    assert last is not None
    raise last


def price_per_token(per_million: Decimal) -> Decimal:
    """A price per million tokens as a price per token (the unit of usage events)."""
    return Decimal(per_million) / Decimal(1_000_000)
