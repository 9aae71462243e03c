"""The agent heartbeats at the interval the API's answer sets (`heartbeat_seconds`, the
operator's AGENT_HEARTBEAT_SECONDS), unless the node's own heartbeat_seconds was given; its own
before the first answer and against an API whose answer sets none. Run against the stub of
the API over real HTTP from test_agent_idle (the real answer: tests/inventory)."""

import math
import threading
import time

import pytest
import switchyard_agent
from switchyard_agent import server_heartbeat_seconds, settings_load

from tests.agent.test_agent_idle import Running, stub  # noqa: F401 (stub is a fixture)

LOCAL = 0.2  # the node's own interval in these tests; the API's are 1 s, its least


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def test_the_agent_heartbeats_at_the_interval_the_api_sets(stub):  # noqa: F811
    api = stub(tells={"heartbeat_seconds": 1})
    agent = Running(api, heartbeat=LOCAL)
    time.sleep(2.4)

    beats = api.times("agent/heartbeat")
    assert 2 <= len(beats) <= 3  # at 0, 1 and 2 s: not every 0.2 s (12)
    assert min(gaps(beats)) >= 0.95
    assert agent.agent.heartbeat_interval == 1.0
    agent.stop()


def test_an_answer_that_sets_no_interval_keeps_the_node_s_own(stub):  # noqa: F811
    """An older API: the answer has no heartbeat_seconds."""
    api = stub()
    agent = Running(api, heartbeat=LOCAL)
    time.sleep(1.3)

    beats = api.times("agent/heartbeat")
    assert len(beats) >= 5
    assert max(gaps(beats)) < 0.6
    agent.stop()


def test_a_node_given_its_own_interval_keeps_it_whatever_the_api_says(stub):  # noqa: F811
    api = stub(tells={"heartbeat_seconds": 1})
    agent = Running(api, heartbeat=LOCAL, pinned=True)
    time.sleep(1.3)

    beats = api.times("agent/heartbeat")
    assert len(beats) >= 5
    assert max(gaps(beats)) < 0.6
    assert agent.agent.heartbeat_interval == LOCAL
    agent.stop()


def test_the_agent_follows_the_api_when_it_stops_setting_the_interval(stub):  # noqa: F811
    """Switchyard rolled back to a version without the field: the node's own pace again."""
    api = stub(tells={"heartbeat_seconds": 1})
    agent = Running(api, heartbeat=LOCAL)
    time.sleep(0.5)
    assert len(api.times("agent/heartbeat")) == 1

    api.tells = {}
    time.sleep(1.0)  # the beat at 1 s says nothing: from it on, every 0.2 s
    after = time.monotonic()
    time.sleep(1.0)

    assert len(api.times("agent/heartbeat", since=after)) >= 4
    agent.stop()


def test_unanswered_heartbeats_are_retried_at_the_pace_the_api_last_set(stub):  # noqa: F811
    """A Switchyard that asked for a slower pace is not retried faster while it is down."""
    api = stub(tells={"heartbeat_seconds": 1})
    agent = Running(api, heartbeat=LOCAL)
    time.sleep(0.3)
    api.down = True
    down = time.monotonic()
    time.sleep(2.4)

    retries = api.times("agent/heartbeat", since=down)
    assert 2 <= len(retries) <= 3  # at 1 and 2 s (and 3 s on a slow machine), not every 0.2 s
    assert agent.agent.heartbeat_interval == 1.0
    api.down = False
    agent.stop()


def test_an_interval_below_one_second_is_taken_as_one(stub):  # noqa: F811
    """A misconfigured API cannot make its fleet hammer it."""
    api = stub(tells={"heartbeat_seconds": 0})
    agent = Running(api, heartbeat=LOCAL)
    time.sleep(1.5)

    beats = api.times("agent/heartbeat")
    assert len(beats) == 2  # at 0 and 1 s
    assert min(gaps(beats)) >= 0.95
    agent.stop()


@pytest.mark.parametrize(
    ("answer", "interval"),
    [
        ({"heartbeat_seconds": 30}, 30.0),
        ({"heartbeat_seconds": 2.5}, 2.5),
        ({"heartbeat_seconds": 1}, 1.0),
        ({"heartbeat_seconds": 0}, 1.0),
        ({"heartbeat_seconds": -30}, 1.0),
        ({"heartbeat_seconds": 300}, 300.0),
        ({"heartbeat_seconds": 86_400}, 300.0),
        ({"heartbeat_seconds": math.inf}, None),
        ({"heartbeat_seconds": math.nan}, None),
        ({"heartbeat_seconds": "30"}, None),
        ({"heartbeat_seconds": True}, None),
        ({"heartbeat_seconds": None}, None),
        ({"heartbeat_seconds": [30]}, None),
        ({}, None),
        (None, None),
        ([30], None),
    ],
)
def test_the_api_s_interval_is_clamped_to_1_to_300_s_and_a_non_number_ignored(answer, interval):
    assert server_heartbeat_seconds(answer) == interval


@pytest.mark.parametrize(
    ("given", "pace"),
    [
        ({}, 1.0),  # not given: the API's 1 s (10 s, the default, only until its first answer)
        ({"flag": 0.2}, LOCAL),
        ({"environment": "0.2"}, LOCAL),
        ({"config": 0.2}, LOCAL),
    ],
)
def test_switchyard_agent_follows_the_api_unless_heartbeat_seconds_is_given(
    stub,  # noqa: F811
    tmp_path,
    monkeypatch,
    given,
    pace,
):
    """The precedence end to end, as `switchyard-agent` reads its settings and runs."""
    api = stub(tells={"heartbeat_seconds": 1})
    for name in ("SWITCHYARD_CONFIG", "SWITCHYARD_HEARTBEAT_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    flags = {"api": api.url, "executor": "dry-run", "host": "h", "state_dir": str(tmp_path)}
    if "flag" in given:
        flags["heartbeat_seconds"] = given["flag"]
    if "environment" in given:
        monkeypatch.setenv("SWITCHYARD_HEARTBEAT_SECONDS", given["environment"])
    if "config" in given:
        config = tmp_path / "agent.toml"
        config.write_text(f"heartbeat_seconds = {given['config']}\n")
        flags["config"] = str(config)
    codes: list[int] = []
    main = threading.Thread(
        target=lambda: codes.append(switchyard_agent.main(flags=flags, token="nt_test"))
    )
    main.start()
    time.sleep(2.3)
    api.revoked = True
    main.join(timeout=10)

    assert codes == [2]  # stopped by the revoked token
    beats = api.times("agent/heartbeat")[:-1]  # the last one was refused
    assert min(gaps(beats)) >= pace * 0.9
    assert max(gaps(beats)) < pace * 2 + 0.1
    assert (tmp_path / "status.json").exists()


def test_which_settings_were_given_is_known(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('api = "https://x.example"\nheartbeat_seconds = 30\n')

    assert "heartbeat_seconds" not in settings_load({"api": "https://x.example"}, environ={}).given
    assert "heartbeat_seconds" in settings_load({}, environ={}, config_path=str(config)).given
    environ = {"SWITCHYARD_HEARTBEAT_SECONDS": "10"}  # the default's value, given all the same
    assert "heartbeat_seconds" in settings_load({"api": "https://x.example"}, environ=environ).given
    config.write_text('api = "https://x.example"\ngiven = ["heartbeat_seconds"]\n')
    with pytest.raises(switchyard_agent.SettingsError, match="unknown setting 'given'"):
        settings_load({}, environ={}, config_path=str(config))
