"""The PostgreSQL backend: django-prometheus's instrumented one (query timings for /metrics),
with PgBouncer's rule for health checks (its server_check_delay).

Django's CONN_HEALTH_CHECKS sends `SELECT 1` before the first query of every request on a
persistent connection: a round trip per request, the cheapest endpoints' largest single cost.
Here a connection that ran a query less than DATABASE_HEALTH_CHECK_AFTER_IDLE_SECONDS ago is
taken as healthy; one idle for longer is checked, and replaced if the server dropped it
(restart, idle timeout, failover). A connection that breaks in between fails that request's
query (503, config/outages.py) and Django closes it at the end of the request.
"""

import time

from django.conf import settings
from django_prometheus.db.backends.postgresql import base

__all__ = ["DatabaseWrapper"]


class DatabaseWrapper(base.DatabaseWrapper):
    last_used: float | None = None

    def create_cursor(self, name=None):
        self.last_used = time.monotonic()
        return super().create_cursor(name=name)

    def close_if_health_check_failed(self) -> None:
        if (
            self.connection is not None
            and not self.health_check_done
            and self.last_used is not None
            and time.monotonic() - self.last_used
            < settings.DATABASE_HEALTH_CHECK_AFTER_IDLE_SECONDS
        ):
            self.health_check_done = True
            return
        super().close_if_health_check_failed()

    def close(self) -> None:
        super().close()
        self.last_used = None
