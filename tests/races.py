"""Races against real PostgreSQL: calls released together from threads, each with its own
connection (tests marked django_db(transaction=True), so each thread sees what the others
commit); and a session holding its locks until another one has come to wait for them, as
PostgreSQL's lock table tells (never a sleep that hopes the other is waiting by then)."""

import threading
import time

from django.db import connections

from config.errors import ApplicationError

__all__ = ["outcome_of", "run_together", "until_a_backend_waits_for_this_one"]


def run_together(*calls, timeout: float = 120) -> list[str]:
    """Run each call in its own thread, released at once by a barrier; each one's outcome, in
    order: "ok", the error code of a refusal, or "error: ..." for anything else."""
    barrier = threading.Barrier(len(calls))
    outcomes = [""] * len(calls)

    def client(i, call):
        barrier.wait()
        outcomes[i] = outcome_of(call)

    threads = [threading.Thread(target=client, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert all(not t.is_alive() for t in threads), "a racing call did not finish"
    return outcomes


def outcome_of(call) -> str:
    """Run `call` in this thread: "ok", the error code of a refusal, or "error: ..." for
    anything else; the thread's database connections are closed after it."""
    try:
        call()
        return "ok"
    except ApplicationError as exc:
        return exc.code
    except Exception as exc:  # noqa: BLE001 - any other outcome is a failure to report
        return f"error: {exc!r}"
    finally:
        connections.close_all()


# Those this backend blocks, and those queued behind them (for the same row, each waits for
# the one before it, not for the holder).
_WAITING_SQL = """
WITH RECURSIVE waiting(pid) AS (
    SELECT pid FROM pg_locks WHERE NOT granted AND pg_backend_pid() = ANY(pg_blocking_pids(pid))
    UNION
    SELECT l.pid FROM pg_locks l JOIN waiting w
    ON NOT l.granted AND w.pid = ANY(pg_blocking_pids(l.pid))
)
SELECT count(DISTINCT pid) FROM waiting
"""


def until_a_backend_waits_for_this_one(seconds: float = 10, *, count: int = 1) -> bool:
    """Whether `count` other backends came to wait for a lock this thread's connection holds
    (directly, or queued behind one that does) within `seconds` (PostgreSQL's lock table, read
    live even inside a transaction; pg_stat_activity is read once a transaction, so it never
    shows a session that connected since)."""
    deadline = time.monotonic() + seconds
    with connections["default"].cursor() as cur:
        while time.monotonic() < deadline:
            cur.execute(_WAITING_SQL)
            if cur.fetchone()[0] >= count:
                return True
            time.sleep(0.01)
    return False
