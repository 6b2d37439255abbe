"""A small HTTP proxy in front of a real ``oidc-provider-mock`` process that serves ID tokens the
mock cannot produce: expired, for another audience, or with a broken signature.

Run as ``python -m tests.oidc_tamper_proxy --upstream http://127.0.0.1:P --port Q``. Every path
starts with a mode, ``/<mode>/...``, so one process serves them all; the issuer of mode ``m`` is
``http://127.0.0.1:Q/m``. Discovery names the proxy as issuer and as token and JWKS endpoint,
and the mock itself as authorization and userinfo endpoint; the proxy forwards the token request
to the mock and rewrites the ``id_token`` of its answer:

- ``resigned``: ``iss`` set to the proxy's issuer, signed with the proxy's own key (served on the
  proxy's JWKS). A valid token: the control case showing the proxy alone breaks nothing.
- ``expired``: as ``resigned`` with ``exp`` an hour ago.
- ``wrong_audience``: as ``resigned`` with ``aud`` another client's id.
- ``bad_signature``: the mock's own token with its payload changed (``iss``, and ``email`` set to
  ``mallory@...``) and the mock's signature kept; the JWKS is the mock's.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

MODES = ("resigned", "expired", "wrong_audience", "bad_signature")
KID = "tamper-proxy"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Proxy:
    def __init__(self, upstream: str, port: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = port
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        self.jwks = {"keys": [{**public_jwk, "kid": KID, "alg": "RS256", "use": "sig"}]}

    def issuer(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}"

    def discovery(self, mode: str) -> dict[str, Any]:
        config: dict[str, Any] = httpx.get(f"{self.upstream}/.well-known/openid-configuration").json()
        config["issuer"] = self.issuer(mode)
        config["token_endpoint"] = f"{self.issuer(mode)}/oauth2/token"
        config["jwks_uri"] = f"{self.issuer(mode)}/jwks"
        return config

    def tamper(self, mode: str, id_token: str) -> str:
        if mode == "bad_signature":
            header, payload, signature = id_token.split(".")
            claims = json.loads(_unb64(payload))
            claims["iss"] = self.issuer(mode)
            claims["email"] = "mallory@" + str(claims.get("email", "x@acme.test")).rpartition("@")[2]
            return ".".join([header, _b64(json.dumps(claims).encode()), signature])
        claims = jwt.decode(id_token, options={"verify_signature": False})
        claims["iss"] = self.issuer(mode)
        if mode == "expired":
            claims["iat"] = int(time.time()) - 7200
            claims["exp"] = int(time.time()) - 3600
        elif mode == "wrong_audience":
            claims["aud"] = "another-client"
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": KID})


def _handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
            return

        def _send_json(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _mode(self) -> tuple[str, str]:
            mode, _, rest = self.path.lstrip("/").partition("/")
            return mode, "/" + rest

        def do_GET(self) -> None:
            mode, rest = self._mode()
            if mode not in MODES:
                self._send_json(404, {"error": "unknown mode"})
            elif rest == "/.well-known/openid-configuration":
                self._send_json(200, proxy.discovery(mode))
            elif rest == "/jwks":
                jwks = httpx.get(f"{proxy.upstream}/jwks").json() if mode == "bad_signature" else proxy.jwks
                self._send_json(200, jwks)
            else:
                self._send_json(404, {"error": "not proxied"})

        def do_POST(self) -> None:
            mode, rest = self._mode()
            if mode not in MODES or rest != "/oauth2/token":
                self._send_json(404, {"error": "not proxied"})
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
            answer = httpx.post(f"{proxy.upstream}/oauth2/token", content=body, headers=headers)
            data = answer.json()
            if answer.status_code == 200 and "id_token" in data:
                data["id_token"] = proxy.tamper(mode, data["id_token"])
            self._send_json(answer.status_code, data)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _handler(Proxy(args.upstream, args.port)))
    server.serve_forever()


if __name__ == "__main__":
    main()
