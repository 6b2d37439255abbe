"""The REST API at ``/api/v1/`` on tenant hosts: authentication, one error body, pagination.

Authentication: ``Authorization: Bearer <api key>`` (a key works only on its own tenant's host)
or the browser session of a member (unsafe methods then need the CSRF token).

Every 4xx/5xx answer has one body::

    {"error": {"code": "not_found", "message": "...", "details": ..., "request_id": "..."}}

List endpoints page by keyset: ``?limit=`` (1-200, default 50) and ``?cursor=`` taken from the
previous page's ``next_cursor``; a page is ``{"items": [...], "next_cursor": str | null}``.

Request bodies: JSON endpoints take ``Content-Type: application/json`` (or ``application/*+json``)
and answer 415 ``unsupported_media_type`` to anything else; uploads take ``multipart/form-data``.
A NUL character or an unpaired surrogate (``"\\ud800"``) anywhere in a JSON body or a query string
is refused with 422 ``invalid_characters``: PostgreSQL cannot store either.

Rate limits: each authenticated request counts against the plan's ``api_requests_per_minute``
for its API key or member (``config.ratelimit``). Answers carry ``RateLimit-Limit``,
``RateLimit-Remaining`` and ``RateLimit-Reset`` (seconds); over the limit the answer is 429
``rate_limited`` with ``Retry-After`` (seconds) and ``details.limit`` naming the limit.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

import structlog
from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.db.models import Model, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.utils.datastructures import MultiValueDict
from django_otp.plugins.otp_totp.models import TOTPDevice
from ninja import NinjaAPI, Schema
from ninja.errors import AuthenticationError, HttpError, Throttled
from ninja.errors import ValidationError as NinjaValidationError
from ninja.openapi.schema import OpenAPISchema
from ninja.parser import Parser
from ninja.security import APIKeyCookie, HttpBearer
from pydantic import AfterValidator, BeforeValidator

from config.db import database_unavailable, database_unavailable_response
from config.errors import (
    DomainError,
    Forbidden,
    NotAuthenticated,
    TooManyRequests,
    UnsupportedMediaType,
    ValidationFailed,
)
from config.ratelimit import rate_limit_hit
from config.text import require_storable
from tenants.middleware import otp_verified, two_factor_required
from tenants.models import Membership
from tenants.principal import Principal
from tenants.services.keys import api_key_authenticate

logger = structlog.get_logger(__name__)

M = TypeVar("M", bound=Model)

_STATUS_CODES = {
    400: "bad_request", 401: "not_authenticated", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "validation_failed", 429: "rate_limited", 500: "internal_error", 502: "bad_gateway",
    503: "unavailable", 504: "gateway_timeout",
}


def error_body(request: HttpRequest, *, status: int, message: str, code: str | None = None,
               details: Any = None) -> dict[str, Any]:
    """The API's one error body."""
    return {
        "error": {
            "code": code or _STATUS_CODES.get(status, "error"),
            "message": message,
            "details": details,
            "request_id": getattr(request, "request_id", None),
        }
    }


def error_response(request: HttpRequest, *, status: int, message: str, code: str | None = None,
                   details: Any = None) -> JsonResponse:
    return JsonResponse(error_body(request, status=status, message=message, code=code, details=details),
                        status=status)


class ErrorDetail(Schema):
    code: str
    message: str
    details: Any = None
    request_id: str | None = None


class ErrorOut(Schema):
    """The one error body of every 4xx/5xx answer."""

    error: ErrorDetail


# application/json, and the structured-syntax suffix of RFC 6839 (application/problem+json, ...).
_JSON_MEDIA_TYPE_RE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")


