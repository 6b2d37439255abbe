"""Property-based tests of the REST API from its own OpenAPI schema (schemathesis).

Every operation of ``/api/v1/openapi.json`` gets a bounded number of generated requests, valid
and invalid, sent in-process to the WSGI application on tenant A's host with an all-scopes API
key, inside the test's transaction (what they create is rolled back). Each answer must not be a
5xx, must have a status, media type and body that the schema documents for that operation, and
a request without credentials must get 401.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.test import Client
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi import checks as openapi_checks

import config.urls_tenant  # noqa: F401 - mounts every router on the API before its schema is read
from config.api import api
from tests.conftest import HOST_A, World

pytestmark = pytest.mark.django_db

API_ROOT = "/api/v1/"
# Generated requests per operation and generation mode (valid, then invalid data): enough to
# reach every documented answer of the operations, small enough that the whole run stays near a
# minute on two cores.
EXAMPLES_PER_OPERATION = 25

# The schema is built from the API object rather than fetched, so that the operations can be
# collected before the test database exists; test_the_served_schema_is_the_one_tested checks that
# it is the document /api/v1/openapi.json serves.
def _served_document() -> dict[str, Any]:
    """The OpenAPI document as JSON has it (status codes as strings)."""
    return json.loads(json.dumps(api.get_openapi_schema(path_prefix=API_ROOT)))  # type: ignore[no-any-return]


schema = schemathesis.openapi.from_dict(_served_document())
schema.app = get_wsgi_application()

# Every built-in check runs but one. positive_data_acceptance (ST202) expects every request the
# schema admits to succeed, but the schema gives field types while the services enforce the
# domain's rules (slug pattern, known roles, ids that exist, chunk sizes, NUL-free text) and
# answer those with the documented 4xx; the schema does not try to restate them.
EXCLUDED_CHECKS = [openapi_checks.positive_data_acceptance]


@pytest.fixture
def in_process_app(world: World, settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let the WSGI application run inside the test's transaction, as Django's test client does."""
    # Django closes "old" connections when a request starts and ends, which would end the test's
    # transaction (its test client turns this off the same way).
    for signal in (request_started, request_finished):
        signal.disconnect(close_old_connections)
    # A message sent to a generated session waits for its turn (or streams it until its deadline
    # and a grace period), which no worker runs here: keep those waits short.
    settings.CHAT_SYNC_WAIT_SECONDS = 0.05
    settings.CHAT_TURN_DEADLINE_SECONDS = 1
    monkeypatch.setattr("agents.api.STREAM_GRACE_SECONDS", 0.1)
    monkeypatch.setattr("agents.openai_api.STREAM_GRACE_SECONDS", 0.1)
    try:
        yield
    finally:
        for signal in (request_started, request_finished):
            signal.connect(close_old_connections)


def test_the_served_schema_is_the_one_tested(world: World) -> None:
    served = Client(HTTP_HOST=HOST_A).get(f"{API_ROOT}openapi.json")
    assert served.status_code == 200
    assert served.json() == _served_document()


def test_every_operation_documents_its_error_answers() -> None:
    document = _served_document()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            documented = {int(status) for status in operation["responses"]}
            assert {401, 403, 404, 422, 429} <= documented, (method, path)
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                assert {400, 415} <= documented, (method, path)
            if method in {"post", "put", "patch", "delete"}:
                assert {409, 413} <= documented, (method, path)
            error = operation["responses"]["422"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorOut"}


@pytest.mark.slow
@schema.parametrize()
# derandomize: the same examples on every run, so CI's verdict does not depend on a draw.
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_every_operation_answers_as_documented(case: schemathesis.Case, world: World, in_process_app: None) -> None:
    case.call_and_validate(base_url=f"http://{HOST_A}", headers={"Authorization": f"Bearer {world.key_a}"},
                           excluded_checks=EXCLUDED_CHECKS)
