"""The egress guard for code that speaks ``requests`` (django-allauth's OpenID Connect client).

``egress_requests_session()`` returns a ``requests.Session`` whose every request is sent by the
guard's own httpx client (``config.egress.egress_client``): the destination is resolved and
checked once per connection and the connection goes to exactly the checked address, with the
``Host`` header and TLS SNI on the name, no redirects, no environment proxies, and the guard's
size and time caps. A refusal surfaces as ``EgressRefused`` (a ``requests.ConnectionError``),
so callers that handle ``requests.RequestException`` (allauth's login views do) fail the way
they fail for an unreachable host instead of crashing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers

from config.egress import EgressDenied, EgressResponseRefused, egress_client


class EgressRefused(requests.exceptions.ConnectionError):
    """The egress guard refused the destination (or the response broke its caps)."""


def _httpx_timeout(timeout: Any) -> httpx.Timeout | None:
    """requests' ``timeout`` (seconds, a ``(connect, read)`` pair or ``None``) as httpx's."""
    if timeout is None:
        return None
    if isinstance(timeout, tuple):
        connect, read = timeout
        return httpx.Timeout(read, connect=connect)
    return httpx.Timeout(float(timeout))


class EgressAdapter(BaseAdapter):
    """A ``requests`` transport adapter that sends through the egress guard's httpx client."""

    def __init__(self) -> None:
        super().__init__()
        # A client per session, closed with it: no pooled connection outlives the session, so
        # every request the session makes reaches the guard's check on connect (an allow rule
        # removed since takes effect at once).
        self._client = egress_client(timeout=30.0)

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: bool | str = True, cert: Any = None,
             proxies: Mapping[str, str] | None = None) -> requests.Response:
        """Send ``request`` and return the whole response (read into memory, within the guard's
        size cap). Raises ``EgressRefused`` when the guard refuses, ``requests.Timeout`` on a
        timeout and ``requests.ConnectionError`` for other transport failures."""
        client = self._client
        headers = dict(request.headers)
        # The guard refuses compressed answers (their size is unknown until inflated).
        headers["Accept-Encoding"] = "identity"
        kwargs: dict[str, Any] = {"headers": headers, "content": request.body}
        if timeout is not None:
            kwargs["timeout"] = _httpx_timeout(timeout)
        try:
            answer = client.request(request.method or "GET", request.url or "", **kwargs)
        except EgressDenied as exc:
            raise EgressRefused(f"Refused by the egress guard: {exc.message}", request=request) from exc
        except EgressResponseRefused as exc:
            raise EgressRefused(f"Refused by the egress guard: {exc}", request=request) from exc
        except httpx.TimeoutException as exc:
            raise requests.exceptions.Timeout(str(exc) or "timed out", request=request) from exc
        except httpx.HTTPError as exc:
            raise requests.exceptions.ConnectionError(str(exc) or type(exc).__name__, request=request) from exc
        response = requests.Response()
        response.status_code = answer.status_code
        response.headers = CaseInsensitiveDict(answer.headers.items())
        response._content = answer.content
        response.encoding = get_encoding_from_headers(response.headers)
        response.reason = answer.reason_phrase
        response.url = request.url or ""
        response.request = request
        response.connection = self  # type: ignore[assignment]  # requests types it as HTTPAdapter
        return response

    def close(self) -> None:
        self._client.close()


def egress_requests_session(*, timeout: float | None = None) -> requests.Session:
    """A ``requests.Session`` that sends every request through the egress guard (see the module
    docstring), with ``timeout`` seconds per request when given. Environment proxies are ignored."""
    session = requests.Session()
    session.trust_env = False
    adapter = EgressAdapter()
    session.mount("http://", adapter)  # type: ignore[arg-type]  # any BaseAdapter works
    session.mount("https://", adapter)  # type: ignore[arg-type]
    if timeout is not None:
        original = session.request

        def request_with_timeout(method: str, url: str, **kwargs: Any) -> requests.Response:
            kwargs.setdefault("timeout", timeout)
            return original(method, url, **kwargs)

        session.request = request_with_timeout  # type: ignore[method-assign, assignment]
    return session
