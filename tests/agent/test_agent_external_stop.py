"""The agent tells a container stopped from outside its workload (an operator's stop or kill
through the runtime, a reboot) from the workload's own exit, by what the runtime records and
never by the exit code alone. Real podman: test_container_executor.py; here the rule itself,
and docker's answers (no docker daemon runs here), stood in for."""

import json
import subprocess
import time
from datetime import UTC, datetime

import pytest
import switchyard_agent
from switchyard_agent import (
    STOPPED_BY_REBOOT,
    STOPPED_BY_RUNTIME,
    Agent,
    ContainerExecutor,
    ExecutorError,
    node_boot_time,
    runtime_time,
    stopped_from_outside,
)

BOOT = datetime(2026, 12, 8, 3, 0, tzinfo=UTC).timestamp()
AFTER_BOOT = "2026-12-08T04:05:06.123456789Z"
BEFORE_BOOT = "2026-12-08T02:59:59.5Z"


def _exited(**state) -> dict:
    return {"Status": "exited", "Running": False, "ExitCode": 143, "OOMKilled": False,
            "FinishedAt": AFTER_BOOT, **state}  # fmt: skip


class Events:
    """The runtime's stop/kill events, as stop_signalled answers them; records being asked."""

    def __init__(self, answer: bool):
        self.answer, self.asked = answer, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.answer


def test_a_podman_stop_or_kill_is_a_stop_from_outside_whatever_the_exit_code():
    for code in (0, 137, 143):
        state = _exited(ExitCode=code, StoppedByUser=True)
        assert stopped_from_outside(state, boot_time=BOOT) == STOPPED_BY_RUNTIME


def test_a_workload_exiting_143_by_itself_on_podman_is_its_own_exit():
    events = Events(True)
    state = _exited(ExitCode=143, StoppedByUser=False)

    assert stopped_from_outside(state, boot_time=BOOT, stop_signalled=events) is None
    # podman's inspect says who stopped it: its events are not needed, nor read.
    assert events.asked == 0


def test_without_stopped_by_user_a_stop_or_kill_event_of_the_run_decides():
    logged, none = Events(True), Events(False)

    assert stopped_from_outside(_exited(), boot_time=BOOT, stop_signalled=logged) == (
        STOPPED_BY_RUNTIME
    )
    assert stopped_from_outside(_exited(), boot_time=BOOT, stop_signalled=none) is None
    assert stopped_from_outside(_exited(), boot_time=BOOT) is None
    assert (logged.asked, none.asked) == (1, 1)


def test_a_container_that_ended_before_the_node_booted_was_stopped_by_the_reboot():
    # podman forgets StoppedByUser across a reboot; the finish time before the boot remains.
    state = _exited(ExitCode=0, StoppedByUser=False, FinishedAt=BEFORE_BOOT)
    assert stopped_from_outside(state, boot_time=BOOT) == STOPPED_BY_REBOOT
    # The boot time unknown: nothing proves it.
    assert stopped_from_outside(state, boot_time=None) is None


@pytest.mark.parametrize(
    "state",
    [
        {"Status": "running", "Running": True, "StoppedByUser": True, "FinishedAt": AFTER_BOOT},
        _exited(OOMKilled=True, ExitCode=137, StoppedByUser=False, FinishedAt=BEFORE_BOOT),
        # Never ran: no finish time (Go's zero time), so no exit to judge.
        _exited(StoppedByUser=True, FinishedAt="0001-01-01T00:00:00Z"),
        _exited(FinishedAt=None),
    ],
)
def test_a_running_an_oom_killed_or_a_never_finished_container_is_not_stopped_from_outside(
    state,
):
    assert stopped_from_outside(state, boot_time=BOOT, stop_signalled=Events(True)) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-08T04:05:06.123456789Z", "2026-12-08T04:05:06.123457+00:00"),
        ("2026-12-08T06:05:06.5+02:00", "2026-12-08T04:05:06.500000+00:00"),
        ("2026-12-08 04:05:06.25 +0000 UTC", "2026-12-08T04:05:06.250000+00:00"),
        ("2026-12-08T04:05:06-0130", "2026-12-08T05:35:06+00:00"),
        ("0001-01-01T00:00:00Z", None),
        ("2026-12-08T04:05:06", None),  # no zone: not a moment
        ("2026-13-08T04:05:06Z", None),
        ("soon", None),
        (None, None),
        (1733630706, None),
    ],
)
def test_runtime_times_are_read_with_their_zone(text, expected):
    value = runtime_time(text)
    if expected is None:
        assert value is None
    else:
        assert datetime.fromtimestamp(value, tz=UTC).isoformat() == expected


def test_the_boot_time_is_the_kernels():
    with open("/proc/uptime", encoding="ascii") as handle:
        uptime = float(handle.read().split()[0])
    assert abs(node_boot_time() - (time.time() - uptime)) < 2


STARTED = "2026-12-08T04:00:00.9Z"
CONTAINERS = {"c0ffee01": "sy-stopped", "c0ffee02": "sy-exited"}


