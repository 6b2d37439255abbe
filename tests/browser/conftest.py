"""Debian's Chromium driven by Playwright, against the live daphne server of ``tests.live``.

Browser tests never use ``db`` / ``transactional_db`` / ``live_server``: the server could not
see rolled-back rows, and a flush would TRUNCATE the append-only audit tables (a trigger
refuses that). pytest-django creates the test database only when a collected test declares
that it uses one, so browser tests carry ``pytest.mark.django_db``: their own (empty,
rolled-back) transaction in this process is harmless, since they write nothing through it.

Playwright's sync API keeps an asyncio loop running in this thread while it is started, and
Django refuses ORM calls (including that rollback) while a loop runs. The browser is therefore
started and stopped by each test, inside the database fixture's lifetime, and browser tests do
any database work of their own before they open a page.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSWORD
from tests.live import Portal

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser(portal: Portal) -> Iterator[Any]:
    """Debian's Chromium, headless (never a downloaded browser), for one test."""
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api")
    playwright = sync_api.sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
    finally:
        playwright.stop()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """``new_page(java_script_enabled=...)``: a page in a fresh context (no cookies)."""
    contexts: list[Any] = []

    def make(**options: Any) -> Any:
        context = browser.new_context(**options)
        context.set_default_timeout(15_000)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def page(new_page: Callable[..., Any]) -> Any:
    return new_page()


def sign_in(page: Any, portal: Portal, email: str, *, host: str = "acme.localhost") -> None:
    """Sign in through the real login form and wait for the page it leads to."""
    page.goto(portal.url(host, "/accounts/login/"))
    page.locator("input[name=login]").fill(email)
    page.locator("input[name=password]").fill(PASSWORD)
    with page.expect_navigation():
        page.locator("form:has(input[name=password]) [type=submit]").click()



@pytest.fixture(scope="session")
def live_agent(django_db_setup: Any, django_db_blocker: Any, scripted_llm: Any) -> Any:
    """The published agent ``helpdesk-live`` of ``tests.agents.conftest.chat_world``, served by the
    scripted model ``live-main`` on the light tier (committed).

    Reuses the rows when the chat tests already made them in this session (they run first:
    ``tests/agents`` is collected before ``tests/browser``), else makes the same ones. Importing
    ``chat_world`` itself would register a second session fixture that creates them twice.
    """
    from django.db import connection
    from django_tenants.utils import schema_context

    from agents.models import Agent
    from agents.services import agent_create, agent_version_publish
    from tenants.models import ModelEndpoint
    from tenants.principal import Principal
    from tests.agents.conftest import ChatWorld, endpoint_create

    model = "live-main"
    scripted_llm.script(model)
    tenant = django_db_setup.tenant_a
    with django_db_blocker.unblock():
        if not ModelEndpoint.objects.filter(model=f"openai/{model}", api_base=scripted_llm.api_base).exists():
            endpoint_create(name="scripted light", model=model, api_base=scripted_llm.api_base, tier="light")
        with schema_context(tenant.schema_name):
            agent = Agent.objects.filter(slug="helpdesk-live").first()
            if agent is None:
                principal = Principal.system("tests", tenant=tenant)
                agent = agent_create(principal=principal, slug="helpdesk-live", name="Helpdesk (live)",
                                     config={"system_prompt": "Answer briefly.", "tier": "light"})
                agent_version_publish(principal=principal, version=agent.versions.get())
            agent_id = agent.pk
        connection.set_schema_to_public()  # type: ignore[attr-defined]  # django-tenants' wrapper
    return ChatWorld(agent_slug="helpdesk-live", agent_id=agent_id, model=model)
