"""An idle agent does not poll: it leases when a heartbeat's answer says work waits
(`work_waiting`), or every idle_poll_seconds; it polls every poll_seconds while jobs run, and
against an API whose answer does not say. Run against a stub of the API over real HTTP (the
real endpoints' answers are tested in tests/inventory/test_heartbeat_work_waiting.py)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from switchyard_agent import Agent, AgentClient, DryRunExecutor, SettingsError, settings_load

HEARTBEAT = 0.3  # seconds between heartbeats in these tests


class StubApi:
    """The agent's endpoints over HTTP: a heartbeat answer that says whether a job or a
    burn-in is queued (or, `says_work=False`, an older API's answer without the field), and
    the fields in `tells` (the heartbeat interval, say); `down`: heartbeats answered 503. Jobs
    and burn-ins handed out in the order queued; every request recorded with its time."""

    def __init__(self, *, says_work: bool = True, tells: dict | None = None):
        self.says_work = says_work
        self.tells = dict(tells or {})
        self.revoked = False
        self.down = False
        self.jobs: list[dict] = []
        self.burn_ins: list[dict] = []
        self.calls: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                status, answer = stub.answer(self.path.removeprefix("/api/v1/"), body)
                data = b"" if answer is None else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, body: dict) -> tuple[int, dict | None]:
        with self.lock:
            self.calls.append((time.monotonic(), path))
            if path == "agent/heartbeat":
                if self.revoked:
                    return 401, {"error": {"type": "authentication_error"}}
                if self.down:
                    return 503, {"error": {"type": "service_unavailable"}}
                beat = {"node": "gpu1", "status": "available", **self.tells}
                if self.says_work:
                    beat["work_waiting"] = bool(self.jobs or self.burn_ins)
                return 200, beat
            if path == "agent/workloads":
                return 200, {"notices": []}
            if path == "agent/jobs/lease":
                return (200, self.jobs.pop(0)) if self.jobs else (204, None)
            if path == "agent/burn-ins/lease":
                return (200, self.burn_ins.pop(0)) if self.burn_ins else (204, None)
            return 200, {}

    def job_queue(self, job_id: int) -> float:
        """Queue a dry-run start job; returns when."""
        with self.lock:
            self.jobs.append({
                "id": job_id, "lease_id": f"l{job_id}", "kind": "start",
                "reservation": f"r{job_id}", "payload": {"container_name": f"sy-r{job_id}"},
            })  # fmt: skip
            return time.monotonic()

    def count(self, path: str, *, since: float = 0.0) -> int:
        with self.lock:
            return sum(1 for at, called in self.calls if called == path and at >= since)

    def first(self, path: str) -> float:
        with self.lock:
            return next(at for at, called in self.calls if called == path)

    def times(self, path: str, *, since: float = 0.0) -> list[float]:
        with self.lock:
            return [at for at, called in self.calls if called == path and at >= since]


@pytest.fixture
def stub():
    made: list[StubApi] = []

    def build(**options) -> StubApi:
        made.append(StubApi(**options))
        return made[-1]

    yield build
    for api in made:
        api.server.shutdown()
        api.server.server_close()


class Running:
    """The agent's loop in a thread, as `switchyard-agent` runs it; stopped by revoking its
    token (the only way the loop ends), which must also wake an idle loop."""

    def __init__(
        self, api: StubApi, *, poll=0.05, idle_poll=60.0, executor=None, heartbeat=HEARTBEAT,
        pinned=False,
    ):  # fmt: skip
        self.api = api
        self.agent = Agent(
            client=AgentClient(api=api.url, token="nt_test"),
            executor=executor or DryRunExecutor(host="h"),
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run,
            kwargs={"poll": poll, "idle_poll": idle_poll, "heartbeat": heartbeat, "pinned": pinned},
            daemon=True,
        )
        self.thread.start()

    def _run(self, *, poll: float, idle_poll: float, heartbeat: float, pinned: bool) -> None:
        try:
            self.agent.loop(
                poll_seconds=poll, heartbeat_seconds=heartbeat, once=False,
                idle_poll_seconds=idle_poll, heartbeat_pinned=pinned,
            )  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            self.error = exc

    def stop(self) -> float:
        """Revoke the token; how long the loop took to end."""
        revoked = time.monotonic()
        self.api.revoked = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        assert isinstance(self.error, SettingsError), self.error
        return time.monotonic() - revoked


def test_an_idle_agent_sends_only_heartbeats(stub):
    api = stub()
    agent = Running(api)
    time.sleep(0.2)  # its first heartbeat and leases
    settled = time.monotonic()

    time.sleep(5 * HEARTBEAT)

    assert api.count("agent/heartbeat", since=settled) >= 4
    assert api.count("agent/jobs/lease", since=settled) == 0
    assert api.count("agent/burn-ins/lease", since=settled) == 0
    assert (api.count("agent/jobs/lease"), api.count("agent/burn-ins/lease")) == (1, 1)
    assert agent.stop() < 2 * HEARTBEAT  # revoked while idle: it stops at the next heartbeat


def test_an_idle_agent_leases_a_job_within_one_heartbeat_of_it_being_queued(stub):
    api = stub()
    agent = Running(api)
    time.sleep(0.2 + HEARTBEAT / 2)  # idle, between two heartbeats

    queued = api.job_queue(7)
    deadline = time.monotonic() + 5
    while api.count("agent/jobs/7/complete") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    leased = [at for at, path in api.calls if path == "agent/jobs/lease" and at > queued]
    assert leased and leased[0] - queued <= HEARTBEAT + 0.2
    assert api.count("agent/jobs/7/complete") == 1
    agent.stop()


def test_a_queued_burn_in_is_leased_within_one_heartbeat_too(stub):
    api = stub()
    agent = Running(api)
    time.sleep(0.2 + HEARTBEAT / 2)

    with api.lock:
        queued = time.monotonic()
        api.burn_ins.append({"id": 3, "command": "true", "time_limit_seconds": 5})
    deadline = time.monotonic() + 5
    while api.count("agent/burn-ins/3/result") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    assert api.count("agent/burn-ins/3/result") == 1
    assert api.first("agent/burn-ins/3/result") - queued <= HEARTBEAT + 0.5
    agent.stop()


def test_while_a_job_runs_the_agent_polls_every_poll_seconds(stub):
    api = stub()

    class Slow(DryRunExecutor):
        def run(self, kind, payload, progress):
            time.sleep(1.0)
            return super().run(kind, payload, progress)

    api.job_queue(1)
    agent = Running(api, poll=0.1, executor=Slow(host="h"))
    deadline = time.monotonic() + 5
    while api.count("agent/jobs/1/complete") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started, done = api.first("agent/jobs/lease"), api.first("agent/jobs/1/complete")

    polls = [at for at, path in api.calls if path == "agent/jobs/lease" and started < at < done]
    assert done - started >= 1.0
    assert len(polls) >= 6  # every 0.1 s while it ran (the node is busy: the next job may come)
    agent.stop()


def test_against_an_api_that_does_not_say_it_polls_every_poll_seconds(stub):
    api = stub(says_work=False)
    agent = Running(api, poll=0.1)
    time.sleep(0.2)
    settled = time.monotonic()

    time.sleep(1.0)

    assert api.count("agent/jobs/lease", since=settled) >= 7
    assert api.count("agent/burn-ins/lease", since=settled) >= 7
    agent.stop()


def test_an_idle_agent_still_leases_every_idle_poll_seconds(stub):
    """Should a signal be missed (a heartbeat lost), work is found within idle_poll_seconds."""
    api = stub()
    agent = Running(api, idle_poll=0.5)
    time.sleep(0.2)
    settled = time.monotonic()

    time.sleep(1.6)

    assert 2 <= api.count("agent/jobs/lease", since=settled) <= 4  # at 0.5 s, 1 s, 1.5 s
    agent.stop()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"idle_poll_seconds": 1.0, "poll_seconds": 2.0}, "idle_poll_seconds must be at least"),
        ({"poll_seconds": 0}, "poll_seconds and heartbeat_seconds must be > 0"),
        ({"heartbeat_seconds": -1}, "poll_seconds and heartbeat_seconds must be > 0"),
        ({"idle_poll_seconds": "often"}, "idle_poll_seconds must be float"),
    ],
)
def test_bad_poll_settings_stop_the_agent_with_a_clear_message(flags, message):
    with pytest.raises(SettingsError, match=message):
        settings_load({"api": "https://x.example", **flags}, environ={})


def test_idle_poll_seconds_comes_from_flags_env_or_the_config_file(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('api = "https://x.example"\nidle_poll_seconds = 120\n')

    assert settings_load({}, environ={}, config_path=str(config)).idle_poll_seconds == 120.0
    environ = {"SWITCHYARD_IDLE_POLL_SECONDS": "90"}
    assert settings_load({}, environ=environ, config_path=str(config)).idle_poll_seconds == 90.0
    flags = {"idle_poll_seconds": 60.0}
    assert settings_load(flags, environ=environ, config_path=str(config)).idle_poll_seconds == 60
    assert settings_load({"api": "https://x.example"}, environ={}).idle_poll_seconds == 300.0
