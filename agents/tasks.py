"""Celery tasks for chat. Turn tasks run on the ``llm.<tier>`` queues, on a thread pool (they
wait on model tokens, not the CPU); tenant-schemas-celery runs each in the sender's schema."""

from __future__ import annotations

import structlog
from celery import shared_task

from agents.runtime.orchestrator import turn_run
from agents.services import turns_sweep

logger = structlog.get_logger(__name__)


@shared_task(name="agents.turn_run", ignore_result=True, acks_late=False)
def turn_run_task(turn_id: int) -> str:
    """Run one turn to a final state (see ``agents.runtime.orchestrator.turn_run``)."""
    return turn_run(turn_id)


@shared_task(name="agents.turn_sweep", ignore_result=True)
def turn_sweep() -> int:
    """Beat entry point, sent once per tenant: fail turns past their deadline."""
    result = turns_sweep()
    if result.failed:
        logger.warning("turns_swept", failed=result.failed)
    return result.failed
