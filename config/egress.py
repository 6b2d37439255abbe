"""The egress guard: every server-side request to a URL a tenant supplied goes through here.

Two halves share one rule set:

- ``egress_check_url(url)`` at save time: parses the URL, normalizes the host (IDNA/UTS #46,
  every numeric IPv4 spelling, a trailing dot), resolves it once and refuses it unless every
  address and the port are allowed. Raises ``EgressDenied`` (HTTP 422, code ``egress_denied``)
  whose message says why.
- ``egress_client()`` at connect time: an httpx client whose network backend repeats the check
  for each new connection and then connects to exactly the addresses it checked (pinning: no
  second lookup, so a name that re-resolves to a private address between check and connect
  cannot reach it), keeping the ``Host`` header and TLS SNI on the host name. It follows no
  redirects (and would check every hop the same way if a caller turned them on), ignores proxy
  environment variables, and caps each response's size and total time.

The rules: http and https only; no user info in the URL; ports 80 and 443 only; every resolved
address public (see ``address_refusal`` for the refused ranges, taken from the IANA IPv4 and IPv6
Special-Purpose Address Registries plus RFC 6598 shared space and the cloud metadata
addresses). The staff allowlist (``EGRESS_ALLOWLIST`` and the ``EgressAllowRule`` rows edited on
the staff admin) is the only way to open a private address or another port; nothing opens the
cloud metadata services.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
import idna
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from config.errors import ValidationFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# ``resolver(host, port)`` -> the host's addresses as text, in the order to try them.
Resolver = Callable[[str, int], Iterable[str]]

SCHEMES = {"http": 80, "https": 443}
DEFAULT_PORTS = frozenset(SCHEMES.values())


class EgressDenied(ValidationFailed):
    """A request to a tenant-supplied URL that the guard refuses; ``message`` says why (HTTP 422)."""

    code = "egress_denied"


class EgressResponseRefused(httpx.ReadError):
    """A response over the size cap, or compressed although identity was asked for."""


# --- Address and name classification --------------------------------------------------------

# Cloud metadata services: AWS/GCP/Azure/OpenStack (169.254.169.254), AWS ECS task metadata
# (169.254.170.2), AWS IMDS over IPv6 (fd00:ec2::254), Alibaba Cloud (100.100.100.200), Oracle
# Cloud (192.0.0.192). No allow rule opens them.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192"))
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                            "instance-data.ec2.internal"})
# Names that are local by definition (RFC 6761 localhost, RFC 6762 .local, RFC 8375 home.arpa,
# the ICANN-reserved private TLD .internal): refused unless an allow rule names the host.
_LOCAL_SUFFIXES = ("localhost", "local", "internal", "home.arpa", "localdomain")

_V4_REFUSED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified (this network, RFC 791)"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared carrier-grade NAT space (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "reserved for IETF protocol assignments"),
    ("192.0.2.0/24", "reserved for documentation"),
    ("192.88.99.0/24", "the deprecated 6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "reserved for benchmarking"),
    ("198.51.100.0/24", "reserved for documentation"),
    ("203.0.113.0/24", "reserved for documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_V6_REFUSED: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "an IPv4-compatible address (deprecated)"),
    ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
    ("100::/64", "discard-only"),
    ("2001::/32", "a Teredo tunnel address"),
    ("2001::/23", "reserved for IETF protocol assignments"),
    ("2001:db8::/32", "reserved for documentation"),
    ("3fff::/20", "reserved for documentation"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
_V4_NETWORKS = tuple((ipaddress.IPv4Network(n), why) for n, why in _V4_REFUSED)
_V6_NETWORKS = tuple((ipaddress.IPv6Network(n), why) for n, why in _V6_REFUSED)
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_NAT64_V6 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix


def _embedded_v4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address inside an IPv4-mapped, NAT64, 6to4 or Teredo IPv6 address."""
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", address.ipv4_mapped
    if address in _NAT64_V6:
        return "NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return "6to4", address.sixtofour
    if address.teredo is not None:
        return "Teredo", address.teredo[1]
    return None


