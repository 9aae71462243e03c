"""What is booked on nodes, for staff about to take them out of service.

Bookings are the marketplace's, which inventory does not import: the marketplace registers its
reader at start-up (marketplace.apps.MarketplaceConfig.ready), as it registers its agent jobs
(inventory.agent_work). The check that a node about to be retired holds no booking does not
need it: it reads the GPUs' own `busy` ranges (inventory.services).
"""

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import NamedTuple

__all__ = ["NodeBooking", "node_bookings", "node_bookings_register"]


class NodeBooking(NamedTuple):
    """A reservation holding GPUs of a node from now on (running, or booked for later)."""

    node_id: int
    reservation: str  # its public id
    organization: str
    status: str
    tier: str
    starts_at: datetime
    ends_at: datetime
    gpus: int  # of this node


# (node ids, now, GPU ids or None for all the nodes' GPUs) -> bookings
Reader = Callable[[list[int], datetime, list[int] | None], Iterable[NodeBooking]]
_reader: Reader | None = None


def node_bookings_register(reader: Reader) -> None:
    global _reader
    _reader = reader


def node_bookings(
    node_ids: Iterable[int], *, now: datetime, gpu_ids: Iterable[int] | None = None
) -> list[NodeBooking]:
    """The bookings on these nodes (on these GPUs of them, if given) that end after now,
    earliest start first; `gpus` counts the GPUs of the node (of those given) each holds."""
    ids = sorted(set(node_ids))
    if not ids or _reader is None:
        return []
    return list(_reader(ids, now, None if gpu_ids is None else sorted(set(gpu_ids))))
