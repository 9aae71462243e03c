"""Run by tests/test_replica.py in a process of its own, with DATABASE_URL naming a throwaway
primary and DATABASE_REPLICA_URL its streaming replica (the settings read both as in
production). It books a node's GPUs through the API while the replica's replay is paused and
after it resumes, records which database alias every statement went to, and prints what it
saw as one JSON line for the test to check.

    python tests/replica_scenario.py
"""

import json
import os
import sys
import time
from contextlib import ExitStack
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.db import connections  # noqa: E402

from billing.models import Hold  # noqa: E402
from billing.services.accounts import billing_account_get_or_create  # noqa: E402
from billing.services.credits import credit_issue  # noqa: E402
from marketplace.services.api_keys import api_key_create  # noqa: E402
from tests.clients import HttpsClient  # noqa: E402
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory  # noqa: E402
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, tomorrow  # noqa: E402

statements: list[tuple[str, str]] = []


def _recorder(alias: str):
    def record(execute, sql, params, many, context):
        statements.append((alias, sql))
        return execute(sql, params, many, context)

    return record


def _lsn_caught_up(timeout: float = 20.0) -> float:
    """Wait until the replica has replayed everything the primary has written; seconds waited.

    The insert position, not pg_current_wal_lsn() (the write position): the throwaway primary
    runs with synchronous_commit=off, so a commit just made may not be written out yet."""
    with connections["default"].cursor() as cur:
        cur.execute("SELECT pg_current_wal_insert_lsn()")
        (target,) = cur.fetchone()
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with connections["replica"].cursor() as cur:
            cur.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target])
            if cur.fetchone()[0]:
                return time.monotonic() - started
        time.sleep(0.01)
    raise SystemExit(f"the replica did not replay up to {target} within {timeout} s")


def _replay(action: str) -> None:
    with connections["replica"].cursor() as cur:
        cur.execute(f"SELECT pg_wal_replay_{action}()")


def _client(organization) -> HttpsClient:
    _, secret = api_key_create(
        organization=organization, name="replica test", scopes=["read", "write"], created_by=None
    )
    return HttpsClient(HTTP_AUTHORIZATION=f"Bearer {secret}")


def main() -> None:
    make_policy()
    gpu_model = GpuModelFactory(slug="h100-replica")
    site = SiteFactory(slug="replica-site")
    make_rate(gpu_model, "2.00")
    make_nodes(site, gpu_model, 1, gpus=8)
    booker, other = OrganizationFactory(), OrganizationFactory()
    for org in (booker, other):
        account = billing_account_get_or_create(organization=org)
        credit_issue(
            organization=org, amount=Decimal("1000.00"), reason="test", created_by=None,
            currency=account.currency,
        )  # fmt: skip
    booker_api, other_api = _client(booker), _client(other)
    start = tomorrow()
    period = {"start": start.isoformat(), "end": (start + timedelta(hours=2)).isoformat()}
    search_params = {"gpu_model": gpu_model.slug, "gpu_count": 8, "site": site.slug, **period}
    booking = {
        "gpu_model": gpu_model.slug, "gpu_count": 8, "site": site.slug,
        "starts_at": period["start"], "ends_at": period["end"],
    }  # fmt: skip

    steps: dict[str, dict] = {}

    def step(name: str, call) -> None:
        first = len(statements)
        response = call()
        body = response.json()
        steps[name] = {
            "status": response.status_code,
            "body": body,
            "statements": statements[first:],
        }

    def search(api):
        return lambda: api.get("/api/v1/availability", search_params, secure=True)

    def reserve(api):
        return lambda: api.post(
            "/api/v1/reservations", booking, content_type="application/json", secure=True
        )

    with ExitStack() as stack:
        for alias in ("default", "replica"):
            stack.enter_context(connections[alias].execute_wrapper(_recorder(alias)))
        _lsn_caught_up()
        step("search_before", search(other_api))
        _replay("pause")
        step("reserve", reserve(booker_api))
        # The replica has not replayed the booking: an unpinned client still sees the GPUs.
        step("search_stale", search(other_api))
        # The client that just booked reads the primary (read-your-writes).
        step("search_by_booker", search(booker_api))
        # What the stale search offered cannot be booked: placement reads the primary.
        step("reserve_stale_offer", reserve(other_api))
        _replay("resume")
        waited = _lsn_caught_up()
        step("search_caught_up", search(other_api))
        time.sleep(float(os.environ["DATABASE_REPLICA_PIN_SECONDS"]) + 0.2)
        step("list_after_pin", lambda: booker_api.get("/api/v1/reservations", secure=True))

    print(
        json.dumps(
            {
                "steps": steps,
                "replay_wait_seconds": waited,
                "holds": {
                    "booker": Hold.objects.filter(organization=booker).count(),
                    "other": Hold.objects.filter(organization=other).count(),
                },
            },
            default=str,
        )
    )


if __name__ == "__main__":
    main()