class ApiParser(Parser):
    """ninja's JSON parser, refusing what the services must never see.

    A body whose ``Content-Type`` is not JSON gets 415 (``text/plain`` and form encodings were
    parsed as JSON before), and so does an upload that is not ``multipart/form-data``; NUL
    characters and unpaired surrogates in the body or the query string get 422
    ``invalid_characters``. ninja wraps an error raised in ``parse_body`` into
    ``HttpError(400)``; ``_http_error`` renders the domain error it was raised from.
    """

    def parse_body(self, request: HttpRequest) -> dict[str, Any]:
        # ninja also parses the fields of a multipart form through here, on a bare request of its
        # own with no headers (``META`` empty); only the real request's media type is checked.
        if request.META:
            media_type = (request.content_type or "").lower()
            if not _JSON_MEDIA_TYPE_RE.match(media_type):
                raise UnsupportedMediaType(
                    f"This endpoint takes a JSON body: send 'Content-Type: application/json', "
                    f"not '{media_type or 'none'}'.", details={"content_type": media_type or None})
        data = json.loads(request.body)
        require_storable(data, field="body")
        return data  # type: ignore[no-any-return]

    def parse_querydict(self, data: MultiValueDict[str, Any], list_fields: list[str],
                        request: HttpRequest) -> dict[str, Any]:
        # File parameters are read from request.FILES, which is empty for any other media type.
        if data is request.FILES:
            media_type = (request.content_type or "").lower()
            if media_type != "multipart/form-data":
                raise UnsupportedMediaType(
                    f"This endpoint takes an upload: send 'Content-Type: multipart/form-data', "
                    f"not '{media_type or 'none'}'.", details={"content_type": media_type or None})
        result = super().parse_querydict(data, list_fields, request)
        require_storable(result, field="query")
        return result


# The error answers every operation documents (status: description), and those that apply only
# to operations with a JSON body or to unsafe methods; ``ApiNinja.get_openapi_schema`` adds them.
_ERRORS_ALWAYS = {
    401: "No usable credentials (missing, malformed, unknown, revoked or expired API key)",
    403: "The key or member lacks the permission this operation needs",
    404: "No such object in this tenant (other tenants' ids look the same)",
    422: "The request's fields are not valid (``details`` names them)",
    429: "A rate limit of the plan is reached (``details.limit``); retry after ``Retry-After`` seconds",
    503: "The service is momentarily unavailable; retry after ``Retry-After`` seconds",
}
_ERRORS_JSON_BODY = {
    400: "The body is not JSON",
    415: "The body is not ``application/json``",
}
_ERRORS_UNSAFE = {
    409: "The request clashes with the current state (a duplicate, a state transition, a plan limit)",
    413: "The request body is larger than the endpoint accepts",
}


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema without ninja's ``anyOf: [X, {"type": "null"}]`` for an
    optional field: a query string cannot carry null (leaving the parameter out gives the
    default), so the parameter's type is X alone (OpenAPI 3.1, "Parameter Object")."""
    branches = schema.get("anyOf")
    if not isinstance(branches, list):
        return schema
    typed = [branch for branch in branches if branch != {"type": "null"}]
    if len(typed) != 1 or len(typed) == len(branches):
        return schema
    rest = {key: value for key, value in schema.items() if key != "anyOf"}
    return {**typed[0], **rest}


class ApiNinja(NinjaAPI):
    """``NinjaAPI`` whose OpenAPI schema documents the error answers (``ErrorOut``) of every
    operation, which ninja would otherwise leave out unless each decorator listed them."""

    def get_openapi_schema(self, *, path_prefix: str | None = None,
                           path_params: dict[str, Any] | None = None) -> OpenAPISchema:
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        error_schema = ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = schema["components"].setdefault("schemas", {})
        schemas.update(error_schema.pop("$defs", {}))
        schemas["ErrorOut"] = error_schema
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
        for path_item in schema["paths"].values():
            for method, operation in path_item.items():
                for parameter in operation.get("parameters", []):
                    if parameter.get("in") == "query":
                        parameter["schema"] = _without_null(parameter.get("schema", {}))
                errors = dict(_ERRORS_ALWAYS)
                body_types = operation.get("requestBody", {}).get("content", {})
                if "application/json" in body_types:
                    errors.update(_ERRORS_JSON_BODY)
                elif "multipart/form-data" in body_types:
                    errors[415] = "The body is not ``multipart/form-data``"
                if method in {"post", "put", "patch", "delete"}:
                    errors.update(_ERRORS_UNSAFE)
                responses = operation.setdefault("responses", {})
                for status, description in sorted(errors.items()):
                    responses.setdefault(status, {"description": description, "content": content})
        return schema


