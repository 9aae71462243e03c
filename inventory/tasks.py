"""Periodic inventory work."""

from celery import shared_task

from inventory.services import nodes_mark_silent_offline


@shared_task(name="inventory.tasks.nodes_mark_offline")
def nodes_mark_offline() -> int:
    """Beat runs this every 30 s; it is idempotent (an offline node is not marked again)."""
    return len(nodes_mark_silent_offline())
