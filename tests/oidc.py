"""A real OpenID Connect provider for the SSO tests: ``oidc-provider-mock`` run as a process on a
free port (``--require-nonce``, so an authorization request without a nonce fails), and the
tamper proxy of ``tests.oidc_tamper_proxy`` in front of it for tokens the mock cannot make.

Both listen on 127.0.0.1, which the egress guard refuses; ``idp_allowed`` opens their ports with
the staff allowlist (``EGRESS_ALLOWLIST``), as an operator would for an internal IdP.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from django.test import Client

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.terminate()
    raise RuntimeError(f"{url} did not answer in {STARTUP_TIMEOUT_S} s: {log.read_text()[-2000:]}")


@dataclasses.dataclass(frozen=True)
class Idp:
    """The running mock IdP and the tamper proxy in front of it."""

    port: int
    proxy_port: int

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tampered_issuer(self, mode: str) -> str:
        """The issuer of one of the proxy's modes (``tests.oidc_tamper_proxy.MODES``)."""
        return f"http://127.0.0.1:{self.proxy_port}/{mode}"

    @property
    def allowlist(self) -> list[str]:
        return [f"127.0.0.1:{self.port}", f"127.0.0.1:{self.proxy_port}"]

    def user_set(self, sub: str, **claims: Any) -> None:
        """Give the IdP's user ``sub`` these claims (``email``, ``groups``, ``name``...)."""
        response = httpx.put(f"{self.issuer}/users/{sub}", json=claims, timeout=10)
        assert response.status_code == 204, response.text

    def authorize(self, authorize_url: str, sub: str) -> str:
        """Sign ``sub`` in at the IdP's authorization page (the form a person submits); returns
        the redirect back to the portal's callback (with ``code`` and ``state``)."""
        response = httpx.post(authorize_url, data={"sub": sub}, timeout=10)
        assert response.status_code == 302, response.text[:500]
        return str(response.headers["location"])


def _start(args: list[str], log: Path, ready_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NO_COLOR": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)  # noqa: S603
    _wait_ready(process, ready_url, log)
    return process


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    """The mock IdP process and the tamper proxy process, for the whole session."""
    logs = tmp_path_factory.mktemp("idp")
    port, proxy_port = _free_port(), _free_port()
    mock = _start([sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1", "--port", str(port),
                   "--require-nonce"], logs / "mock.log",
                  f"http://127.0.0.1:{port}/.well-known/openid-configuration")
    try:
        proxy = _start([sys.executable, "-m", "tests.oidc_tamper_proxy", "--upstream", f"http://127.0.0.1:{port}",
                        "--port", str(proxy_port)], logs / "proxy.log",
                       f"http://127.0.0.1:{proxy_port}/resigned/.well-known/openid-configuration")
        try:
            yield Idp(port=port, proxy_port=proxy_port)
        finally:
            proxy.terminate()
            proxy.wait(10)
    finally:
        mock.terminate()
        mock.wait(10)


@pytest.fixture
def idp_allowed(idp: Idp, settings: Any) -> Idp:
    """``idp`` with its ports opened by the staff egress allowlist for this test."""
    settings.EGRESS_ALLOWLIST = idp.allowlist
    return idp


def sso_sign_in(client: Client, idp: Idp, *, provider_id: str, sub: str) -> Any:
    """The whole sign-in as a browser does it: POST the portal's "Sign in with" form, submit the
    IdP's authorization page as ``sub``, follow the redirect back to the portal's callback.
    Returns the portal's answer to the callback."""
    start = client.post(f"/accounts/oidc/{provider_id}/login/")
    assert start.status_code == 302, start.content[:500]
    callback = urlsplit(idp.authorize(start["Location"], sub))
    return client.get(f"{callback.path}?{callback.query}")