class ApiKeyAuth(HttpBearer):
    """``Authorization: Bearer aop_...``. A present but unusable header fails at once (401)
    rather than falling through to the session, so a client learns its key is wrong."""

    def __call__(self, request: HttpRequest) -> Principal | None:
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthenticated("Malformed Authorization header: expected 'Bearer <api key>'.",
                                   code="malformed_authorization")
        return self.authenticate(request, token.strip())

    def authenticate(self, request: HttpRequest, token: str) -> Principal:
        key = api_key_authenticate(raw_key=token, tenant=request.tenant)  # type: ignore[attr-defined]
        structlog.contextvars.bind_contextvars(api_key=key.key_id)
        return api_request_counted(request, Principal.for_api_key(key))


class MemberSessionAuth(APIKeyCookie):
    """The console's session cookie, for calls made by the console's own pages.

    CSRF is checked (for unsafe methods) only when a session cookie is present, so a request
    with no credentials at all gets 401, not a CSRF 403.
    """

    param_name = settings.SESSION_COOKIE_NAME

    def _get_key(self, request: HttpRequest) -> str | None:
        if settings.SESSION_COOKIE_NAME not in request.COOKIES:
            return None
        return super()._get_key(request)

    def authenticate(self, request: HttpRequest, key: str | None) -> Principal | None:
        user = request.user
        if key is None or not user.is_authenticated:
            return None
        tenant = request.tenant  # type: ignore[attr-defined]
        membership = Membership.objects.select_related("user", "tenant").filter(user=user, tenant=tenant).first()
        if membership is None:
            raise Forbidden(f"{user.email} is not a member of this tenant.", code="not_a_member")
        if not otp_verified(user) and (
            two_factor_required(user, membership, tenant)
            or TOTPDevice.objects.filter(user=user, confirmed=True).exists()
        ):
            raise Forbidden("Complete two-factor verification in the console first.", code="two_factor_required")
        structlog.contextvars.bind_contextvars(user_id=user.pk)
        return api_request_counted(request, Principal.for_member(membership))


def api_request_counted(request: HttpRequest, principal: Principal) -> Principal:
    """Count an authenticated API request against the plan's ``api_requests_per_minute`` for
    its key or member (``config.ratelimit``) and return ``principal``.

    The ``RateLimit-*`` headers of the count are kept on ``request.rate_limit_headers`` for
    ``config.middleware.RateLimitHeadersMiddleware`` to put on whatever response follows (JSON,
    streams and files alike). Raises ``TooManyRequests`` (429) over the limit; ninja hands an
    error raised in authentication to ``_domain_error``, so the operation never runs.
    """
    state = rate_limit_hit(tenant=request.tenant, principal=principal,  # type: ignore[attr-defined]
                           limit="api_requests_per_minute")
    if state is not None:
        request.rate_limit_headers = state.headers()  # type: ignore[attr-defined]
    return principal


api = ApiNinja(
    title="Agent Ops Portal API",
    version="1",
    description=__doc__,
    auth=[ApiKeyAuth(), MemberSessionAuth()],
    urls_namespace="api",
    parser=ApiParser(),
    openapi_url="/openapi.json",
    docs_url="/docs",
)


@api.exception_handler(DomainError)
def _domain_error(request: HttpRequest, exc: DomainError) -> HttpResponse:
    response = error_response(request, status=exc.status, message=exc.message, code=exc.code, details=exc.details)
    if isinstance(exc, TooManyRequests):
        # The refusing limit's RateLimit-* headers; they take precedence over the request's count.
        for name, value in exc.headers.items():
            response[name] = value
        if exc.retry_after is not None:
            response["Retry-After"] = str(exc.retry_after)
    return response