def _docker_event(verb: str, seconds: float) -> str:
    at = datetime.fromisoformat("2026-12-08T04:00:00+00:00").timestamp() + seconds
    return json.dumps({"status": verb, "Action": verb, "timeNano": int(at * 1e9)})


def _podman_event(verb: str, at: str) -> str:
    return json.dumps({"ID": "c0ffee", "Status": verb, "Time": at, "Type": "container"})


# Each runtime's events of the two runs, as it logs them (podman 4.3 and docker, checked).
EVENTS = {
    "docker": {
        # `docker stop`: kill (SIGTERM), die, stop. The workload's own exit: die only.
        "c0ffee01": [_docker_event(v, 300) for v in ("kill", "die", "stop")],
        "c0ffee02": [_docker_event("start", 1), _docker_event("die", 306)],
    },
    "podman": {
        # `podman stop` logs no stop event: the exit's cleanup, then the stopping command's.
        "c0ffee01": [
            _podman_event("start", "2026-12-08T04:00:00.95Z"),
            _podman_event("died", "2026-12-08T04:05:06.1Z"),
            _podman_event("cleanup", "2026-12-08T04:05:06.3Z"),
            _podman_event("cleanup", "2026-12-08T04:05:06.31Z"),
        ],
        # Its own exit: one cleanup in this run; the other was the run before it's, in the
        # second it started, and one after the window is an operator's later stop of it.
        "c0ffee02": [
            _podman_event("cleanup", "2026-12-08T04:00:00.5Z"),
            _podman_event("start", "2026-12-08T04:00:00.95Z"),
            _podman_event("died", "2026-12-08T04:05:06.1Z"),
            _podman_event("cleanup", "2026-12-08T04:05:06.3Z"),
            _podman_event("cleanup", "2026-12-08T04:05:40Z"),
        ],
    },
}


class FakeRuntime:
    """A runtime's answers for two exited containers of the agent's: one an operator stopped,
    one whose workload exited 143 itself. Neither inspect says who stopped it."""

    def __init__(self, flavour: str):
        self.flavour = flavour
        self.calls: list[list[str]] = []
        self.events_fail = False
        self.items = [
            self._item(name, cid, name.replace("sy-", "r_")) for cid, name in CONTAINERS.items()
        ]

    @staticmethod
    def _item(name: str, cid: str, reservation: str) -> dict:
        labels = {"switchyard.managed": "1", "switchyard.reservation": reservation}
        return {"Id": cid, "Name": f"/{name}", "State": _exited(StartedAt=STARTED),
                "Config": {"Labels": labels, "Env": []}}  # fmt: skip

    def __call__(self, args, *, env=None, timeout=900):
        self.calls.append(args)
        out, code = "", 0
        if args[0] == "ps":
            out = "sy-stopped\nsy-exited\n"
        elif args[:2] == ["container", "inspect"]:
            out = json.dumps([i for i in self.items if i["Name"].lstrip("/") in args[2:]])
        elif args[0] == "events":
            code = 1 if self.events_fail else 0
            cid = args[args.index("--filter") + 1].removeprefix("container=")
            out = "" if code else "\n".join(EVENTS[self.flavour][cid]) + "\n"
        return subprocess.CompletedProcess(args, code, out, "events unavailable" if code else "")


@pytest.fixture(params=["docker", "podman"])
def runtime(request, tmp_path, monkeypatch):
    """An executor whose runtime's CLI is FakeRuntime (no docker daemon runs here, and this
    podman's events are read for real in test_container_executor.py)."""
    cli = tmp_path / "bin" / request.param
    cli.parent.mkdir()
    cli.write_text("#!/bin/sh\nexit 1\n")
    cli.chmod(0o755)
    executor = ContainerExecutor(host="127.0.0.1", runtime=str(cli), state_dir=str(tmp_path))
    assert executor.flavour == request.param
    fake = FakeRuntime(request.param)
    monkeypatch.setattr(executor, "_cli", fake)
    monkeypatch.setattr(executor, "log_tail", lambda name, secrets: "")
    monkeypatch.setattr(switchyard_agent, "node_boot_time", lambda: BOOT)
    return executor, fake


def _events_calls(fake: FakeRuntime) -> list[list[str]]:
    return [c for c in fake.calls if c[0] == "events"]


def test_a_stop_through_the_runtime_is_read_from_its_events_and_an_own_exit_is_not(runtime):
    executor, fake = runtime

    report = {e["name"]: e for e in executor.containers()}

    assert report["sy-stopped"]["stopped_by"] == STOPPED_BY_RUNTIME
    assert report["sy-exited"]["stopped_by"] is None
    assert report["sy-exited"]["exit_code"] == 143
    # Each container's own run only, by its id: from its start to a few seconds after its end
    # (podman 4 answers an --until in the past with nothing: it is told not to stream).
    end = ["--stream=false"] if fake.flavour == "podman" else ["--until", "2026-12-08T04:05:10Z"]
    assert sorted(_events_calls(fake)) == sorted(
        ["events", "--since", "2026-12-08T04:00:00Z", *end,
         "--filter", f"container={cid}", "--format", "{{json .}}"]
        for cid in CONTAINERS
    )  # fmt: skip

    # A run that ended does not change: the next heartbeats do not read its events again.
    again = {e["name"]: e["stopped_by"] for e in executor.containers()}
    assert again == {"sy-stopped": STOPPED_BY_RUNTIME, "sy-exited": None}
    assert len(_events_calls(fake)) == 2


