"""The load test's traffic (run by bench/loadtest/run.py; `make loadtest`).

Customers: each locust user is one organisation's integration with its own API key; it
searches, quotes, reserves from the quote, lists, extends and cancels. Agents: site agents
heartbeating with their node tokens. A refusal the product gives by design (409: the GPUs
were taken or the extension collides; 402: funds) is counted as "refused", not as an error;
anything else that is not 2xx, and every 5xx, is an error.

LOADTEST_DATA names the JSON file run.py wrote (keys, node tokens, GPU models);
LOADTEST_MAX_REQUESTS stops the run after that many requests.
"""

import json
import os
import random
import uuid
from datetime import UTC, datetime, timedelta

import gevent
from locust import HttpUser, between, events, task

DATA = json.loads(open(os.environ["LOADTEST_DATA"]).read())  # noqa: SIM115
MAX_REQUESTS = int(os.environ.get("LOADTEST_MAX_REQUESTS", "0"))
# Share of reservations that start now (provisioned by the worker while the test runs).
STARTING_NOW = float(os.environ.get("LOADTEST_STARTING_NOW", "0.1"))
REFUSED = {402, 409}
_keys = list(DATA["api_keys"])
_tokens = list(DATA["node_tokens"])
_sent = 0
refused_by_operation: dict[str, int] = {}


@events.request.add_listener
def _count(request_type, name, response, exception, **_kwargs):
    global _sent
    _sent += 1
    if MAX_REQUESTS and _sent == MAX_REQUESTS:
        runner = _count.environment.runner
        gevent.spawn(runner.quit)


@events.init.add_listener
def _remember_environment(environment, **_kwargs):
    _count.environment = environment


@events.quitting.add_listener
def _write_refusals(environment, **_kwargs):
    path = os.environ.get("LOADTEST_REFUSALS")
    if path:
        with open(path, "w") as out:
            json.dump(refused_by_operation, out)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Customer(HttpUser):
    weight = 9
    wait_time = between(0.2, 1.0)

    def on_start(self):
        self.key = _keys.pop() if _keys else random.choice(DATA["api_keys"])
        self.client.headers["Authorization"] = f"Bearer {self.key}"
        self.reservations: list[str] = []

    def _window(self) -> tuple[datetime, datetime]:
        now = datetime.now(UTC).replace(microsecond=0)
        if random.random() < STARTING_NOW:
            start = now + timedelta(seconds=5)
        else:
            start = now + timedelta(hours=random.randint(2, 24 * 10))
        return start, start + timedelta(hours=random.choice((1, 2, 4, 8)))

    def _call(self, method: str, path: str, name: str, **kwargs):
        with self.client.request(method, path, name=name, catch_response=True, **kwargs) as r:
            if r.status_code in REFUSED:
                refused_by_operation[name] = refused_by_operation.get(name, 0) + 1
                r.success()
            elif r.status_code >= 300:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            return r

    @task(4)
    def search(self):
        start, end = self._window()
        self._call(
            "GET",
            "/api/v1/availability",
            "search",
            params={"gpu_model": random.choice(DATA["gpu_models"]),
                    "gpu_count": random.choice((1, 2, 4, 8)),
                    "start": _iso(start), "end": _iso(end)},
        )  # fmt: skip

    @task(3)
    def quote_and_reserve(self):
        start, end = self._window()
        quote = self._call(
            "POST",
            "/api/v1/quotes",
            "quote",
            json={"gpu_model": random.choice(DATA["gpu_models"]),
                  "gpu_count": random.choice((1, 1, 2, 4, 8)),
                  "starts_at": _iso(start), "ends_at": _iso(end)},
        )  # fmt: skip
        if quote.status_code != 201:
            return
        reservation = self._call(
            "POST",
            "/api/v1/reservations",
            "reserve",
            json={"quote": quote.json()["id"]},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        if reservation.status_code == 201:
            self.reservations.append(reservation.json()["id"])

    @task(2)
    def list_reservations(self):
        self._call("GET", "/api/v1/reservations", "list", params={"limit": 25})

    @task(1)
    def extend(self):
        if not self.reservations:
            return
        reservation_id = random.choice(self.reservations)
        detail = self._call("GET", f"/api/v1/reservations/{reservation_id}", "detail")
        if detail.status_code != 200 or "extend" not in detail.json()["allowed_actions"]:
            return
        new_end = datetime.fromisoformat(detail.json()["ends_at"]) + timedelta(hours=1)
        self._call(
            "POST",
            f"/api/v1/reservations/{reservation_id}/extend",
            "extend",
            json={"ends_at": _iso(new_end)},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )

    @task(1)
    def cancel(self):
        if not self.reservations:
            return
        reservation_id = self.reservations.pop(random.randrange(len(self.reservations)))
        self._call(
            "POST",
            f"/api/v1/reservations/{reservation_id}/cancel",
            "cancel",
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )


class SiteAgent(HttpUser):
    weight = 1
    wait_time = between(1.0, 3.0)

    def on_start(self):
        self.token = _tokens.pop() if _tokens else random.choice(DATA["node_tokens"])
        self.client.headers["Authorization"] = f"Bearer {self.token}"

    @task
    def heartbeat(self):
        with self.client.post(
            "/api/v1/agent/heartbeat",
            json={"agent_version": "loadtest"},
            name="heartbeat",
            catch_response=True,
        ) as r:
            if r.status_code >= 300:
                r.failure(f"{r.status_code}: {r.text[:200]}")
