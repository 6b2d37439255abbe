"""Web security settings: the Content-Security-Policy with nonces, HSTS and HTTPS in production,
``manage.py check --deploy`` on a production environment, and who may read ``/metrics``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core.checks import run_checks
from django.test import Client, override_settings

from tests.conftest import HOST_A, World, host_client, verified_staff_client

REPO = Path(__file__).resolve().parents[2]
NONCE_RE = re.compile(r"'nonce-([A-Za-z0-9+/=]+)'")


class _InlineCode(HTMLParser):
    """Collects what a Content-Security-Policy without 'unsafe-inline' refuses in a page: style=""
    and on*="" attributes, javascript: URLs, inline <script>/<style> elements without the nonce
    and scripts from other origins."""

    def __init__(self, nonce: str | None) -> None:
        super().__init__()
        self.nonce = nonce
        self.refused: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        for name, value in attrs:
            if name == "style" or name.startswith("on") or (value or "").strip().lower().startswith("javascript:"):
                self.refused.append(f"<{tag} {name}={value!r}>")
        # A <script type="application/json"> is data, never run; a src on this origin is 'self'.
        runs = tag == "script" and (names.get("type") or "text/javascript") in ("text/javascript", "module")
        src = names.get("src") or ""
        if runs and src and not (src.startswith("/") and not src.startswith("//")):
            self.refused.append(f"<script src={src!r}> from another origin")
        inline = (runs and not src) or tag == "style"
        if inline and (self.nonce is None or names.get("nonce") != self.nonce):
            self.refused.append(f"<{tag}> without the nonce")


def _refused_inline_code(html: str, nonce: str | None) -> list[str]:
    parser = _InlineCode(nonce)
    parser.feed(html)
    return parser.refused


def _policy(response: Any) -> tuple[dict[str, str], str | None]:
    """The Content-Security-Policy header as {directive: sources} and the nonce in script-src."""
    header = response.get("Content-Security-Policy")
    assert header, f"no Content-Security-Policy on {response.wsgi_request.path}"
    directives = dict((part.strip().split(" ", 1) + [""])[:2] for part in header.split(";") if part.strip())
    match = NONCE_RE.search(directives.get("script-src", ""))
    return directives, match.group(1) if match else None


# --- Content-Security-Policy --------------------------------------------------------------

CONSOLE_PAGES = ["/", "/agents/", "/agents/new/", "/kb/", "/kb/search/", "/chat/", "/members/", "/keys/",
                 "/audit/", "/settings/", "/models/", "/accounts/2fa/", "/accounts/2fa/setup/"]


@pytest.mark.parametrize("path", CONSOLE_PAGES)
def test_every_console_page_has_a_nonce_policy_and_no_inline_code_without_it(world: World, path: str) -> None:
    response = host_client(HOST_A, world.user("owner")).get(path)
    assert response.status_code == 200, path
    directives, nonce = _policy(response)
    assert nonce, directives
    assert directives["default-src"] == "'self'"
    assert directives["style-src"] == f"'self' 'nonce-{nonce}'"
    assert directives["object-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in response["Content-Security-Policy"]
    assert "unsafe-eval" not in response["Content-Security-Policy"]
    html = response.content.decode()
    assert f'nonce="{nonce}"' in html
    assert _refused_inline_code(html, nonce) == []


def test_each_response_gets_its_own_nonce(world: World) -> None:
    client = host_client(HOST_A, world.user("owner"))
    assert _policy(client.get("/"))[1] != _policy(client.get("/"))[1]


@pytest.mark.parametrize("path", ["/accounts/login/", "/accounts/password/reset/", "/accounts/signup/"])
@pytest.mark.parametrize("host", [HOST_A, "localhost"])
def test_the_sign_in_pages_have_the_policy_and_no_inline_code(world: World, host: str, path: str) -> None:
    response = Client(HTTP_HOST=host).get(path)
    assert response.status_code == 200, (host, path)
    _, nonce = _policy(response)
    assert _refused_inline_code(response.content.decode(), nonce) == []


@pytest.mark.parametrize("path", ["/admin/login/", "/admin/", "/admin/tenants/tenant/", "/admin/tenants/user/",
                                  "/admin/tenants/modelendpoint/add/"])
def test_the_staff_admin_pages_have_the_policy_and_no_inline_code(world: World, path: str) -> None:
    # The admin's login sends staff to the site's own sign-in (with two-factor verification).
    client = Client(HTTP_HOST="localhost") if path == "/admin/login/" else verified_staff_client(world)
    response = client.get(path, follow=True)
    assert response.status_code == 200, path
    _, nonce = _policy(response)
    assert _refused_inline_code(response.content.decode(), nonce) == []


def test_no_template_carries_inline_code_without_the_nonce() -> None:
    # Fragments rendered into a page (htmx swaps, chat events) are covered too: they are files here.
    refused = {}
    for template in sorted((REPO / "templates").rglob("*.html")):
        text = template.read_text(encoding="utf-8")
        text = re.sub(r"""\{% static ['"]([^'"]+)['"] %\}""", r"/static/\1", text)
        found = _refused_inline_code(text.replace("{{ request.csp_nonce }}", "NONCE"), "NONCE")
        if found:
            refused[str(template.relative_to(REPO))] = found
    assert refused == {}


# --- HTTPS and `check --deploy` in production ------------------------------------------------

def production_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The smallest environment a production process starts with (see README, Production)."""
    env = {name: value for name, value in os.environ.items()
           if name not in {"PYTEST_VERSION", "PYTEST_CURRENT_TEST", "DEBUG", "TEST_RUN_ID"}}
    env.update({
        "PORTAL_ENV": "production",
        "SECRET_KEY": "k" * 10 + Fernet.generate_key().decode(),
        "FIELD_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "AUDIT_SIGNING_KEYS": Fernet.generate_key().decode(),
        # Not connected to by `check`; the embedded server is for development only.
        "DATABASE_URL": "postgresql://portal@127.0.0.1:5432/portal",
        "PUBLIC_HOST": "portal.example.com",
        "BASE_DOMAIN": "portal.example.com",
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "METRICS_TOKEN": "a-scraper-token",
        "BEHIND_TLS_PROXY": "true",
        "PORTAL_VAR_DIR": str(tmp_path),
        **extra,
    })
    return env