def test_events_that_cannot_be_read_prove_nothing_and_are_read_again(runtime):
    executor, fake = runtime
    fake.events_fail = True

    assert {e["stopped_by"] for e in executor.containers()} == {None}

    fake.events_fail = False
    report = {e["name"]: e["stopped_by"] for e in executor.containers()}
    assert report == {"sy-stopped": STOPPED_BY_RUNTIME, "sy-exited": None}
    assert len(_events_calls(fake)) == 4


def _wait_ready(executor: ContainerExecutor, name: str) -> ExecutorError:
    with pytest.raises(ExecutorError) as failed:
        executor._wait_ready({"container_name": name, "ports": [8080]}, timeout=5,
                             progress=lambda _progress: None)  # fmt: skip
    return failed.value


def test_a_start_stopped_from_outside_before_it_was_ready_fails_as_the_sites_doing(runtime):
    executor, fake = runtime

    stopped = _wait_ready(executor, "sy-stopped")
    exited = _wait_ready(executor, "sy-exited")

    # Read from the runtime's events of that run, as the heartbeat reads them, not the code.
    assert (stopped.stopped_by, stopped.node_failure) == (STOPPED_BY_RUNTIME, False)
    assert str(stopped).startswith(
        "The workload was stopped from outside it before it was ready (its container runtime "
        "stopped or killed it: a site operator, or the runtime shutting down; code 143, "
    )
    # The workload's own exit 143 stays its own failure.
    assert (exited.stopped_by, exited.node_failure) == (None, False)
    assert str(exited).startswith("The workload exited with code 143 before it was ready")
    assert len(_events_calls(fake)) == 2


def test_a_start_whose_container_ended_before_the_node_booted_was_stopped_by_the_reboot(runtime):
    executor, fake = runtime
    fake.items[1]["State"]["FinishedAt"] = BEFORE_BOOT

    failed = _wait_ready(executor, "sy-exited")

    assert failed.stopped_by == STOPPED_BY_REBOOT
    assert str(failed).startswith(
        "The workload was stopped from outside it before it was ready (it ended before the "
        "node last booted: a restart of the node stopped it; code 143, "
    )


def test_a_start_whose_stop_events_cannot_be_read_is_the_workloads_own_failure(runtime):
    executor, fake = runtime
    fake.events_fail = True

    assert _wait_ready(executor, "sy-stopped").stopped_by is None


def test_the_failure_report_says_what_stopped_the_start_and_only_then():
    sent = []

    class Client:
        def post(self, path, body, **kwargs):
            sent.append((path, body))
            return 200, {}

    class Executor:
        def __init__(self, error: ExecutorError):
            self.error = error

        def run(self, kind, payload, progress):
            raise self.error

    for error in (
        ExecutorError("stopped from outside", stopped_by=STOPPED_BY_RUNTIME),
        ExecutorError("exited with code 3"),
    ):
        agent = Agent(client=Client(), executor=Executor(error), lease_seconds=60)
        agent.run_job({"id": 7, "lease_id": "l1", "kind": "start", "reservation": "r",
                       "payload": {}})  # fmt: skip

    assert sent == [
        ("agent/jobs/7/fail",
         {"lease_id": "l1", "error": "stopped from outside", "node_failure": False,
          "stopped_by": "runtime"}),
        # An own failure's body is what it always was (an older API reads it alike).
        ("agent/jobs/7/fail",
         {"lease_id": "l1", "error": "exited with code 3", "node_failure": False}),
    ]  # fmt: skip


def test_a_start_being_stopped_is_judged_once_its_end_is_recorded(runtime, monkeypatch):
    """podman shows "stopping" (not running, exit code 0, no finish time) while its stop runs:
    not yet an exit with code 0, but a stop from outside once it has ended."""
    executor, fake = runtime
    item = fake.items[0]
    stopping = {**item, "State": {**item["State"], "Status": "stopping", "ExitCode": 0,
                                  "FinishedAt": "0001-01-01T00:00:00Z"}}  # fmt: skip
    answers = [stopping, stopping, item]
    monkeypatch.setattr(executor, "_inspect", lambda name: answers.pop(0))
    monkeypatch.setattr(switchyard_agent.time, "sleep", lambda seconds: None)

    failed = _wait_ready(executor, "sy-stopped")

    assert (failed.stopped_by, answers) == (STOPPED_BY_RUNTIME, [])
    assert "; code 143, " in str(failed)
