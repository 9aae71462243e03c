"""The pure rules reads and writes share: what a requested period may be, how GPUs are placed
on nodes, and the reservation state machine's table (its one writer is
services/transitions.py; the API shows a coming preemption by it). No database access, so
selectors, serializers and services import them at module top.

Pricing (services/pricing.py) and energy (services/energy.py) are pure too, and imported the
same way.
"""

import unicodedata
from datetime import datetime, timedelta
from typing import NamedTuple

from django.conf import settings
from django.utils import timezone

from config.errors import ValidationFailed
from marketplace.models import ReservationStatus

__all__ = [
    "START_SKEW",
    "MAX_DURATION",
    "MAX_LEAD",
    "validate_period_length",
    "validate_request_period",
    "NodeCapacity",
    "choose_nodes",
    "ALLOWED_TRANSITIONS",
    "TERMINAL_STATUSES",
    "PREEMPTIBLE_STATUSES",
    "display_name_clean",
    "email_address_plain",
]

# A start this far in the past still counts as "now" (clocks and round trips).
START_SKEW = timedelta(seconds=60)
# The longest bookable period (a 1y term plus a day) and how far ahead one may book.
MAX_DURATION = timedelta(days=366)
MAX_LEAD = timedelta(days=365)


def validate_period_length(*, starts_at: datetime, ends_at: datetime) -> None:
    """An end after the start, at least RESERVATION_MIN_SECONDS after it (the shortest period
    sold, searched or resold: usage is billed by the second and holds by the cent, but a
    window of a few seconds, or under one, priced over zero seconds, is nothing a workload
    can use, and slices that small of a resale listing would only split the seller's term);
    ValidationFailed otherwise."""
    if ends_at <= starts_at:
        raise ValidationFailed(
            "The end must be after the start.", code="period_invalid", field="ends_at"
        )
    shortest = settings.RESERVATION_MIN_SECONDS
    if ends_at - starts_at < timedelta(seconds=shortest):
        raise ValidationFailed(
            f"A period lasts at least {shortest} seconds.",
            code="period_too_short",
            field="ends_at",
        )


def validate_request_period(
    *, starts_at: datetime, ends_at: datetime, gpu_count: int, now: datetime | None = None
) -> None:
    """The checks every quote and reservation request passes; ValidationFailed otherwise."""
    now = now or timezone.now()
    if not isinstance(gpu_count, int) or isinstance(gpu_count, bool) or gpu_count < 1:
        raise ValidationFailed("gpu_count must be a whole number of at least 1.", field="gpu_count")
    for name, value in (("starts_at", starts_at), ("ends_at", ends_at)):
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValidationFailed(f"{name} must be a time with a time zone.", field=name)
    validate_period_length(starts_at=starts_at, ends_at=ends_at)
    if starts_at < now - START_SKEW:
        raise ValidationFailed(
            "The start time is in the past.", code="starts_in_past", field="starts_at"
        )
    if starts_at > now + MAX_LEAD:
        raise ValidationFailed(
            f"The start may be at most {MAX_LEAD.days} days ahead.",
            code="starts_too_far_ahead",
            field="starts_at",
        )
    if ends_at - starts_at > MAX_DURATION:
        raise ValidationFailed(
            f"A reservation may last at most {MAX_DURATION.days} days.",
            code="period_too_long",
            field="ends_at",
        )


class NodeCapacity(NamedTuple):
    """One node's GPUs for a window (a row per candidate node: cheap to build by the hundred)."""

    node_id: int
    gpus: int
    free: int
    healthy: int | None = None


def choose_nodes(capacities: list[NodeCapacity], gpu_count: int) -> list[tuple[int, int]]:
    """[(node_id, GPUs to take)] by the placement rule, or [] when it does not fit."""
    if not capacities:
        return []
    if gpu_count <= max(c.gpus for c in capacities):
        fitting = [c for c in capacities if c.free >= gpu_count]
        if not fitting:
            return []
        best = min(fitting, key=lambda c: (c.free, c.node_id))
        return [(best.node_id, gpu_count)]
    whole = sorted((c for c in capacities if c.free == c.gpus), key=lambda c: (-c.gpus, c.node_id))
    chosen, remaining = [], gpu_count
    for c in whole:
        if remaining <= 0:
            break
        take = min(c.gpus, remaining)
        chosen.append((c.node_id, take))
        remaining -= take
    return chosen if remaining <= 0 else []


