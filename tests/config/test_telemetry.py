"""OpenTelemetry set-up (``config.telemetry``): off without ``OTEL_*``, on with an exporter, probes
still answered on any host when on, and trace ids on log lines written inside a span.

Set-up installs process-wide state (the tracer provider, instrumented libraries), so it is
checked in fresh Python processes; the log processor is checked here with a local provider.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from config import telemetry
from config.logging import _SHARED_PROCESSORS
from tests.live import REPO, _database_url

PROBE = r"""
import json, os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
from config.telemetry import span, telemetry_setup
on = telemetry_setup(service="probe")
import django
django.setup()
import psycopg
from django.conf import settings
from django.test import Client
from opentelemetry import trace
with span("probe.span", {"probe": 1}):
    pass
print(json.dumps({
    "on": on,
    "provider": type(trace.get_tracer_provider()).__name__,
    "middleware": [m for m in settings.MIDDLEWARE if "opentelemetry" in m],
    "middleware_after_probe": settings.MIDDLEWARE.index("config.middleware.ProbeMiddleware") + 1,
    "middleware_index": [i for i, m in enumerate(settings.MIDDLEWARE) if "opentelemetry" in m],
    "psycopg_wrapped": hasattr(psycopg.connect, "__wrapped__"),
    "healthz": Client(HTTP_HOST="10.0.0.1").get("/healthz").status_code,
}))
"""


def _probe(extra: dict[str, str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TELEMETRY_"))}
    env.update({"DATABASE_URL": _database_url(), **extra})
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True,  # noqa: S603
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_without_otel_variables_nothing_is_installed_or_exported(db: Any, tmp_path: Path) -> None:
    seen = _probe({})
    assert seen["on"] is False
    assert seen["provider"] == "ProxyTracerProvider"  # the API's no-op until an SDK is installed
    assert seen["middleware"] == []
    assert seen["psycopg_wrapped"] is False
    assert seen["healthz"] == 200


def test_a_spans_file_installs_the_sdk_and_instrumentations_and_probes_still_answer_any_host(
    db: Any, tmp_path: Path
) -> None:
    spans = tmp_path / "spans.jsonl"
    seen = _probe({"TELEMETRY_SPANS_FILE": str(spans), "OTEL_SERVICE_NAME": "probe-service"})
    assert seen["on"] is True
    assert seen["provider"] == "TracerProvider"
    assert len(seen["middleware"]) == 1 and seen["middleware_index"] == [seen["middleware_after_probe"]]
    assert seen["psycopg_wrapped"] is True
    assert seen["healthz"] == 200  # a host outside ALLOWED_HOSTS, as a kubelet sends
    written = telemetry.spans_read(str(spans))
    probe = next(s for s in written if s["name"] == "probe.span")
    assert probe["attributes"] == {"probe": 1}
    assert probe["resource"]["attributes"]["service.name"] == "probe-service"


def test_the_sdk_disabled_switch_wins(db: Any, tmp_path: Path) -> None:
    seen = _probe({"TELEMETRY_SPANS_FILE": str(tmp_path / "s.jsonl"), "OTEL_SDK_DISABLED": "true"})
    assert seen["on"] is False and seen["middleware"] == []
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize(("env", "enabled"), [
    ({}, False),
    ({"OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
    ({"TELEMETRY_SPANS_FILE": "var/spans.jsonl"}, True),
])
def test_which_variables_turn_tracing_on(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                         enabled: bool) -> None:
    for name in list(os.environ):
        if name.startswith(("OTEL_", "TELEMETRY_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert telemetry.telemetry_enabled() is enabled


def test_an_unknown_exporter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp,zipkin")
    with pytest.raises(ValueError, match="zipkin"):
        telemetry.telemetry_setup(service="test")
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Every log line, rendered as JSON by the project's processors, at INFO and above."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer()],
        foreign_pre_chain=_SHARED_PROCESSORS,
    ))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_log_lines_inside_a_span_carry_its_trace_and_span_ids(json_logs: io.StringIO) -> None:
    tracer = TracerProvider().get_tracer("test")
    with trace.use_span(tracer.start_span("work"), end_on_exit=True) as current:
        structlog.get_logger("tests.telemetry").warning("inside_span")
        logging.getLogger("tests.telemetry.stdlib").warning("inside_span_stdlib")
        context = current.get_span_context()
    structlog.get_logger("tests.telemetry").warning("outside_span")

    lines = {line["event"]: line for line in map(json.loads, json_logs.getvalue().splitlines())}
    for event in ("inside_span", "inside_span_stdlib"):
        assert lines[event]["trace_id"] == format(context.trace_id, "032x")
        assert lines[event]["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in lines["outside_span"] and "span_id" not in lines["outside_span"]