def _is_metadata(address: IPAddress) -> bool:
    """A cloud metadata address, also inside an IPv4-mapped/NAT64/6to4/Teredo IPv6 address (a
    Linux IPv6 socket reaches ``::ffff:169.254.169.254`` as the IPv4 address)."""
    if address in METADATA_ADDRESSES:
        return True
    embedded = _embedded_v4(address) if isinstance(address, ipaddress.IPv6Address) else None
    return embedded is not None and embedded[1] in METADATA_ADDRESSES


def address_refusal(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address, or ``None`` when it is.

    Refused: loopback, unspecified, RFC 1918 private, RFC 6598 CGNAT, link-local, multicast,
    reserved, documentation and benchmarking ranges, IPv6 unique-local/link-local/site-local,
    anything outside IPv6 global unicast (2000::/3), the cloud metadata addresses, and
    IPv4-mapped/NAT64/6to4/Teredo forms of a refused IPv4 address (Teredo always).
    """
    if _is_metadata(address):
        return "a cloud metadata service"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_v4(address)
        if embedded is not None:
            form, inner = embedded
            reason = address_refusal(inner)
            if reason is not None:
                return f"the {form} form of {inner}, which is {reason}"
            if form != "Teredo":  # a translation of a public IPv4 address
                return None
        for network, why in _V6_NETWORKS:
            if address in network:
                return why
        if address not in _GLOBAL_UNICAST_V6:
            return "reserved (outside IPv6 global unicast)"
        return None
    for v4_network, why in _V4_NETWORKS:
        if address in v4_network:
            return why
    return None


def _name_refusal(host: str) -> str | None:
    # Metadata names are refused before any rule is consulted (egress_check_host).
    if any(host == suffix or host.endswith(f".{suffix}") for suffix in _LOCAL_SUFFIXES):
        return "a local-only name"
    return None


# --- Host normalization ----------------------------------------------------------------------

_IPV4_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")


def _parse_ipv4_number(part: str) -> int:
    if part[:2].lower() == "0x":
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        return int(part, 8)  # raises ValueError for 8 and 9, as inet_aton refuses them
    return int(part)


def _ipv4_of(host: str) -> ipaddress.IPv4Address | None:
    """The address a numeric IPv4 host means in any spelling inet_aton and the WHATWG URL parser
    accept (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``), or ``None`` when the
    host is a name. Raises ``EgressDenied`` for a numeric host that is no valid address."""
    parts = host.split(".")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]
    if not _IPV4_PART.match(parts[-1]):
        return None  # a name: its last label is not a number (WHATWG "ends in a number")
    try:
        if len(parts) > 4 or not all(_IPV4_PART.match(p) for p in parts):
            raise ValueError(host)
        numbers = [_parse_ipv4_number(p) for p in parts]
        if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
            raise ValueError(host)
        value = numbers[-1]
        for index, number in enumerate(numbers[:-1]):
            value += number << (8 * (3 - index))
        return ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise EgressDenied(f"The host “{host}” is not a valid IPv4 address.") from exc


def normalize_host(raw: str) -> tuple[str, IPAddress | None]:
    """``(host, address)``: the host in lowercase ASCII (IDNA 2008 with UTS #46 mapping, one
    trailing dot removed) and, for an IP literal in any spelling, its address.

    Raises ``EgressDenied`` for an empty, malformed or non-IDNA host, or an IPv6 zone index.
    """
    host = raw.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise EgressDenied("The URL has no host.")
    if ":" in host:
        if "%" in host:
            raise EgressDenied("IPv6 zone indexes are not allowed.")
        try:
            v6 = ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise EgressDenied(f"The host “{raw}” is not a valid IPv6 address.") from exc
        return str(v6), v6
    try:
        # UTS #46 first, so full-width digits and dots are read as the address they spell.
        mapped = idna.uts46_remap(host, std3_rules=True, transitional=False)
    except idna.IDNAError as exc:
        raise EgressDenied(f"The host “{raw}” is not a valid host name.") from exc
    v4 = _ipv4_of(mapped)
    if v4 is not None:
        return str(v4), v4
    mapped = mapped[:-1] if mapped.endswith(".") else mapped
    try:
        ascii_host = idna.encode(mapped).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as exc:
        raise EgressDenied(f"The host “{raw}” is not a valid host name.") from exc
    if len(ascii_host) > 253:
        raise EgressDenied("The host name is too long.")
    return ascii_host, None


# --- The allowlist -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowRule:
    """One staff allow rule: a host name or an IP network, and the port it opens (``None``: 80
    and 443). A host rule admits whatever that exact name resolves to; a network rule admits its
    addresses under any name."""

    host: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def matches(self, *, host: str, address: IPAddress, port: int) -> bool:
        """Whether the rule admits a connection to ``address`` (reached as ``host``) on ``port``."""
        port_ok = port in DEFAULT_PORTS if self.port is None else port == self.port
        if not port_ok:
            return False
        if self.host is not None:
            return host == self.host
        return self.network is not None and address.version == self.network.version and address in self.network

    def __str__(self) -> str:
        target = self.host or str(self.network)
        if self.port is None:
            return target
        return f"[{target}]:{self.port}" if ":" in target else f"{target}:{self.port}"


def allow_rule_parse(text: str, port: int | None = None) -> AllowRule:
    """Parse ``host``, ``host:port``, ``10.0.0.0/8``, ``10.1.2.3:8001``, ``[fd00::/8]:8000`` or
    a bare IPv6 address/network; ``port`` (when given) overrides one in ``text``.

    Raises ``ValueError`` with a readable message for anything else.
    """
    target, given_port = text.strip(), None
    if target.startswith("["):
        inside, bracket, rest = target[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"Cannot read “{text}”.")
        target, given_port = inside, rest[1:] or None
    elif target.count(":") == 1:
        target, given_port = target.split(":")
    if given_port is not None:
        if not given_port.isdigit() or not 0 < int(given_port) < 65536:
            raise ValueError(f"Bad port in “{text}”.")
        port = port if port is not None else int(given_port)
    if port is not None and not 0 < port < 65536:
        raise ValueError("A port is between 1 and 65535.")
    if not target:
        raise ValueError("A rule needs a host name or an IP network.")
    if "/" in target or ":" in target or _looks_numeric(target):
        try:
            return AllowRule(network=ipaddress.ip_network(target, strict=False), port=port)
        except ValueError as exc:
            raise ValueError(f"“{target}” is not an IP address or network.") from exc
    try:
        host, _ = normalize_host(target)
    except EgressDenied as exc:
        raise ValueError(exc.message) from exc
    return AllowRule(host=host, port=port)


def _looks_numeric(target: str) -> bool:
    return all(part.isdigit() for part in target.split("."))


@lru_cache(maxsize=8)
def _setting_rules(entries: tuple[str, ...]) -> tuple[AllowRule, ...]:
    rules = []
    for entry in entries:
        try:
            rules.append(allow_rule_parse(entry))
        except ValueError as exc:
            raise ImproperlyConfigured(f"EGRESS_ALLOWLIST: {exc}") from exc
    return tuple(rules)


def allow_rules() -> list[AllowRule]:
    """The staff allowlist now: ``EGRESS_ALLOWLIST`` and the enabled ``EgressAllowRule`` rows.

    Raises ``ImproperlyConfigured`` for an unreadable ``EGRESS_ALLOWLIST`` entry. A row that no
    longer parses (the admin validates them) is skipped rather than opening anything.
    """
    # Imported here: config/ holds no models, and the rows live in the tenants app.
    from tenants.models import EgressAllowRule

    rules = list(_setting_rules(tuple(settings.EGRESS_ALLOWLIST)))
    for target, port in EgressAllowRule.objects.filter(enabled=True).values_list("target", "port"):
        with contextlib.suppress(ValueError):
            rules.append(allow_rule_parse(target, port))
    return rules


# --- Resolution and the check -----------------------------------------------------------------


def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's answer for ``host`` (``getaddrinfo``), deduplicated, in its order.
    Raises ``OSError`` (``socket.gaierror``) when the name does not resolve."""
    seen: dict[str, None] = {}
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


_resolver: Resolver = system_resolver


@contextlib.contextmanager
def resolver_override(resolver: Resolver) -> Iterator[None]:
    """Use ``resolver`` instead of the system's for every check inside the block (tests: DNS is
    a process boundary)."""
    global _resolver
    previous, _resolver = _resolver, resolver
    try:
        yield
    finally:
        _resolver = previous


@dataclass(frozen=True)
class EgressTarget:
    """A checked destination: the normalized host, the port, and the addresses that may be
    connected to (every address the host resolved to, each allowed), in the order to try."""

    host: str
    port: int
    addresses: tuple[str, ...]


def egress_check_host(host: str, port: int, *, resolver: Resolver | None = None,
                      rules: Sequence[AllowRule] | None = None) -> EgressTarget:
    """Normalize ``host``, resolve it once (IP literals are not looked up) and check every
    address with ``port`` against the rules. ``rules`` defaults to ``allow_rules()``.

    Raises ``EgressDenied`` naming the first refused address and why, or saying the name does
    not resolve.
    """
    name, literal = normalize_host(host)
    if name in METADATA_NAMES:
        raise EgressDenied(f"“{name}” is a cloud metadata service name.")
    rules = allow_rules() if rules is None else rules
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        try:
            answer = list((resolver or _resolver)(name, port))
            addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in answer]
        except (OSError, UnicodeError, ValueError) as exc:
            raise EgressDenied(f"The host “{name}” could not be resolved.") from exc
        if not addresses:
            raise EgressDenied(f"The host “{name}” could not be resolved.")
    for address in addresses:
        _check_address(name, address, port, rules)
    return EgressTarget(host=name, port=port, addresses=tuple(dict.fromkeys(str(a) for a in addresses)))


