"""The egress guard: every spelling of a refused address, the allowlist, and the guarded client
(pinning, redirects, caps) against small local HTTP servers. DNS is mocked (a process boundary)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from config.egress import (
    EgressDenied,
    EgressResponseRefused,
    allow_rule_parse,
    allow_rules,
    egress_check_url,
    egress_client,
    resolver_override,
)
from tenants.models import EgressAllowRule

PUBLIC = "93.184.216.34"


def _resolver(answers: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    """A DNS stand-in: ``answers`` by name; any other name does not resolve."""

    def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError(f"{host} does not resolve")
        return answers[host]

    return resolve


NAMES = _resolver({
    "api.example.com": [PUBLIC],
    "internal-db.example.com": ["10.0.0.7"],
    "xn--bcher-kva.example": ["10.0.0.8"],
    "xn--bchr-0ra.example": [PUBLIC],
    "127.0.0.1.nip.io": ["127.0.0.1"],
    "mixed.example.com": [PUBLIC, "10.0.0.1"],
    "metadata.google.internal": ["169.254.169.254"],
    "localhost": ["127.0.0.1", "::1"],
    "v6.example.com": ["fd12:3456::1"],
    "vllm.internal": ["10.0.0.9"],
})


@pytest.mark.parametrize("url", [
    # The forms.
    "http://127.0.0.1:9999/v1", "http://169.254.169.254/", "http://2130706433/", "http://0x7f000001/",
    "http://127.1/", "http://0.0.0.0/", "http://[::1]/", "http://user:pw@10.0.0.5/",
    # Octal, other numeric spellings, trailing dots, local names.
    "http://0177.0.0.1/", "http://0x7f.1/", "http://017700000001/", "http://0/", "http://127.0.0.1./",
    "http://localhost/", "http://localhost./", "http://LOCALHOST/", "http://foo.localhost/",
    "http://metadata.google.internal/computeMetadata/v1/", "http://metadata.google.internal./",
    # IDN: full-width letters and digits, and an IDN name resolving privately.
    "http://ｌｏｃａｌｈｏｓｔ/", "http://１２７.０.０.１/", "http://bücher.example/",
    # Names resolving privately, also when only one of the answers is private.
    "http://internal-db.example.com./v1", "http://127.0.0.1.nip.io/", "http://mixed.example.com/",
    "http://v6.example.com/",
    # Every refused range.
    "http://10.0.0.5/", "http://172.16.0.1/", "http://192.168.1.1/", "http://100.64.0.1/", "http://169.254.1.1/",
    "http://100.100.100.200/", "http://192.0.0.192/", "http://224.0.0.1/", "http://240.0.0.1/",
    "http://255.255.255.255/", "http://198.18.0.1/", "http://[::]/", "http://[fe80::1]/", "http://[fc00::1]/",
    "http://[fd00:ec2::254]/", "http://[ff02::1]/", "http://[fec0::1]/",
    # IPv4-mapped, 6to4, Teredo, NAT64 and IPv4-compatible forms of refused addresses.
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:169.254.169.254]/", "http://[::ffff:a00:5]/",
    "http://[2002:7f00:1::]/", "http://[2002:a9fe:a9fe::1]/", "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
    "http://[64:ff9b::7f00:1]/", "http://[64:ff9b::a9fe:a9fe]/", "http://[64:ff9b:1::1]/", "http://[::127.0.0.1]/",
    # Schemes, ports, user info, unreadable URLs.
    "ftp://api.example.com/", "file:///etc/passwd", "gopher://api.example.com/", "http://api.example.com:8080/",
    "https://api.example.com:22/", "http://user@api.example.com/", "http://api.example.com\\@127.0.0.1/",
    "http://1.2.3.4.5/", "http://08.0.0.1/", "http://256.0.0.1/", "http://[fe80::1%25eth0]/",
    "http://unknown.example.com/", "http:///v1",
])
def test_it_refuses_every_spelling_of_a_refused_destination(url: str) -> None:
    with pytest.raises(EgressDenied) as refused:
        egress_check_url(url, resolver=NAMES, rules=[])
    assert refused.value.code == "egress_denied" and refused.value.status == 422
    assert refused.value.message


def test_the_refusal_says_why() -> None:
    cases = {
        "http://2130706433/": "127.0.0.1 is loopback",
        "http://169.254.169.254/": "cloud metadata",
        "http://metadata.google.internal/": "cloud metadata service name",
        "http://user:pw@10.0.0.5/": "User names and passwords",
        "http://100.64.0.1/": "carrier-grade NAT",
        "http://[::ffff:10.0.0.5]/": "IPv4-mapped form of 10.0.0.5, which is private (RFC 1918)",
        "http://internal-db.example.com./": "internal-db.example.com (10.0.0.7) is private",
        "http://api.example.com:8080/": "Port 8080 is not allowed",
        "http://localhost./": "local-only name",
        "ftp://api.example.com/": "Only http:// and https://",
        "http://unknown.example.com/": "could not be resolved",
    }
    for url, reason in cases.items():
        with pytest.raises(EgressDenied, match=re.escape(reason)):
            egress_check_url(url, resolver=NAMES, rules=[])


@pytest.mark.parametrize(("url", "host", "addresses"), [
    ("https://api.example.com/v1", "api.example.com", (PUBLIC,)),
    ("HTTPS://API.Example.COM./v1", "api.example.com", (PUBLIC,)),
    ("https://büchr.example/v1", "xn--bchr-0ra.example", (PUBLIC,)),
    ("http://93.184.216.34/", PUBLIC, (PUBLIC,)),
    ("http://1572395042/", PUBLIC, (PUBLIC,)),  # 93.184.216.34 as one number is still public
    ("http://[2606:2800:220:1:248:1893:25c8:1946]/", "2606:2800:220:1:248:1893:25c8:1946",
     ("2606:2800:220:1:248:1893:25c8:1946",)),
    ("http://[64:ff9b::5db8:d822]/", "64:ff9b::5db8:d822", ("64:ff9b::5db8:d822",)),  # NAT64 of a public address
])
def test_it_allows_public_addresses_and_returns_the_checked_target(url: str, host: str,
                                                                   addresses: tuple[str, ...]) -> None:
    target = egress_check_url(url, resolver=NAMES, rules=[])
    assert target.host == host and target.addresses == addresses
    assert target.port == (443 if url.lower().startswith("https") else 80)


def test_the_allowlist_opens_exactly_what_it_names() -> None:
    rules = [allow_rule_parse("10.0.0.0/8:8000"), allow_rule_parse("vllm.internal:8001"),
             allow_rule_parse("192.168.5.5"), allow_rule_parse("[fd12:3456::/32]:9000")]
    assert egress_check_url("http://10.1.2.3:8000/v1", rules=rules).addresses == ("10.1.2.3",)
    assert egress_check_url("http://vllm.internal:8001/v1", resolver=NAMES, rules=rules).addresses == ("10.0.0.9",)
    assert egress_check_url("http://192.168.5.5/", rules=rules).port == 80
    assert egress_check_url("http://v6.example.com:9000/", resolver=NAMES, rules=rules).addresses == ("fd12:3456::1",)
    for url in ("http://10.1.2.3/", "http://10.1.2.3:8001/", "http://vllm.internal/", "http://vllm.internal:8002/",
                "http://192.168.5.5:8080/", "http://192.168.5.6/", "http://127.0.0.1:8000/",
                "http://v6.example.com/"):
        with pytest.raises(EgressDenied):
            egress_check_url(url, resolver=NAMES, rules=rules)


def test_no_rule_opens_the_cloud_metadata_services() -> None:
    rules = [allow_rule_parse("169.254.0.0/16"), allow_rule_parse("metadata.google.internal"),
             allow_rule_parse("100.64.0.0/10"), allow_rule_parse("[fd00::/8]")]
    for url in ("http://169.254.169.254/", "http://metadata.google.internal/", "http://100.100.100.200/",
                "http://[fd00:ec2::254]/"):
        with pytest.raises(EgressDenied, match="metadata"):
            egress_check_url(url, resolver=NAMES, rules=rules)
    assert egress_check_url("http://169.254.1.1/", rules=rules).addresses == ("169.254.1.1",)


@pytest.mark.parametrize("address", ["::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1"])
def test_an_allowlisted_name_cannot_reach_a_metadata_service_through_an_ipv6_form(address: str) -> None:
    """A Linux IPv6 socket reaches ``::ffff:169.254.169.254`` as the IPv4 metadata address."""
    rules = [allow_rule_parse("models.partner.example"), allow_rule_parse("[::/0]")]
    with pytest.raises(EgressDenied, match="metadata"):
        egress_check_url("http://models.partner.example/v1", rules=rules,
                         resolver=_resolver({"models.partner.example": [address]}))


@pytest.mark.parametrize("text", ["", "10.0.0.0/33", "host:0", "host:70000", "host:http", "[::1", "bad_name!"])
def test_unreadable_rules_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        allow_rule_parse(text)


def test_rules_come_from_the_setting_and_the_staff_rows(db: Any) -> None:
    with override_settings(EGRESS_ALLOWLIST=["10.0.0.7:8000"]):
        EgressAllowRule.objects.create(target="127.0.0.1", port=8001, description="local SmolLM2 for one tenant")
        EgressAllowRule.objects.create(target="10.9.9.9", enabled=False)
        assert [str(rule) for rule in allow_rules()] == ["10.0.0.7/32:8000", "127.0.0.1/32:8001"]
        assert egress_check_url("http://127.0.0.1:8001/v1").addresses == ("127.0.0.1",)
        with pytest.raises(EgressDenied):
            egress_check_url("http://10.9.9.9/")
    with override_settings(EGRESS_ALLOWLIST=["not a rule!"]), pytest.raises(ImproperlyConfigured,
                                                                             match="EGRESS_ALLOWLIST"):
        allow_rules()


# --- The guarded client against real local servers ------------------------------------------


class _Recorder(ThreadingHTTPServer):
    """A local HTTP server that counts accepted connections and records each request's Host."""

    daemon_threads = True

    def __init__(self, handle: Callable[[BaseHTTPRequestHandler], None], tls: Any = None) -> None:
        self.connections = 0
        self.hosts: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
                return

            def do_GET(self) -> None:
                recorder.hosts.append(self.headers.get("Host", ""))
                handle(self)

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = int(self.server_address[1])
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1
        return True


