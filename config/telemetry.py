"""OpenTelemetry traces: SDK set-up from the standard ``OTEL_*`` variables, and the portal's spans.

Off by default. ``telemetry_setup`` installs a tracer provider and the official instrumentations
(Django, Celery, psycopg, redis, httpx) only when an exporter is asked for:

* ``OTEL_TRACES_EXPORTER`` names one or more (comma-separated) of ``otlp`` (OTLP over HTTP,
  configured by ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
  ``..._HEADERS`` and the rest of the standard variables) and ``console`` (JSON spans on stdout);
  ``none`` or unset exports nothing,
* or, with ``OTEL_TRACES_EXPORTER`` unset, ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, which means ``otlp``,
* or ``TELEMETRY_SPANS_FILE`` names a file: every finished span is appended there as one JSON line
  (the portal's own switch, for tests and debugging without a collector).

``OTEL_SDK_DISABLED=true`` turns all of it off. Sampling (``OTEL_TRACES_SAMPLER``), the service
name (``OTEL_SERVICE_NAME``, else the process's role) and resource attributes
(``OTEL_RESOURCE_ATTRIBUTES``) are read by the SDK itself.

Without set-up the spans below cost what the OpenTelemetry API's no-op tracer costs: a few
microseconds per turn, model call and tool call, nothing per token.

Context across processes: the Celery instrumentation sends the current span's context in each
task's headers and the worker continues that trace, so a turn's request, its task and its model
and tool calls share one trace id. Code that sends a turn's task after the request's span has
ended (a streamed response sends it once it listens) keeps the request's context with
``context_capture`` and sends within ``context_attached``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import IO, Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

F = TypeVar("F", bound=Callable[..., Any])

_tracer = trace.get_tracer("portal")
_setup_lock = threading.Lock()
_installed: dict[str, Any] = {}


def _exporter_names() -> list[str]:
    """The exporters ``OTEL_TRACES_EXPORTER`` and ``OTEL_EXPORTER_OTLP_*ENDPOINT`` ask for."""
    names = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                      or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    return [n for n in names if n != "none"]


def telemetry_enabled() -> bool:
    """Whether ``telemetry_setup`` would install anything with the current environment."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(_exporter_names() or os.environ.get("TELEMETRY_SPANS_FILE"))


