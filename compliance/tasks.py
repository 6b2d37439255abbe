"""Celery beat task: sign a checkpoint of every audit chain's head (``audit_checkpoint``)."""

from __future__ import annotations

import structlog
from celery import shared_task

from compliance.selectors import audited_schemas
from compliance.services import audit_checkpoints_create

logger = structlog.get_logger(__name__)


@shared_task(name="compliance.audit_checkpoint", ignore_result=True)
def audit_checkpoint() -> dict[str, int]:
    """Beat entry point, sent once, to the public schema (``tenant_schemas: ["public"]``): one run
    checkpoints every chain. Each written checkpoint is also logged in full (``audit_checkpoint``
    log events), so the log pipeline keeps a copy outside the database. Returns counts by outcome.
    """
    outcomes = audit_checkpoints_create(schemas=audited_schemas())
    counts = {
        "created": sum(o.created for o in outcomes),
        "unchanged": sum(o.checkpoint is not None and not o.created for o in outcomes),
        "broken": sum(o.error is not None for o in outcomes),
    }
    logger.info("audit_checkpoints", **counts)
    return counts