@pytest.fixture
def serve() -> Iterator[Callable[..., _Recorder]]:
    """``serve(handle, tls=None)``: a started ``_Recorder`` (over TLS with an ``ssl.SSLContext``)."""
    servers: list[_Recorder] = []

    def start(handle: Callable[[BaseHTTPRequestHandler], None], tls: Any = None) -> _Recorder:
        server = _Recorder(handle, tls)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _answer(body: bytes, status: int = 200, **headers: str) -> Callable[[BaseHTTPRequestHandler], None]:
    def handle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return handle


def test_a_redirect_from_an_allowed_host_to_loopback_is_not_followed(db: Any, serve: Any) -> None:
    target = serve(_answer(b"secret"))
    redirector = serve(_answer(b"", status=302, Location=f"http://127.0.0.1:{target.port}/latest/meta-data/"))
    with override_settings(EGRESS_ALLOWLIST=[f"127.0.0.1:{redirector.port}"]), egress_client() as client:
        response = client.get(f"http://127.0.0.1:{redirector.port}/v1")
        assert response.status_code == 302 and response.content == b""
        # A caller that turns redirects on gets every hop checked the same way.
        with pytest.raises(EgressDenied, match=f"Port {target.port} is not allowed|loopback"):
            client.get(f"http://127.0.0.1:{redirector.port}/v1", follow_redirects=True)
    assert redirector.connections == 2 and target.connections == 0