def _manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env,  # noqa: S603 (fixed arguments)
                          capture_output=True, text=True, timeout=300, check=False)


def test_check_deploy_is_clean_with_a_production_environment(tmp_path: Path) -> None:
    result = _manage(production_env(tmp_path), "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_production_turns_on_hsts_and_the_https_redirect_by_default(tmp_path: Path) -> None:
    code = ("from django.conf import settings as s; print(s.SECURE_HSTS_SECONDS, s.SECURE_HSTS_INCLUDE_SUBDOMAINS, "
            "s.SECURE_SSL_REDIRECT, s.SECURE_PROXY_SSL_HEADER)")
    result = _manage(production_env(tmp_path), "shell", "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "31536000 True True ('HTTP_X_FORWARDED_PROTO', 'https')"


def test_production_without_a_metrics_token_or_port_fails_its_checks(tmp_path: Path) -> None:
    env = production_env(tmp_path)
    del env["METRICS_TOKEN"]
    result = _manage(env, "check")
    assert result.returncode != 0
    assert "portal.E030" in result.stderr


def test_development_keeps_hsts_off(settings: Any) -> None:
    # The test run has the development defaults (no PORTAL_ENV).
    assert settings.DEVELOPMENT and settings.SECURE_HSTS_SECONDS == 0 and not settings.SECURE_SSL_REDIRECT


# --- /metrics --------------------------------------------------------------------------------

@pytest.mark.parametrize(("token", "port", "refused"), [
    (None, None, True),
    ("a-scraper-token", None, False),
    (None, 9464, False),
])
def test_production_needs_a_metrics_token_or_a_metrics_port(world: World, token: str | None, port: int | None,
                                                             refused: bool) -> None:
    with override_settings(DEVELOPMENT=False, METRICS_TOKEN=token, METRICS_PORT=port):
        ids = {message.id for message in run_checks()}
    assert ("portal.E030" in ids) is refused


def test_development_needs_neither(world: World) -> None:
    with override_settings(DEVELOPMENT=True, METRICS_TOKEN=None, METRICS_PORT=None):
        assert "portal.E030" not in {message.id for message in run_checks()}


def test_metrics_need_the_token_when_one_is_set(world: World) -> None:
    with override_settings(METRICS_TOKEN="a-scraper-token", METRICS_PORT=None):
        assert Client(HTTP_HOST=HOST_A).get("/metrics").status_code == 401
        assert Client(HTTP_HOST=HOST_A).get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
        good = Client(HTTP_HOST=HOST_A).get("/metrics", HTTP_AUTHORIZATION="Bearer a-scraper-token")
    assert good.status_code == 200 and "django_http_requests" in good.content.decode()


def test_metrics_on_their_own_port_are_not_served_on_the_portals(world: World) -> None:
    with override_settings(METRICS_TOKEN=None, METRICS_PORT=9464):
        response = Client(HTTP_HOST=HOST_A).get("/metrics")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_a_metrics_port_serves_the_metrics_from_each_process(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = production_env(tmp_path, METRICS_PORT=str(port), METRICS_ADDRESS="127.0.0.1")
    del env["METRICS_TOKEN"]
    # The exporter starts with the process (django-prometheus' app); it reads its own metrics.
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').status)"
    result = _manage(env, "shell", "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "200"


def test_metrics_stay_open_in_development(world: World) -> None:
    with override_settings(METRICS_TOKEN=None, METRICS_PORT=None):
        assert Client(HTTP_HOST="10.0.0.1").get("/metrics").status_code == 200
