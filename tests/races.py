"""Races against real PostgreSQL: calls released together from threads, each with its own
connection (tests marked django_db(transaction=True), so each thread sees what the others
commit)."""

import threading

from django.db import connections

from config.errors import ApplicationError

__all__ = ["run_together"]


def run_together(*calls, timeout: float = 120) -> list[str]:
    """Run each call in its own thread, released at once by a barrier; each one's outcome, in
    order: "ok", the error code of a refusal, or "error: ..." for anything else."""
    barrier = threading.Barrier(len(calls))
    outcomes = [""] * len(calls)

    def client(i, call):
        try:
            barrier.wait()
            call()
            outcomes[i] = "ok"
        except ApplicationError as exc:
            outcomes[i] = exc.code
        except Exception as exc:  # noqa: BLE001 - any other outcome is a failure to report
            outcomes[i] = f"error: {exc!r}"
        finally:
            connections.close_all()

    threads = [threading.Thread(target=client, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert all(not t.is_alive() for t in threads), "a racing call did not finish"
    return outcomes
