"""A Celery worker serves the metrics it records on its own port, as the Helm chart's worker pods do.

In Kubernetes the workers share no ``PROMETHEUS_MULTIPROC_DIR`` with web, so the model calls, turns
and tool calls they record reach Prometheus only through ``METRICS_PORT`` (django-prometheus'
exporter in the worker process, scraped by the chart's PodMonitor). ``celery_worker`` runs with
``METRICS_PORT`` and without a multiprocess directory; one REST turn through the live server must
show up on that port.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tenants.models import ModelEndpoint
from tests.agents.conftest import calculator_agent_committed, committed
from tests.live import Portal
from tests.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.django_db(transaction=False)

SCRAPE_WAIT_S = 30.0

Samples = dict[str, list[tuple[dict[str, str], float]]]

_endpoints: list[int] = []


@pytest.fixture(scope="module", autouse=True)
def _endpoints_removed(django_db_blocker: Any) -> Iterator[None]:
    yield
    with django_db_blocker.unblock():
        committed(lambda: ModelEndpoint.objects.filter(pk__in=_endpoints).delete())


def _scrape(port: int) -> Samples | None:
    """The worker's exposition on ``port``, parsed; None while nothing answers there."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except httpx.TransportError:
        return None
    assert response.status_code == 200, response.text[:300]
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == want for k, want in labels.items()))


def _scrape_until(port: int, done: Any) -> Samples:
    """Scrape ``port`` until ``done(samples)`` holds (the exporter starts with the worker; a turn's
    counter is incremented when its final state commits); the last samples otherwise."""
    deadline = time.monotonic() + SCRAPE_WAIT_S
    samples: Samples = {}
    while time.monotonic() < deadline:
        samples = _scrape(port) or {}
        if samples and done(samples):
            return samples
        time.sleep(0.1)  # polling the worker, not asserting on time
    return samples


def _agent(portal: Portal, llm: ScriptedLLM) -> str:
    """A committed agent that calls ``calculator`` once, then answers (``calculator_agent_committed``)."""
    return calculator_agent_committed(tenant=portal.world.tenant_a, llm=llm, prefix="wm", endpoints=_endpoints)


def test_a_celery_worker_serves_the_model_calls_and_turns_it_ran_on_its_metrics_port(
    portal: Portal, celery_worker: Any, celery_metrics_port: int, scripted_llm: ScriptedLLM
) -> None:
    before = _scrape_until(celery_metrics_port, lambda samples: True)
    assert before, f"nothing serves metrics on the worker's port {celery_metrics_port}"
    completed_before = _value(before, "portal_turns_total", status="completed", error_code="")
    tools_before = _value(before, "portal_tool_calls_total", tool="calculator", status="ok")
    slug = _agent(portal, scripted_llm)

    with httpx.Client(base_url=f"http://127.0.0.1:{portal.port}", timeout=60,
                      headers={"Host": f"acme.localhost:{portal.port}",
                               "Authorization": f"Bearer {portal.world.key_a}"}) as api:
        session = api.post("/api/v1/sessions", json={"agent": slug})
        assert session.status_code == 201, session.text
        response = api.post(f"/api/v1/sessions/{session.json()['id']}/messages",
                            json={"content": "What is 6 times 7?"})
    assert response.status_code == 200, response.text
    assert "42" in response.json()["content"]

    after = _scrape_until(celery_metrics_port, lambda samples: _value(
        samples, "portal_turns_total", status="completed", error_code="") > completed_before)
    # The worker ran both model calls of the turn (the tool call, then the answer) on this endpoint.
    assert _value(after, "portal_model_call_seconds_count", tier="light", endpoint=slug) == 2
    assert _value(after, "portal_model_call_seconds_sum", tier="light", endpoint=slug) > 0
    assert _value(after, "portal_model_ttft_seconds_count", tier="light", endpoint=slug) == 2
    assert _value(after, "portal_turns_total", status="completed", error_code="") == completed_before + 1
    assert _value(after, "portal_tool_calls_total", tool="calculator", status="ok") == tools_before + 1
    assert _value(after, "portal_model_tokens_total", tier="light", kind="prompt") >= 84  # 42 per call
    # The scrape-time gauges are web's alone: a worker's port must not repeat them (the sums
    # over every scraped pod would count each queue once per worker).
    assert "portal_queue_depth" not in after and "portal_approvals_pending" not in after