class _JsonLinesFile:
    """Where ``TELEMETRY_SPANS_FILE`` spans go: one JSON object per line, appended under a lock."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._out: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life

    def write(self, text: str) -> int:
        with self._lock:
            return self._out.write(text)

    def flush(self) -> None:
        with self._lock:
            self._out.flush()


def telemetry_setup(*, service: str) -> bool:
    """Install the tracer provider, its exporters and the instrumentations for this process, once,
    when ``telemetry_enabled()``; ``service`` is the default ``service.name`` (``OTEL_SERVICE_NAME``
    wins). Returns whether tracing is on. Call it from a process's entry point before Django
    builds its middleware (``config.asgi``) or before a worker runs tasks (``config.celery``).

    Raises ``ValueError`` for an exporter name other than ``otlp``, ``console`` or ``none``.
    """
    with _setup_lock:
        if _installed:
            return True
        if not telemetry_enabled():
            return False
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

        names = _exporter_names()
        unknown = sorted(set(names) - {"otlp", "console"})
        if unknown:
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter(s) {', '.join(unknown)}; "
                             "use otlp, console or none.")
        attributes: dict[str, Any] = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
        provider = TracerProvider(resource=Resource.create(attributes))
        if "otlp" in names:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        if "console" in names:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        spans_file = os.environ.get("TELEMETRY_SPANS_FILE")
        if spans_file:
            # Written as each span ends, so a test reading the file sees every finished span.
            out = _JsonLinesFile(spans_file)
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
                out=out, formatter=lambda span: span.to_json(indent=None) + "\n")))  # type: ignore[arg-type]
        trace.set_tracer_provider(provider)
        _instrument()
        _installed["provider"] = provider
        return True


def _instrument() -> None:
    from django.conf import settings
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    # Probes and scrapes would be most of the traces and say nothing.
    os.environ.setdefault("OTEL_PYTHON_DJANGO_EXCLUDED_URLS", "healthz,readyz,metrics")
    # The request span starts after ProbeMiddleware: the instrumentation reads the request's host
    # (Django's get_host, which refuses a host outside ALLOWED_HOSTS), and probes answer on any host.
    probe = "config.middleware.ProbeMiddleware"
    middleware = list(settings.MIDDLEWARE)
    position = middleware.index(probe) + 1 if probe in middleware else 0
    os.environ.setdefault("OTEL_PYTHON_DJANGO_MIDDLEWARE_POSITION", str(position))
    DjangoInstrumentor().instrument()
    if importlib.util.find_spec("opentelemetry.instrumentation.asgi") is None:
        # The Django instrumentation skips ASGI requests without it: no request spans, though
        # tasks, queries and model calls are still traced.
        logging.getLogger(__name__).warning(
            "opentelemetry-instrumentation-asgi is not installed: requests served over ASGI get no spans")
    CeleryInstrumentor().instrument()
    PsycopgInstrumentor().instrument(enable_commenter=False)
    RedisInstrumentor().instrument()
    HTTPXClientInstrumentor().instrument()


def telemetry_shutdown() -> None:
    """Flush and stop the exporters (a worker's last spans are not lost at exit)."""
    provider = _installed.get("provider")
    if provider is not None:
        provider.shutdown()


def telemetry_setup_for_command(argv: list[str]) -> bool:
    """``telemetry_setup`` for the long-running management commands (``rqworker``); other
    commands (migrations, shells) stay untraced. Returns whether tracing is on."""
    if len(argv) > 1 and argv[1] == "rqworker":
        return telemetry_setup(service="portal-rq")
    return False


# --- Spans --------------------------------------------------------------------------------


@contextlib.contextmanager
def span(name: str, attributes: dict[str, Any] | None = None) -> Iterator[Span]:
    """A span named ``name`` around the block, current inside it, child of the current span;
    an exception leaving the block is recorded and marks the span as an error."""
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def traced(name: str, attributes: Callable[[tuple[Any, ...], dict[str, Any]], dict[str, Any]] | None = None,
           result_attributes: Callable[[Any], dict[str, Any]] | None = None) -> Callable[[F], F]:
    """Decorate a function to run in a span ``name``, with ``attributes(args, kwargs)`` set at the
    start and ``result_attributes(result)`` at the end."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with _tracer.start_as_current_span(name) as current:
                if attributes is not None and current.is_recording():
                    current.set_attributes(attributes(args, kwargs))
                result = function(*args, **kwargs)
                if result_attributes is not None and current.is_recording():
                    current.set_attributes(result_attributes(result))
                return result

        return wrapper  # type: ignore[return-value]

    return decorate


def context_capture() -> otel_context.Context:
    """The current OpenTelemetry context (the request's span), to attach later elsewhere."""
    return otel_context.get_current()


@contextlib.contextmanager
def context_attached(captured: otel_context.Context | None) -> Iterator[None]:
    """Make ``captured`` (from ``context_capture``) current inside the block."""
    if captured is None:
        yield
        return
    token = otel_context.attach(captured)
    try:
        yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def llm_call_observed(endpoint: Any, result: Any, *, metrics: bool = True) -> Iterator[None]:
    """Observe one model call of ``endpoint`` (a ``ModelEndpoint``) filling ``result`` (a
    ``StreamResult``): a span ``llm.call`` (GenAI semantic-convention attributes:
    ``gen_ai.request.model``, ``gen_ai.usage.input_tokens`` / ``output_tokens``; and
    ``portal.endpoint``, ``portal.tier``, ``portal.llm.ttft_ms``), and the model-call metrics
    (``config.metrics.llm_call_record``, unless ``metrics`` is false). Token counts are read
    when the block exits, so the block must include their estimation."""
    from config.metrics import llm_call_record

    started = time.perf_counter()
    attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": endpoint.model,
                  "portal.endpoint": endpoint.name, "portal.tier": endpoint.tier}
    with _tracer.start_as_current_span("llm.call", attributes=attributes) as current:
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            first = getattr(result, "first_token_at", None)
            ttft = (first - started) if first is not None else None
            if metrics:
                llm_call_record(tier=str(endpoint.tier), endpoint=str(endpoint.name), seconds=seconds,
                                ttft_seconds=ttft, input_tokens=result.input_tokens,
                                output_tokens=result.output_tokens)
            if current.is_recording():
                current.set_attributes({"gen_ai.usage.input_tokens": result.input_tokens,
                                        "gen_ai.usage.output_tokens": result.output_tokens,
                                        "gen_ai.response.finish_reasons": [result.finish_reason or ""]})
                if ttft is not None:
                    current.set_attribute("portal.llm.ttft_ms", round(ttft * 1000, 1))


def span_error(current: Span, code: str) -> None:
    """Mark ``current`` failed with the portal's error ``code`` (``error.type``)."""
    if current.is_recording():
        current.set_attribute("error.type", code)
        current.set_status(Status(StatusCode.ERROR, code))


def current_ids() -> tuple[str, str] | None:
    """The current span's ``(trace_id, span_id)`` as 32 and 16 lowercase hex digits, or ``None``
    outside a recording span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def add_trace_ids(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: ``trace_id`` and ``span_id`` on every line written inside a span."""
    ids = current_ids()
    if ids is not None:
        event.setdefault("trace_id", ids[0])
        event.setdefault("span_id", ids[1])
    return event


def spans_read(path: str) -> list[dict[str, Any]]:
    """The spans a ``TELEMETRY_SPANS_FILE`` holds, as dicts (``ReadableSpan.to_json``)."""
    with open(path, encoding="utf-8") as source:
        return [json.loads(line) for line in source if line.strip()]