def test_a_name_that_now_resolves_privately_is_refused_before_connecting(db: Any, serve: Any) -> None:
    server = serve(_answer(b"hello"))
    answers = {"model.rebind.test": [PUBLIC]}
    with override_settings(EGRESS_ALLOWLIST=[f"{PUBLIC}:{server.port}"]), \
            resolver_override(lambda host, port: answers[host]):
        egress_check_url(f"http://model.rebind.test:{server.port}/v1")  # saved while it resolved publicly
        answers["model.rebind.test"] = ["127.0.0.1"]
        with egress_client() as client, pytest.raises(EgressDenied, match=r"127\.0\.0\.1"):
            client.get(f"http://model.rebind.test:{server.port}/v1")
    assert server.connections == 0


def test_the_connection_goes_to_the_checked_address_keeping_the_host_name(db: Any, serve: Any) -> None:
    server = serve(_answer(b"pinned"))
    lookups: list[str] = []

    def once(host: str, port: int) -> list[str]:
        # Answers once; a second lookup (a rebinding window) would get a refused address.
        lookups.append(host)
        return ["127.0.0.1"] if len(lookups) == 1 else ["169.254.169.254"]

    with override_settings(EGRESS_ALLOWLIST=[f"127.0.0.1:{server.port}"]), resolver_override(once), \
            egress_client() as client:
        # The name does not exist in real DNS: only the checked address can have been used.
        response = client.get(f"http://model.pinned.test:{server.port}/v1/models")
    assert response.status_code == 200 and response.content == b"pinned"
    assert lookups == ["model.pinned.test"]
    assert server.hosts == [f"model.pinned.test:{server.port}"]