def _check_address(host: str, address: IPAddress, port: int, rules: Sequence[AllowRule]) -> None:
    shown = host if str(address) == host else f"{host} ({address})"
    if _is_metadata(address):
        raise EgressDenied(f"{shown} is a cloud metadata service.")
    if any(rule.matches(host=host, address=address, port=port) for rule in rules):
        return
    name_reason = _name_refusal(host)
    if name_reason is not None:
        raise EgressDenied(f"“{host}” is {name_reason}; only the staff egress allowlist can open it.")
    reason = address_refusal(address)
    if reason is not None:
        raise EgressDenied(f"{shown} is {reason}; only the staff egress allowlist can open it.")
    if port not in DEFAULT_PORTS:
        raise EgressDenied(f"Port {port} is not allowed (only 80 and 443 unless the staff egress allowlist "
                           "names another).")


def egress_check_url(url: str, *, resolver: Resolver | None = None,
                     rules: Sequence[AllowRule] | None = None) -> EgressTarget:
    """Check a tenant-supplied URL before saving it: http or https, no user info, no
    backslashes or whitespace, then ``egress_check_host`` on its host and port.

    Returns the ``EgressTarget``; raises ``EgressDenied`` saying why.
    """
    if "\\" in url or any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        # Backslashes and control characters are read differently by different URL parsers.
        raise EgressDenied("The URL contains characters that are not allowed (backslash, space or control).")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise EgressDenied("The URL cannot be read (bad host or port).") from exc
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise EgressDenied("Only http:// and https:// URLs are allowed.")
    if "@" in parts.netloc:
        raise EgressDenied("User names and passwords in the URL are not allowed.")
    if not parts.hostname:
        raise EgressDenied("The URL has no host.")
    return egress_check_host(parts.hostname, port if port is not None else SCHEMES[scheme], resolver=resolver,
                             rules=rules)


