"""The one-writer rule for Reservation.status, checked on every statement the tests run.

Every status change goes through marketplace.services.transitions (reservation_transition or
its batched form): side effects added there (history, events, audit) must not be skippable.
The autouse fixture in tests/conftest.py wraps the test's database connection; an UPDATE that
sets marketplace_reservation's status from application code anywhere else fails the test.
Tests themselves may set a status directly to arrange a case.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRITER = str(ROOT / "marketplace" / "services" / "transitions.py")
_TESTS = str(ROOT / "tests") + "/"
_ROOT = str(ROOT) + "/"

# An UPDATE of the reservation table whose SET list (up to its WHERE) names the status column,
# as the ORM writes it ("status" = %s) or by hand (status = …); status_reason is not it.
STATUS_WRITE = re.compile(
    r'UPDATE\s+"?marketplace_reservation"?\s+SET\s(?:(?!\bWHERE\b).)*?(?<![\w.])"?status"?\s*=',
    re.IGNORECASE | re.DOTALL,
)


class StatusWrittenOutsideTransitions(AssertionError):
    pass


def status_write_guard(execute, sql, params, many, context):
    if isinstance(sql, str) and "marketplace_reservation" in sql and STATUS_WRITE.search(sql):
        _refuse_unless_from_the_writer()
    return execute(sql, params, many, context)


def _refuse_unless_from_the_writer() -> None:
    culprit = None
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path == WRITER:
            return
        if culprit is None and path.startswith(_ROOT) and not path.startswith(_TESTS):
            if "/.venv/" not in path:
                culprit = frame
        frame = frame.f_back
    if culprit is not None:
        raise StatusWrittenOutsideTransitions(
            f"{culprit.f_code.co_filename}:{culprit.f_lineno} ({culprit.f_code.co_name}) "
            "writes Reservation.status outside marketplace.services.transitions"
        )
