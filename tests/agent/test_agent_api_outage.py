"""The API out of reach while a job runs: the job goes on, is reported once the API is back,
and is never run twice, even when its lease ran out meanwhile and it was handed out again.

The real agent loop runs a real container with podman against the API on a live server,
through a TCP relay the test switches off (connections are accepted and closed at once, as a
site's uplink or a load balancer losing its backends does).
"""

import logging
import socket
import threading
import time
import urllib.error
from urllib.parse import urlparse

import pytest
from switchyard_agent import Agent, AgentClient

from inventory.services import node_token_issue
from marketplace.models import AgentJob, AgentJobStatus, Allocation
from marketplace.provisioning.drivers import SiteAgentDriver
from marketplace.provisioning.services import reservation_provision_step
from tests.agent.conftest import _names_made, podman
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create, wait_for

pytestmark = [pytest.mark.usefixtures("allow_all_funding")]


class Relay:
    """A TCP relay to the live server that can be cut (it then closes what it accepts)."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.up = target, True
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            if not self.up:
                conn.close()
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.mark.container
@pytest.mark.django_db(transaction=True)
def test_a_start_whose_lease_ran_out_in_an_outage_goes_on_and_runs_once(
    live_server, executor_factory, test_image, caplog
):
    caplog.set_level(logging.INFO, logger="switchyard.agent")
    market = market_create(nodes=1, gpus=2)
    # Ready 9 s after it starts: the API is cut for 7 s of that, longer than the 5 s lease.
    reservation = market.book(
        gpu_count=1, workload={"image": test_image, "ports": [8080], "env": {"READY_AFTER": "9"}}
    )
    outcome = reservation_provision_step(
        reservation_id=reservation.pk, driver=SiteAgentDriver(), check_window=0
    ).outcome
    assert outcome == "waiting"
    name = f"sy-{reservation.public_id}"
    _names_made.append(name)
    node = Allocation.objects.filter(reservation=reservation).first().node
    _token, secret = node_token_issue(node=node, label="site agent")
    server = urlparse(live_server.url)
    relay = Relay((server.hostname, server.port))
    agent = Agent(
        client=AgentClient(api=f"http://127.0.0.1:{relay.port}", token=secret),
        executor=executor_factory(),
        lease_seconds=5,
    )
    loop = threading.Thread(
        target=agent.loop, kwargs={"poll_seconds": 0.3, "heartbeat_seconds": 1, "once": True}
    )
    loop.start()
    start = wait_for(
        lambda: AgentJob.objects.filter(
            reservation=reservation, kind="start", status=AgentJobStatus.LEASED
        ).first(),
        timeout=30,
        what="the start's lease",
    )
    relay.up = False
    time.sleep(7)
    relay.up = True
    loop.join(timeout=60)

    assert not loop.is_alive()
    start.refresh_from_db()
    assert start.status == AgentJobStatus.DONE
    assert start.result["ports"] == {
        "8080": int(podman("port", name, "8080").stdout.split(":")[-1])
    }
    # Run once. Its lease ran out in the outage; once the API is back, whichever reaches it
    # first takes the job on: the run's own renewal (the holder's lease, not handed out
    # meanwhile) or the loop's next lease, which hands it out again (attempt 2) and then the
    # run goes on under the new lease.
    runs = [m for m in caplog.messages if m.startswith(f"job {start.pk}: start for")]
    assert len(runs) == 1
    leased_again = f"job {start.pk} leased again while it runs here: going on under the new lease"
    assert (leased_again in caplog.messages) == (start.attempts == 2)
    assert start.attempts in (1, 2)
    assert not any("crashed" in m or "adopting" in m for m in caplog.messages)


class OutageClient:
    """Stands in for the API: `down` requests in a row fail as unreachable, then answers."""

    def __init__(self, *, down: int, answers: dict):
        self.down, self.answers, self.posts = down, answers, []

    def post(self, path: str, body: dict, *, request_id: str = ""):
        self.posts.append((path, dict(body)))
        if self.down:
            self.down -= 1
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        answer = self.answers.get(path, (200, {}))
        return answer.pop(0) if isinstance(answer, list) else answer


class Done:
    def run(self, kind, payload, progress):
        progress({"step": "run"})
        return {"host": "h", "ports": {}}


def test_a_completion_is_sent_again_until_the_api_answers(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    client = OutageClient(down=4, answers={})  # the progress report, then three completions
    agent = Agent(client=client, executor=Done())
    job = {"id": 7, "lease_id": "L1", "kind": "start", "reservation": "r", "payload": {}}

    agent.run_job(job)

    assert [path for path, _ in client.posts] == [
        "agent/jobs/7/progress", *["agent/jobs/7/complete"] * 4
    ]  # fmt: skip
    assert client.posts[-1][1] == {"lease_id": "L1", "result": {"host": "h", "ports": {}}}
    assert agent.jobs_running == {}


def test_a_completion_refused_for_a_lease_taken_again_here_is_sent_under_the_new_one():
    agent = Agent(client=None, executor=Done())
    job = {"id": 7, "lease_id": "L1", "kind": "start", "reservation": "r", "payload": {}}
    lost = (409, {"error": {"code": "lease_lost"}})

    class Client(OutageClient):
        def post(self, path, body, *, request_id=""):
            answer = super().post(path, body, request_id=request_id)
            if body.get("lease_id") == "L1" and path.endswith("/complete"):
                # The loop leased the job again meanwhile (its lease had run out).
                assert agent.job_lease_again({"id": 7, "lease_id": "L2"}) is True
            return answer

    agent.client = Client(down=0, answers={"agent/jobs/7/complete": [lost, (200, {})]})

    agent.run_job(job)

    completions = [body["lease_id"] for path, body in agent.client.posts if "complete" in path]
    assert completions == ["L1", "L2"]
    assert agent.jobs_running == {}
    # Finished: a lease of it handed out later is a job to run, not one running here.
    assert agent.job_lease_again({"id": 7, "lease_id": "L3"}) is False


def test_a_step_reported_again_and_again_is_sent_once_in_a_while():
    """A start waiting for its ports says so four times a second: sent every time, a few such
    starts went over the node's request limit, and its 429 paused the heartbeats too."""

    class Waiting:
        def run(self, kind, payload, progress):
            for ports in ([22, 8080],) * 40 + ([8080],) * 40:
                progress({"step": "readiness", "waiting_for_ports": ports})
            progress({"step": "ready"})
            return {"host": "h", "ports": {}}

    client = OutageClient(down=0, answers={})
    agent = Agent(client=client, executor=Waiting())

    agent.run_job({"id": 7, "lease_id": "L1", "kind": "start", "reservation": "r", "payload": {}})

    sent = [body["progress"] for path, body in client.posts if path.endswith("/progress")]
    assert sent == [
        {"step": "readiness", "waiting_for_ports": [22, 8080]},
        {"step": "ready"},
    ]
