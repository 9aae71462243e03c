"""The service selection and process handling behind make run / make test (scripts/)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import devservices  # noqa: E402
from devservices import ServiceError, Source, Supervisor, choose_source  # noqa: E402


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def _never_called() -> bool:
    raise AssertionError("the system service must not be probed")


def test_a_configured_url_wins_without_probing_the_system_service():
    assert (
        choose_source(configured_url="postgres://db.internal/sy", system_reachable=_never_called)
        is Source.CONFIGURED
    )


def test_it_uses_the_system_service_when_it_answers():
    assert choose_source(configured_url=None, system_reachable=lambda: True) is Source.SYSTEM


def test_it_falls_back_to_embedded_when_the_system_port_is_closed():
    port = _closed_port()
    source = choose_source(
        configured_url="", system_reachable=lambda: devservices.tcp_port_open("127.0.0.1", port)
    )
    assert source is Source.EMBEDDED


def test_asking_for_embedded_skips_a_reachable_system_service():
    source = choose_source(configured_url=None, system_reachable=lambda: True, prefer_embedded=True)
    assert source is Source.EMBEDDED


def test_it_rejects_an_unknown_services_mode(monkeypatch):
    monkeypatch.setenv("SWITCHYARD_SERVICES", "cloud")
    with pytest.raises(ServiceError, match="SWITCHYARD_SERVICES must be 'auto' or 'embedded'"):
        devservices.embedded_requested()


def test_redis_ping_tells_redis_from_a_closed_port_and_from_another_server():
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
    assert devservices.redis_url_ping(redis_url) is True
    assert devservices.redis_ping("127.0.0.1", _closed_port()) is False
    with socket.socket() as other:  # listens but never answers PONG
        other.bind(("127.0.0.1", 0))
        other.listen()
        assert devservices.redis_ping("127.0.0.1", other.getsockname()[1], timeout=0.3) is False


def test_free_port_keeps_the_preferred_port_only_while_it_is_free():
    preferred = _closed_port()
    assert devservices.free_port(preferred) == preferred
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", preferred))
        busy.listen()
        other = devservices.free_port(preferred)
    assert other != preferred
    assert other > 0


def test_stop_all_ends_each_child_and_everything_it_forked(tmp_path):
    supervisor = Supervisor()
    pidfile = tmp_path / "grandchild.pid"
    child = supervisor.start(
        "forker", ["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], log=tmp_path / "log"
    )
    devservices.wait_until(pidfile.exists, timeout=5, what="the forking child")
    grandchild = int(pidfile.read_text())

    supervisor.stop_all(timeout=5)

    assert child.poll() == -signal.SIGTERM
    assert supervisor.children == []
    with pytest.raises(ProcessLookupError):
        os.kill(grandchild, 0)


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path):
    supervisor = Supervisor()
    child = supervisor.start(
        "stubborn", ["bash", "-c", "trap '' TERM; sleep 60 & wait; wait"], log=tmp_path / "log"
    )
    time.sleep(0.3)
    started = time.monotonic()

    supervisor.stop_all(timeout=1)

    assert child.poll() == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_localstripe_keeps_its_state_in_the_given_file_across_restarts(tmp_path):
    state = tmp_path / "store.pickle"
    port = devservices.free_port()
    script = str(devservices.ROOT / "scripts" / "localstripe_server.py")
    argv = [sys.executable, script, "--port", str(port), "--state", str(state)]

    def start() -> subprocess.Popen:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        devservices.wait_until(
            lambda: devservices.tcp_port_open("127.0.0.1", port), timeout=20, what="localstripe"
        )
        return process

    def get_customer(customer_id: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/customers/{customer_id}",
            headers={"Authorization": "Bearer sk_test_x"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    process = start()
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/customers",
            data=b"email=demo%40example.com",
            headers={"Authorization": "Bearer sk_test_x"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            customer_id = json.load(response)["id"]
    finally:
        process.terminate()
        process.wait(10)
    assert state.exists()

    process = start()
    try:
        assert get_customer(customer_id) == 200
        assert get_customer("cus_unknown") == 404
    finally:
        process.terminate()
        process.wait(10)