# The reservation state machine (see marketplace/services/transitions.py): each status → the
# statuses it may move to.
ALLOWED_TRANSITIONS: dict[str, set[str]] = {
    ReservationStatus.PENDING: {
        ReservationStatus.SCHEDULED,
        ReservationStatus.CANCELLED,
        ReservationStatus.FAILED,
        ReservationStatus.PREEMPTED,
    },
    ReservationStatus.SCHEDULED: {
        ReservationStatus.PROVISIONING,
        ReservationStatus.CANCELLED,
        ReservationStatus.FAILED,
        ReservationStatus.PREEMPTED,
    },
    ReservationStatus.PROVISIONING: {
        ReservationStatus.ACTIVE,
        ReservationStatus.SCHEDULED,
        ReservationStatus.CANCELLED,
        ReservationStatus.FAILED,
        ReservationStatus.PREEMPTED,
    },
    # active → provisioning: moved off a failed GPU, restarted on healthy ones (gpu_failures).
    ReservationStatus.ACTIVE: {
        ReservationStatus.RELEASING,
        ReservationStatus.PREEMPTED,
        ReservationStatus.FAILED,
        ReservationStatus.PROVISIONING,
    },
    ReservationStatus.RELEASING: {ReservationStatus.COMPLETED, ReservationStatus.FAILED},
    ReservationStatus.COMPLETED: set(),
    ReservationStatus.CANCELLED: set(),
    ReservationStatus.FAILED: set(),
    ReservationStatus.PREEMPTED: set(),
}

TERMINAL_STATUSES = frozenset(s for s, targets in ALLOWED_TRANSITIONS.items() if not targets)
# Where preemption (a grid curtailment) can still reach a reservation: before its release.
PREEMPTIBLE_STATUSES = frozenset(
    s for s, targets in ALLOWED_TRANSITIONS.items() if ReservationStatus.PREEMPTED in targets
)


# Control (line breaks, tabs), format (bidi overrides, zero-width) and line/paragraph separator
# characters: invisible or reordering in a name people read, and a line break in a name that
# reaches an e-mail subject ("Join <organisation> on Switchyard") makes the message unsendable.
_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def display_name_clean(
    name: str, *, what: str, part: str = "name", field: str = "name", blank_ok: bool = False
) -> str:
    """A name people read (an organisation's, an API or SSH key's, a webhook endpoint's
    description: `what`'s `part`), stripped; blank (unless `blank_ok`), or holding a control
    or formatting character, is refused."""
    name = (name or "").strip()
    if not name and not blank_ok:
        raise ValidationFailed(f"{what} needs a {part}.", code="blank", field=field)
    if any(unicodedata.category(c) in _UNPRINTABLE_CATEGORIES for c in name):
        raise ValidationFailed(
            f"{what}'s {part} cannot hold control or formatting characters (line breaks, "
            "tabs, invisible or right-to-left marks).",
            code="invalid_characters",
            field=field,
        )
    return name


def email_address_plain(email: str, *, field: str = "email") -> str:
    """`email` (already a valid address) if it holds no control or formatting character. The
    address validator lets a quoted local part hold control characters ("a\x1cb"@example.com),
    and some of them (\x1c-\x1e, \x85, U+2028) are line breaks to Python's e-mail package: in
    the To header they would split it, and let text typed at sign-up or in an invitation pass
    for headers of the message sent to it. Refused like those in names (display_name_clean)."""
    if any(unicodedata.category(c) in _UNPRINTABLE_CATEGORIES for c in email):
        raise ValidationFailed(
            "An e-mail address cannot hold control or formatting characters.",
            code="invalid_characters",
            field=field,
        )
    return email
