"""The agent obeys Retry-After (a 429 past its node's rate limit, AGENT_THROTTLE_RATE, or a 503
that says when): every request of the agent waits until then, and the refused one is sent
again, so a job's completion is not lost to the limit. Run against a stub of the API over real
HTTP (the API's own 429 is tested in tests/inventory/test_agent_rate_limit.py)."""

import json
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from switchyard_agent import (
    RETRY_AFTER_MAX_SECONDS,
    Agent,
    AgentClient,
    DryRunExecutor,
    retry_after_seconds,
)


class LimitedApi:
    """Answers `refusals` requests with `status` and Retry-After: `retry_after`, then 200;
    records each request's path and time."""

    def __init__(self, *, refusals: int, retry_after: str | None, status: int = 429):
        self.refusals = refusals
        self.calls: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with api.lock:
                    api.calls.append((time.monotonic(), self.path.removeprefix("/api/v1/")))
                    refuse = api.refusals > 0
                    api.refusals -= refuse
                answer = {"error": {"code": "rate_limited"}} if refuse else {"ok": True}
                data = json.dumps(answer).encode()
                self.send_response(status if refuse else 200)
                if refuse and retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def limited():
    made: list[LimitedApi] = []

    def build(**options) -> LimitedApi:
        made.append(LimitedApi(**options))
        return made[-1]

    yield build
    for api in made:
        api.close()


@pytest.mark.parametrize("status", [429, 503])
def test_a_refused_request_is_sent_again_after_retry_after(limited, status):
    api = limited(refusals=1, retry_after="1", status=status)
    client = AgentClient(api=api.url, token="nt_test")

    started = time.monotonic()
    answer = client.post("agent/heartbeat", {})

    assert answer == (200, {"ok": True})
    (first, _), (second, _) = api.calls
    assert second - first >= 0.95  # it waited as told
    assert time.monotonic() - started < 5


def test_a_job_s_completion_survives_the_rate_limit(limited):
    """Without the retry the agent logged the 429 and dropped the report: its lease ran out
    and the job ran again."""
    api = limited(refusals=1, retry_after="1")
    agent = Agent(
        client=AgentClient(api=api.url, token="nt_test"), executor=DryRunExecutor(host="h")
    )
    job = {
        "id": 7, "lease_id": "l7", "kind": "start", "reservation": "r7",
        "payload": {"container_name": "sy-r7"},
    }  # fmt: skip

    agent.run_job(job)

    assert [path for _, path in api.calls] == ["agent/jobs/7/complete"] * 2


def test_every_request_waits_out_the_pause(limited):
    """The heartbeat's 429 holds back the loop's lease too: the agent slows down as a whole."""
    api = limited(refusals=1, retry_after="1")
    client = AgentClient(api=api.url, token="nt_test")
    beat = threading.Thread(target=client.post, args=("agent/heartbeat", {}))
    beat.start()
    deadline = time.monotonic() + 10
    while not client._paused_until:  # until the refusal has come back and paused the client
        assert time.monotonic() < deadline, "the heartbeat's refusal never came back"
        time.sleep(0.01)

    assert client.post("agent/jobs/lease", {})[0] == 200
    beat.join()

    refused_at = api.calls[0][0]
    assert all(at - refused_at >= 0.95 for at, _ in api.calls[1:])
    assert sorted(path for _, path in api.calls) == ["agent/heartbeat"] * 2 + ["agent/jobs/lease"]


def test_it_gives_up_after_its_retries_and_answers_the_refusal(limited):
    api = limited(refusals=10, retry_after="0")
    client = AgentClient(api=api.url, token="nt_test", retries=2)

    status, body = client.post("agent/jobs/lease", {})

    assert (status, body) == (429, {"error": {"code": "rate_limited"}})
    assert len(api.calls) == 3


def test_a_refusal_without_retry_after_is_answered_at_once(limited):
    api = limited(refusals=1, retry_after=None, status=503)
    client = AgentClient(api=api.url, token="nt_test")

    assert client.post("agent/heartbeat", {})[0] == 503
    assert len(api.calls) == 1


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        (" 2.5 ", 2.5),
        ("-3", 0.0),
        ("86400", RETRY_AFTER_MAX_SECONDS),  # a wrong header cannot silence the node for a day
        ("soon", None),
        ("nan", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_is_read_within_bounds(header, expected):
    assert retry_after_seconds(header) == expected


def test_retry_after_may_be_an_http_date():
    now = time.time()
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(
        30, abs=1
    )
