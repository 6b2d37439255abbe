"""Per-minute rate limits of a tenant's plan, counted in Redis so that they hold across processes.

Three limits, each a ``Plan`` field (``None`` = unlimited), counted per API key (``key:<key id>``)
or per member (``user:<user id>``) within a tenant:

- ``api_requests_per_minute``: every authenticated request under ``/api/v1/`` (``config.api``),
- ``chat_turns_per_minute``: every chat message sent (``agents.services.chat_message_send``; the
  chat socket counts before it hands the message to a worker, ``agents.consumers``),
- ``kb_searches_per_minute``: every knowledge-base search (``knowledge.selectors.collections_for_search``).

Strategy: the ``limits`` library's moving window on Redis. Each hit is a Lua script (atomic in
Redis, so every process shares one count) that keeps the timestamps of the last N hits in a list:
exactly N hits in any 60 seconds, with no burst of 2N across a window boundary as a fixed window
allows. See ``docs/billing-rate-limits.md``; its cost is in ``docs/perf/2026-12-07-rate-limits.md``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, cast

import redis
import structlog
from django.conf import settings
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from config.errors import TooManyRequests
from config.redis import redis_client

if TYPE_CHECKING:
    from tenants.models import Plan, Tenant
    from tenants.principal import Principal

logger = structlog.get_logger(__name__)

# Redis keys are ``ratelimit:plan/<schema>/<limit>/<who>/<N>/1/minute`` (limits' own layout).
KEY_PREFIX = "ratelimit"
NAMESPACE = "plan"
WINDOW_SECONDS = 60

# The limit's name as a user reads it in the 429 message.
LIMITS: dict[str, str] = {
    "api_requests_per_minute": "API requests",
    "chat_turns_per_minute": "chat messages",
    "kb_searches_per_minute": "knowledge-base searches",
}


@dataclass(frozen=True)
class RateLimitState:
    """Where a caller stands on one limit after a counted request.

    ``allowed`` is the plan's requests per minute, ``remaining`` how many more the moving window
    takes now, ``reset_seconds`` (>= 1) the seconds until the oldest counted request leaves the
    window and frees a slot.
    """

    limit: str
    allowed: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        """``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` (seconds), as in the
        IETF httpapi draft "RateLimit header fields for HTTP" (the pre-2023 field names)."""
        return {
            "RateLimit-Limit": str(self.allowed),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }


@cache
def _limiter() -> MovingWindowRateLimiter:
    # One Redis pool per process: the one ``config.redis`` made, with its short timeouts.
    storage = RedisStorage(settings.REDIS_URL, connection_pool=redis_client().connection_pool, key_prefix=KEY_PREFIX)
    return MovingWindowRateLimiter(storage)


def caller_bucket(principal: Principal) -> str | None:
    """``key:<key id>`` for an API key, ``user:<user id>`` for a member, ``None`` for staff and
    the system (never limited)."""
    if principal.api_key is not None:
        return f"key:{principal.api_key.key_id}"
    if principal.kind == "user" and principal.user is not None:
        return f"user:{principal.user.pk}"
    return None


def plan_rate(tenant: Tenant | None, limit: str) -> int | None:
    """The requests per minute ``tenant``'s plan allows under ``limit``; ``None`` = unlimited
    (no tenant, no plan, or an empty field). Reads ``tenant.plan`` (a query unless loaded)."""
    if limit not in LIMITS:
        raise ValueError(f"Unknown rate limit {limit!r}; one of {', '.join(LIMITS)}.")
    if tenant is None or tenant.plan_id is None:
        return None
    value = getattr(tenant.plan, limit)
    return None if value is None else int(value)


def rate_limit_hit(*, tenant: Tenant | None, principal: Principal, limit: str) -> RateLimitState | None:
    """Count one request of ``principal`` in ``tenant`` against the plan's ``limit``.

    ``limit`` is one of ``LIMITS``. Returns ``None`` when the plan sets no such limit or the
    principal is staff or the system (Redis is not called), else the state after the hit.
    Raises ``TooManyRequests`` (429, code ``rate_limited``; ``details``: ``limit``, ``allowed``,
    ``plan``, ``window_seconds``; ``retry_after`` in seconds; ``headers`` with ``RateLimit-*``
    and ``Retry-After``) when the last 60 seconds already hold ``allowed`` counted requests;
    a refused request is not counted. If Redis cannot be reached the request is let through
    (logged): the limiter must not turn a Redis hiccup into an outage of the whole API.
    """
    allowed = plan_rate(tenant, limit)
    who = caller_bucket(principal)
    if allowed is None or who is None or tenant is None:
        return None
    item = RateLimitItemPerMinute(allowed, namespace=NAMESPACE)
    identifiers = (tenant.schema_name, limit, who)
    limiter = _limiter()
    try:
        accepted = limiter.hit(item, *identifiers)
        stats = limiter.get_window_stats(item, *identifiers)
    except redis.RedisError as exc:
        logger.warning("rate_limit_unavailable", limit=limit, error=f"{type(exc).__name__}: {exc}")
        return None
    reset = max(1, math.ceil(stats.reset_time - time.time()))
    state = RateLimitState(limit=limit, allowed=allowed, remaining=max(0, stats.remaining), reset_seconds=reset)
    if accepted:
        return state
    plan = cast("Plan", tenant.plan)  # plan_rate found the limit on it
    raise TooManyRequests(
        f"Rate limit reached: the {plan.name} plan allows {allowed} {LIMITS[limit]} per minute "
        f"({limit}). Retry in {reset} s.",
        details={"limit": limit, "allowed": allowed, "plan": plan.code, "window_seconds": WINDOW_SECONDS},
        retry_after=reset,
        headers={**state.headers(), "Retry-After": str(reset)},
    )


def rate_limit_reset(*, tenant: Tenant, principal: Principal, limit: str) -> None:
    """Forget the counted requests of ``principal`` under ``limit`` (staff support, tests)."""
    allowed = plan_rate(tenant, limit)
    who = caller_bucket(principal)
    if allowed is not None and who is not None:
        _limiter().clear(RateLimitItemPerMinute(allowed, namespace=NAMESPACE), tenant.schema_name, limit, who)
