"""SCIM 2.0 errors (RFC 7644 §3.12): a status, an optional ``scimType`` and a readable detail."""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"


class ScimError(Exception):
    """An answer of the SCIM endpoints that is not a success.

    ``scim_type`` is one of RFC 7644 table 9 (``invalidFilter``, ``uniqueness``, ``invalidValue``,
    ``invalidSyntax``, ``mutability``, ``noTarget``, ``invalidPath``, ``tooMany``, ...) or
    ``None``; ``headers`` are extra response headers (``Retry-After`` on 429).
    """

    def __init__(self, status: int, detail: str, *, scim_type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.scim_type = scim_type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The error resource; ``status`` is a string, as RFC 7644 §3.12 shows it."""
        body: dict[str, Any] = {"schemas": [ERROR_SCHEMA], "status": str(self.status), "detail": self.detail}
        if self.scim_type:
            body["scimType"] = self.scim_type
        return body


def bad_request(detail: str, scim_type: str = "invalidValue") -> ScimError:
    """A 400 with ``scim_type`` (``invalidValue`` unless said otherwise)."""
    return ScimError(400, detail, scim_type=scim_type)


def not_found(resource: str, resource_id: str) -> ScimError:
    """A 404 for a resource id unknown in this tenant (other tenants' ids look the same)."""
    return ScimError(404, f"{resource} {resource_id} not found.")