# --- The guarded HTTP client --------------------------------------------------------------


class EgressNetworkBackend(httpcore.SyncBackend):
    """httpcore's socket backend, checking each new connection first: ``connect_tcp(host,
    port)`` runs ``egress_check_host`` and connects to the checked addresses only (the first that
    accepts), never looking the name up again. TLS (started by httpcore on the returned stream)
    still sends the host name as SNI and verifies the certificate against it."""

    def __init__(self, *, resolver: Resolver | None = None) -> None:
        self._resolver = resolver

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        target = egress_check_host(host, port, resolver=self._resolver)
        last: Exception | None = None
        for address in target.addresses:
            try:
                return super().connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                           socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise EgressDenied("Unix sockets are not reachable through the egress guard.")


class _CappedStream(httpx.SyncByteStream):
    """A response body that stops past ``max_bytes`` or after ``deadline`` (``time.monotonic``)."""

    def __init__(self, inner: httpx.SyncByteStream, *, max_bytes: int, deadline: float) -> None:
        self._inner, self._max_bytes, self._deadline = inner, max_bytes, deadline

    def __iter__(self) -> Iterator[bytes]:
        received = 0
        for chunk in self._inner:
            received += len(chunk)
            if received > self._max_bytes:
                raise EgressResponseRefused(f"The response is larger than {self._max_bytes} bytes.")
            if time.monotonic() > self._deadline:
                raise httpx.ReadTimeout("The response took longer than the egress time cap.")
            yield chunk

    def close(self) -> None:
        self._inner.close()


