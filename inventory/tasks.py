"""Periodic inventory work."""

from celery import shared_task

from inventory.burn_in import burn_ins_expire as expire
from inventory.heartbeats import heartbeats_flush as _heartbeats_flush
from inventory.services import nodes_mark_silent_offline
from inventory.telemetry import telemetry_flush as flush
from inventory.telemetry import telemetry_purge
from inventory.telemetry import telemetry_rollup as rollup


@shared_task(name="inventory.tasks.nodes_mark_offline")
def nodes_mark_offline() -> int:
    """Beat runs this every 30 s; it is idempotent (an offline node is not marked again)."""
    return len(nodes_mark_silent_offline())


@shared_task(name="inventory.tasks.heartbeats_flush")
def heartbeats_flush() -> int:
    """Beat runs this every 5 s: buffered heartbeat times into inventory_node, one UPDATE per
    few thousand nodes. Idempotent; a flush that finds another running returns 0."""
    return _heartbeats_flush()


@shared_task(name="inventory.tasks.telemetry_flush")
def telemetry_flush() -> int:
    """Beat runs this every 5 s: buffered samples into the database, a few thousand per COPY."""
    return flush()


@shared_task(name="inventory.tasks.telemetry_rollup")
def telemetry_rollup() -> int:
    """Beat runs this every minute; it recomputes the last minutes, so a rerun is harmless."""
    return rollup()


@shared_task(name="inventory.tasks.telemetry_retention")
def telemetry_retention() -> dict[str, dict]:
    """Beat runs this hourly: the telemetry tables' partitions for the next day are created,
    those past their retention dropped (inventory.partitions); idempotent."""
    return telemetry_purge()


@shared_task(name="inventory.tasks.burn_ins_expire")
def burn_ins_expire() -> int:
    """Beat, every minute: a burn-in whose agent went quiet past its limit has failed."""
    return expire()