@api.exception_handler(NinjaValidationError)
def _validation_error(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
    details = [
        {"loc": [str(p) for p in e.get("loc", [])], "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors
    ]
    return error_response(request, status=422, message="The request is not valid.", code="validation_failed",
                          details=details)


@api.exception_handler(AuthenticationError)
def _authentication_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return error_response(request, status=401, code="not_authenticated",
                          message="Authentication required: send 'Authorization: Bearer <api key>'.")


@api.exception_handler(Throttled)
def _throttled(request: HttpRequest, exc: Throttled) -> HttpResponse:
    return error_response(request, status=429, message="Too many requests; retry later.")


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    if isinstance(exc.__cause__, DomainError):  # raised in ApiParser.parse_body, wrapped by ninja
        return _domain_error(request, exc.__cause__)
    return error_response(request, status=exc.status_code, message=str(exc))


@api.exception_handler(Http404)
def _not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return error_response(request, status=404, message="Not found.")


@api.exception_handler(PermissionDenied)
def _permission_denied(request: HttpRequest, exc: PermissionDenied) -> HttpResponse:
    return error_response(request, status=403, message=str(exc) or "Forbidden.")


@api.exception_handler(RequestDataTooBig)
def _too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return error_response(request, status=413, message="The request body is too large.",
                          details={"limit_bytes": settings.API_MAX_BODY_BYTES})


@api.exception_handler(Exception)
def _unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    if database_unavailable(exc):  # no connection free in time: 503 with Retry-After, not a crash
        return database_unavailable_response(request)
    logger.exception("api_unhandled_exception", path=request.path)
    return error_response(request, status=500, message="Internal error. Quote the request id when reporting it.")


# An ISO 8601 date-time: a date, "T" or a space, hours and minutes, optional seconds, fraction and
# offset (what ``datetime.fromisoformat`` and pydantic read, without the bare date).
_ISO_DATETIME_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:[Zz]|[+-]\d{2}(?::?\d{2})?)?$")


def _iso_datetime_only(value: Any) -> Any:
    if isinstance(value, dt.datetime) or (isinstance(value, str) and _ISO_DATETIME_RE.match(value.strip())):
        return value
    raise ValueError("expected an ISO 8601 date-time such as 2026-01-31T12:00:00Z")


def _in_utc(value: dt.datetime) -> dt.datetime:
    # PostgreSQL refuses offsets past +-15:59 (ISO 8601 allows up to 23:59): compare in UTC.
    if value.tzinfo is None:
        return value
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("the date-time is out of range") from None


# A date-time query parameter, in UTC when it has an offset. pydantic alone also reads numbers as
# Unix times ("?to=0.5" was 1970-01-01T00:00:00.5Z), which ``format: date-time`` does not promise.
IsoDateTime = Annotated[dt.datetime, BeforeValidator(_iso_datetime_only), AfterValidator(_in_utc)]


def principal_of(request: HttpRequest) -> Principal:
    """The principal that ``api``'s authentication attached to ``request``."""
    return request.auth  # type: ignore[attr-defined, no-any-return]


def _encode_cursor(value: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{value}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, _, value = raw.partition(":")
        if version != "v1":
            raise ValueError(version)
        return int(value)
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise ValidationFailed("Invalid cursor: pass next_cursor from the previous page unchanged.",
                               code="invalid_cursor") from exc


def keyset_page(queryset: QuerySet[M], *, cursor: str | None, limit: int, key: str = "id",
                descending: bool = True) -> tuple[Sequence[M], str | None]:
    """One page of ``queryset`` ordered by the unique integer column ``key``.

    Returns ``(rows, next_cursor)``; ``next_cursor`` is ``None`` on the last page. Raises
    ``ValidationFailed`` for a limit outside 1-200 or a cursor this function did not make.
    Costs one query whatever the page's position (no OFFSET).
    """
    if not 1 <= limit <= settings.API_PAGE_SIZE_MAX:
        raise ValidationFailed(f"limit must be between 1 and {settings.API_PAGE_SIZE_MAX}.", code="invalid_limit")
    ordered = queryset.order_by(f"-{key}" if descending else key)
    if cursor:
        bound = _decode_cursor(cursor)
        ordered = ordered.filter(**{f"{key}__lt" if descending else f"{key}__gt": bound})
    rows = list(ordered[: limit + 1])
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, _encode_cursor(getattr(rows[-1], key))
    return rows, None


def api_not_found(request: HttpRequest, rest: str = "") -> HttpResponse:
    """Unknown paths under /api/ answer with the API's error body, not an HTML page."""
    return error_response(request, status=404, message=f"No API endpoint at {request.path}.")