def test_user_info_is_refused_by_the_client_too(db: Any, serve: Any) -> None:
    server = serve(_answer(b"hello"))
    with override_settings(EGRESS_ALLOWLIST=[f"127.0.0.1:{server.port}"]), egress_client() as client, \
            pytest.raises(EgressDenied, match="User names"):
        client.get(f"http://user:pw@127.0.0.1:{server.port}/")
    assert server.connections == 0


def test_responses_over_the_size_cap_or_compressed_are_refused(db: Any, serve: Any) -> None:
    big = serve(_answer(b"x" * 4096))
    gzipped = serve(_answer(b"\x1f\x8b", Content_Encoding="gzip"))
    with override_settings(EGRESS_ALLOWLIST=[f"127.0.0.1:{big.port}", f"127.0.0.1:{gzipped.port}"]), \
            egress_client(max_response_bytes=1024) as client:
        with pytest.raises(EgressResponseRefused, match="larger than 1024"):
            client.get(f"http://127.0.0.1:{big.port}/")
        with pytest.raises(EgressResponseRefused, match="gzip"):
            client.get(f"http://127.0.0.1:{gzipped.port}/")
        assert isinstance(EgressResponseRefused("x"), httpx.HTTPError)


def test_a_response_that_trickles_past_the_time_cap_is_cut(db: Any, serve: Any) -> None:
    """Each byte comes well within the read timeout, so only the total time cap can stop it."""
    import time

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "20")
        handler.end_headers()
        for _ in range(20):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.2)

    slow = serve(trickle)
    with override_settings(EGRESS_ALLOWLIST=[f"127.0.0.1:{slow.port}"]), \
            egress_client(max_seconds=0.5) as client, pytest.raises(httpx.ReadTimeout, match="time cap"):
        client.get(f"http://127.0.0.1:{slow.port}/")


def test_an_unreadable_allowlist_entry_fails_the_system_check(db: Any) -> None:
    from django.core.checks import run_checks

    with override_settings(EGRESS_ALLOWLIST=["10.0.0.0/8", "10.0.0.0/33"]):
        errors = [message for message in run_checks() if message.id == "portal.E031"]
    assert len(errors) == 1 and "entry 2" in errors[0].msg
    with override_settings(EGRESS_ALLOWLIST=["10.0.0.0/8", "models.internal:8000"]):
        assert not [message for message in run_checks() if message.id == "portal.E031"]


def _self_signed(host: str, directory: Any) -> tuple[str, str]:
    """A certificate for ``host`` and its key, as PEM files in ``directory``."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_to_the_checked_address_sends_and_verifies_the_host_name(db: Any, serve: Any, tmp_path: Any) -> None:
    import ssl

    host = "model.tls.test"
    cert, key = _self_signed(host, tmp_path)
    server_names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)  # type: ignore[assignment,func-returns-value]
    server = serve(_answer(b"over tls"), tls=context)
    trust = ssl.create_default_context(cafile=cert)
    with override_settings(EGRESS_ALLOWLIST=[f"127.0.0.1:{server.port}"]), \
            resolver_override(_resolver({host: ["127.0.0.1"]})), egress_client(verify=trust) as client:
        response = client.get(f"https://{host}:{server.port}/v1/models")
    assert response.status_code == 200 and response.content == b"over tls"
    assert server_names == [host] and server.hosts == [f"{host}:{server.port}"]
