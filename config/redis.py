"""One Redis connection pool per process for code that talks to Redis directly."""

from __future__ import annotations

from functools import cache

import redis
from django.conf import settings


@cache
def redis_client() -> redis.Redis:
    """Return a client on ``settings.REDIS_URL`` with short timeouts (2 s connect, 5 s read)."""
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