class EgressTransport(httpx.HTTPTransport):
    """An httpx transport that refuses non-http(s) URLs and user info, connects only through
    ``EgressNetworkBackend``, never uses a proxy, and caps each response at ``max_response_bytes``
    (as received: compressed answers are refused) and ``max_seconds`` from sending the request
    (checked as each chunk arrives; each wait for bytes is bounded by the request's timeout)."""

    def __init__(self, *, resolver: Resolver | None = None, verify: Any = True, limits: httpx.Limits | None = None,
                 max_response_bytes: int | None = None, max_seconds: float | None = None) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        super().__init__(verify=verify, trust_env=False, limits=limits)
        # httpx 0.28 takes no network backend, so the pool is rebuilt with one; ConnectionPool's
        # network_backend is httpcore's public API.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections, max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=EgressNetworkBackend(resolver=resolver))
        self._max_bytes = max_response_bytes or settings.EGRESS_MAX_RESPONSE_BYTES
        self._max_seconds = max_seconds or settings.EGRESS_MAX_SECONDS

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme not in SCHEMES:
            raise EgressDenied("Only http:// and https:// URLs are allowed.")
        if request.url.userinfo:
            raise EgressDenied("User names and passwords in the URL are not allowed.")
        deadline = time.monotonic() + self._max_seconds
        response = super().handle_request(request)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            response.close()
            raise EgressResponseRefused(f"The response is compressed ({encoding}) although identity was asked for.")
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _CappedStream(response.stream, max_bytes=self._max_bytes, deadline=deadline)
        return response


def egress_client(*, resolver: Resolver | None = None, timeout: float = 30.0, verify: Any = True,
                  limits: httpx.Limits | None = None, max_response_bytes: int | None = None,
                  max_seconds: float | None = None) -> httpx.Client:
    """An ``httpx.Client`` for tenant-supplied URLs: ``EgressTransport``, no redirects, no
    environment proxies, ``Accept-Encoding: identity``, ``timeout`` seconds per connect/read.

    Requests raise ``EgressDenied`` when the guard refuses the destination (before any byte
    leaves), ``EgressResponseRefused`` or ``httpx.ReadTimeout`` past the caps, and the usual
    ``httpx.HTTPError`` otherwise. Thread-safe; share one per process.
    """
    transport = EgressTransport(resolver=resolver, verify=verify, limits=limits,
                                max_response_bytes=max_response_bytes, max_seconds=max_seconds)
    return httpx.Client(transport=transport, follow_redirects=False, trust_env=False, timeout=timeout,
                        headers={"Accept-Encoding": "identity"})
