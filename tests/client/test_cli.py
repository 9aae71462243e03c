"""The `switchyard` CLI against a live server: tables, --json, the config file, exit codes."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import contextlib
import csv
import http.server
import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from django.db import connections, transaction
from switchyard.cli import main

from marketplace.models import Reservation, ReservationStatus
from marketplace.services.transitions import reservation_transition
from tests.client.conftest import world  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cli(world, tmp_path, monkeypatch):
    """Runs `switchyard …` logged in through the config file of a private XDG_CONFIG_HOME."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    for name in ("SWITCHYARD_API_KEY", "SWITCHYARD_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()

    def run(*args, input=None):
        return runner.invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)

    login = run("login", "--base-url", world.url, "--api-key-stdin", input=world.secret + "\n")
    assert login.exit_code == 0, login.output
    return run


def _start(hours=24):
    start = (datetime.now(UTC) + timedelta(hours=hours)).replace(minute=0, second=0, microsecond=0)
    return start.isoformat()


def test_login_keeps_the_key_in_a_file_only_its_owner_reads(world, cli, tmp_path):
    path = tmp_path / "switchyard" / "config.json"
    assert json.loads(path.read_text()) == {"api_key": world.secret, "base_url": world.url}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_wrong_key_does_not_log_in(world, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    result = CliRunner().invoke(
        main, ["login", "--base-url", world.url, "--api-key-stdin"], input="sy_live_bad_x\n"
    )
    assert result.exit_code == 3
    assert not (tmp_path / "switchyard" / "config.json").exists()


def test_search_quote_reserve_show_extend_cancel(cli):
    search = cli("gpus", "search", "--gpu-model", "h100-sxm-80gb", "--count", 2, "--start",
                 _start(), "--hours", 3)  # fmt: skip
    assert search.exit_code == 0 and "abilene-1" in search.output

    quote = json.loads(cli("--json", "quote", "--gpu-model", "h100-sxm-80gb", "--count", 2,
                           "--start", _start(), "--hours", 3).output)  # fmt: skip
    reserved = cli("--json", "reserve", "--quote", quote["id"])
    assert reserved.exit_code == 0, reserved.output
    reservation = json.loads(reserved.output)
    assert (reservation["status"], reservation["total"]) == ("pending", "12.00")

    shown = cli("show", reservation["id"])
    assert shown.exit_code == 0 and reservation["id"] in shown.output and "pending" in shown.output
    listed = json.loads(cli("--json", "list").output)
    assert [r["id"] for r in listed] == [reservation["id"]]

    extended = json.loads(cli("--json", "extend", reservation["id"], "--hours", 1).output)
    assert extended["total"] == "16.00"
    cancelled = cli("--json", "cancel", reservation["id"], "--reason", "cli test")
    assert json.loads(cancelled.output)["status"] == "cancelled"


def test_the_search_filters_by_currency(cli):
    args = ["--json", "gpus", "search", "--gpu-model", "h100-sxm-80gb", "--count", 1, "--start",
            _start(), "--hours", 2]  # fmt: skip
    dollars = json.loads(cli(*args, "--currency", "usd").output)
    assert dollars and {offer["currency"] for offer in dollars} == {"usd"}
    assert json.loads(cli(*args, "--currency", "eur").output) == []  # every site is in dollars
    refused = cli(*args, "--currency", "USD")
    assert refused.exit_code != 0 and "currency" in refused.output


def test_the_reliability_floor_filters_the_search_and_holds_through_the_booking(world, cli):
    from decimal import Decimal

    from inventory.models import Node

    nodes = list(Node.objects.order_by("pk"))
    Node.objects.filter(pk=nodes[0].pk).update(reliability_30d=Decimal("0.9990"))
    Node.objects.exclude(pk=nodes[0].pk).update(reliability_30d=Decimal("0.9000"))
    args = ["--gpu-model", "h100-sxm-80gb", "--count", 1, "--start", _start(), "--hours", 2]
    too_strict = json.loads(
        cli("--json", "gpus", "search", *args, "--min-reliability", "0.9995").output
    )
    assert too_strict == []
    quote = json.loads(cli("--json", "quote", *args, "--min-reliability", "0.99").output)
    reservation = json.loads(cli("--json", "reserve", "--quote", quote["id"]).output)
    direct = json.loads(cli("--json", "reserve", *args, "--min-reliability", "0.99").output)
    for booked in (reservation, direct):
        row = Reservation.objects.get(public_id=booked["id"])
        assert set(row.allocations.values_list("node_id", flat=True)) == {nodes[0].pk}
    assert cli("reserve", *args, "--min-reliability", "2").exit_code != 0  # refused: bad input


def test_reserve_refuses_a_price_above_max_price(world, cli):
    """The world's H100s cost 2.00 per GPU-hour: a cap below it books nothing."""
    args = ["--gpu-model", "h100-sxm-80gb", "--count", 1, "--start", _start(), "--hours", 2]
    refused = cli("reserve", *args, "--site", "abilene-1", "--max-price", "1.50")
    assert refused.exit_code != 0
    assert "price_above_max" in refused.output
    assert not Reservation.objects.exists()
    booked = json.loads(cli("--json", "reserve", *args, "--max-price", "2.00").output)
    assert booked["price_per_gpu_hour"] == "2.0000"


def test_exit_codes_scripts_can_rely_on(world, cli):
    missing = cli("show", "res_nothere")
    assert missing.exit_code == 4
    assert "not_found: No such reservation" in missing.output
    reservation = json.loads(cli("--json", "reserve", "--gpu-model", "h100-sxm-80gb", "--count", 1,
                                 "--start", _start(), "--hours", 2).output)  # fmt: skip
    assert cli("cancel", reservation["id"]).exit_code == 0
    assert cli("cancel", reservation["id"]).exit_code == 5  # already cancelled: a conflict
    too_many = cli("reserve", "--gpu-model", "h100-sxm-80gb", "--count", 99, "--start", _start(),
                   "--hours", 2)  # fmt: skip
    assert too_many.exit_code == 5  # no capacity
    assert cli("reserve").exit_code == 2  # usage error
    assert cli("--base-url", "http://127.0.0.1:9", "list").exit_code == 8


def test_ssh_runs_ssh_with_the_connection_details(world, cli):
    reservation = json.loads(
        cli("--json", "reserve", "--gpu-model", "h100-sxm-80gb", "--count", 1, "--hours", 2).output
    )  # fmt: skip (starts now)
    early = cli("ssh", reservation["id"], "--print")
    assert early.exit_code == 5  # not active yet: a state conflict, as the API's 409s
    assert "no connection details until it is active" in early.output
    row = Reservation.objects.get(public_id=reservation["id"])
    for status in (ReservationStatus.PROVISIONING, ReservationStatus.ACTIVE):
        row = reservation_transition(reservation=row, to_status=status, cause="t", actor_label="t")
    Reservation.objects.filter(pk=row.pk).update(
        connection={"host": "203.0.113.9", "ssh_port": 2222, "ports": {}}
    )
    # Booked without SSH keys: no port published; a clear refusal, never `ssh -p None`.
    Reservation.objects.filter(pk=row.pk).update(
        connection={"host": "203.0.113.9", "ssh_port": None, "ports": {}}
    )
    no_port = cli("ssh", reservation["id"], "--print")
    assert no_port.exit_code == 5
    assert no_port.stdout == ""
    assert "has no SSH port: it was reserved without SSH keys" in no_port.stderr
    Reservation.objects.filter(pk=row.pk).update(
        connection={"host": "203.0.113.9", "ssh_port": 2222, "ports": {}}
    )
    printed = cli("ssh", reservation["id"], "--print", "--", "-i", "~/.ssh/id_ed25519")
    assert printed.exit_code == 0
    assert printed.output.strip() == "ssh -p 2222 root@203.0.113.9 -i '~/.ssh/id_ed25519'"
    # No ssh client installed: one line saying so, not a traceback.
    os.environ["PATH"], path = "/nonexistent", os.environ["PATH"]
    try:
        missing = cli("ssh", reservation["id"])
    finally:
        os.environ["PATH"] = path
    assert missing.exit_code == 1
    assert "No ssh command on this machine's PATH" in missing.output
    assert "Traceback" not in missing.output


def test_a_list_cut_at_its_limit_says_so_on_stderr(world, cli):
    for _ in range(3):
        made = cli("--json", "reserve", "--gpu-model", "h100-sxm-80gb", "--count", 1,
                   "--start", _start(), "--hours", 1)  # fmt: skip
        assert made.exit_code == 0, made.output

    cut = cli("--json", "list", "--limit", 2)
    whole = cli("--json", "list", "--limit", 3)

    assert len(json.loads(cut.stdout)) == 2
    assert "Showing the first 2; there are more (raise --limit)." in cut.stderr
    assert len(json.loads(whole.stdout)) == 3 and "there are more" not in whole.stderr
    # A limit below 1 is a usage error (it showed one row), on every list.
    for args in (("list",), ("resale", "list"), ("resale", "sales"),
                 ("webhooks", "deliveries", "we_x")):  # fmt: skip
        for limit in (0, -3):
            refused = cli("--json", *args, "--limit", limit)
            assert refused.exit_code == 2, (args, refused.output)
            assert refused.stdout == ""
            assert "Invalid value for '--limit'" in refused.stderr


# Tests replace time.sleep (the module's, which the CLI calls between polls); waiting here must
# not go through their replacement.
_sleep = time.sleep


def _settled(org, timeout: float = 120.0) -> None:
    """Wait until every event of org is settled: a write transaction open anywhere on the
    server (another test's) holds the feed back for a while."""
    from marketplace.models import Event
    from marketplace.models.events import SnapshotXmin

    deadline = time.monotonic() + timeout
    while Event.objects.filter(organization=org, txid__gte=SnapshotXmin()).exists():
        assert time.monotonic() < deadline, "events not settled"
        _sleep(0.1)


def test_events_tail_prints_new_events_oldest_first(world, cli):
    since = datetime.now(UTC).isoformat()
    first = json.loads(cli("--json", "reserve", "--gpu-model", "h100-sxm-80gb", "--count", 1,
                           "--start", _start(), "--hours", 2).output)  # fmt: skip
    cli("cancel", first["id"])
    _settled(world.org)
    tailed = cli("--json", "events", "tail", "--since", since, "--once")
    assert tailed.exit_code == 0
    lines = [json.loads(line) for line in tailed.output.splitlines()]
    assert [(e["type"], e["object_id"]) for e in lines] == [
        ("reservation.created", first["id"]),
        ("reservation.cancelled", first["id"]),
    ]
    only = cli("events", "tail", "--since", since, "--type", "reservation.cancelled", "--once")
    assert only.output.count("reservation.") == 1


def test_webhooks_from_the_command_line(world, cli):
    created = json.loads(cli("--json", "webhooks", "create", "http://127.0.0.1:9/hook", "--event",
                             "reservation.active").output)  # fmt: skip
    assert created["secret"].startswith("whsec_")
    listed = cli("webhooks", "list")
    assert created["id"] in listed.output and "whsec_" not in listed.output
    rotated = json.loads(cli("--json", "webhooks", "rotate", created["id"]).output)
    assert rotated["secret"] != created["secret"]
    assert len(rotated["previous_secrets_expire_at"]) == 1
    ended = json.loads(
        cli("--json", "webhooks", "rotate", "--expire-previous", created["id"]).output
    )
    assert ended["previous_secrets_expire_at"] == []
    assert (
        json.loads(cli("--json", "webhooks", "disable", created["id"]).output)["enabled"] is False
    )
    assert cli("webhooks", "deliveries", created["id"]).exit_code == 0
    assert cli("webhooks", "delete", created["id"]).exit_code == 0
    assert cli("webhooks", "delete", created["id"]).exit_code == 4
    assert cli("webhooks", "create", "ftp://x/").exit_code == 2


def test_usage_export_writes_the_csv(world, cli, tmp_path):
    out = tmp_path / "usage.csv"
    result = cli("usage", "export", "--since", "2026-01-01", "-o", out)
    assert result.exit_code == 0
    header = next(csv.reader(io.StringIO(out.read_text())))
    assert header[:6] == ["day", "reservation", "gpu_model", "site", "gpu_seconds", "amount"]
    ledger = cli("usage", "export", "--ledger")
    assert ledger.output.startswith("id,created_at,kind,amount")


def test_reserve_a_term_sell_part_of_it_and_another_organisation_buys_it(world, cli, monkeypatch):
    from marketplace.models import ApiKeyScope
    from marketplace.services.api_keys import api_key_create
    from tests.factories import OrganizationFactory

    start = _start(48)
    term = cli("--json", "reserve", "--gpu-model", "h100-sxm-80gb", "--count", 8, "--start",
               start, "--hours", 7 * 24, "--tier", "reserved", "--term", "1w")  # fmt: skip
    assert term.exit_code == 0, term.output
    term = json.loads(term.output)
    window = (datetime.fromisoformat(start) + timedelta(hours=24)).isoformat()

    sold = json.loads(cli("--json", "resale", "sell", term["id"], "--count", 4, "--start", window,
                          "--hours", 24, "--price", "1.5000").output)  # fmt: skip
    kept = json.loads(cli("--json", "resale", "sell", term["id"], "--count", 4, "--start", window,
                          "--hours", 24, "--price", "1.7500").output)  # fmt: skip
    assert (sold["status"], sold["for_sale"], sold["reservation"]) == ("open", True, term["id"])
    too_cheap = cli(
        "resale", "sell", term["id"], "--count", 1, "--start", window, "--price", "0.0001"
    )
    assert too_cheap.exit_code == 2, too_cheap.output  # below the floor: refused, nothing listed

    _, buyer_key = api_key_create(organization=OrganizationFactory(), name="buyer",
                                  scopes=[ApiKeyScope.READ, ApiKeyScope.WRITE], created_by=None)  # fmt: skip
    monkeypatch.setenv("SWITCHYARD_API_KEY", buyer_key)
    bought = cli("--json", "reserve", "--listing", sold["id"], "--count", 4, "--start", window,
                 "--hours", 24)  # fmt: skip
    assert bought.exit_code == 0, bought.output
    assert json.loads(bought.output)["total"] == "144.00"  # 4 GPUs × 24 h × 1.50
    again = cli("reserve", "--listing", sold["id"], "--count", 4, "--start", window, "--hours", 24)
    assert again.exit_code == 5  # sold: a conflict
    monkeypatch.delenv("SWITCHYARD_API_KEY")

    withdrawn = json.loads(cli("--json", "resale", "withdraw", kept["id"]).output)
    assert withdrawn["status"] == "withdrawn"
    listed = json.loads(cli("--json", "resale", "list").output)
    assert {(row["id"], row["status"]) for row in listed} == {
        (sold["id"], "sold"), (kept["id"], "withdrawn"),
    }  # fmt: skip
    assert [
        r["id"] for r in json.loads(cli("--json", "resale", "list", "--status", "sold").output)
    ] == [sold["id"]]
    (sale,) = json.loads(cli("--json", "resale", "sales").output)
    assert (sale["id"], sale["sale"]["total"]) == (sold["id"], "144.00")
    table = cli("resale", "sales")
    assert table.exit_code == 0 and sold["id"] in table.output and "144.00" in table.output


def test_a_time_that_is_not_iso_is_a_usage_error(cli):
    result = cli("quote", "--gpu-model", "h100-sxm-80gb", "--start", "tomorrow")
    assert result.exit_code == 2
    assert "--start" in result.output and "'tomorrow' is not an ISO time" in result.output
    assert cli("events", "tail", "--since", "yesterday", "--once").exit_code == 2


def test_text_that_looks_like_markup_is_printed_as_it_is(world, cli):
    refused = cli("webhooks", "create", "http://127.0.0.1:9/hook", "--event", "[/x]")
    assert refused.exit_code == 2  # the API's 400, not a crash of the error printer
    assert "[/x]" in refused.output and "(request req_" in refused.output
    created = cli("webhooks", "create", "http://127.0.0.1:9/a[/x][bold]b")
    assert created.exit_code == 0
    listed = cli("webhooks", "list")
    assert listed.exit_code == 0 and "http://127.0.0.1:9/a[/x][bold]b" in listed.output


def test_a_refused_export_leaves_the_file_it_would_replace_as_it_was(cli, tmp_path):
    out = tmp_path / "november.csv"
    out.write_text("last month's export\n")
    result = cli("usage", "export", "--since", "nope", "-o", out)
    assert result.exit_code == 2
    assert out.read_text() == "last month's export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["november.csv", "switchyard"]


def test_events_tail_prints_an_event_that_commits_after_a_later_one(world, cli, monkeypatch):
    """Transaction A records an event and stays open while B records a later one and commits:
    the tail prints neither until A commits, then A and B in that order (a tail by `created`
    would have printed B, moved past A, and printed A late or never)."""
    from switchyard import cli as cli_module

    from marketplace.models import EventType
    from marketplace.services.events import member_event_record

    since = datetime.now(UTC)
    written, release = threading.Event(), threading.Event()
    failures = []

    def slow_transaction():
        try:
            with transaction.atomic():
                # An event the key may see (not api_key.*: keys cannot list keys).
                member_event_record(membership=world.owner, type=EventType.MEMBER_ADDED)
                written.set()
                assert release.wait(timeout=60)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
            written.set()
        finally:
            connections.close_all()

    slow = threading.Thread(target=slow_transaction)
    slow.start()
    assert written.wait(timeout=60) and not failures
    quick = json.loads(cli("--json", "reserve", "--gpu-model", "h100-sxm-80gb", "--count", 1,
                           "--start", _start(), "--hours", 2).output)  # fmt: skip

    class Stop(Exception):
        pass

    polls = []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == 1:  # the first poll is done: A commits now
            release.set()
            slow.join(timeout=60)
            _settled(world.org)
        else:
            raise Stop

    monkeypatch.setattr(cli_module.time, "sleep", sleep)
    tailed = CliRunner().invoke(main, ["--json", "events", "tail", "--since", since.isoformat()])
    assert isinstance(tailed.exception, Stop) and not failures
    lines = [json.loads(line) for line in tailed.output.splitlines()]
    assert [(e["type"], e["object_id"]) for e in lines] == [
        ("member.added", world.owner.public_id),
        ("reservation.created", quick["id"]),
    ]


def test_events_tail_continues_after_a_given_event(world, cli):
    since = datetime.now(UTC).isoformat()
    first = json.loads(cli("--json", "reserve", "--gpu-model", "h100-sxm-80gb", "--count", 1,
                           "--start", _start(), "--hours", 2).output)  # fmt: skip
    cli("cancel", first["id"])
    _settled(world.org)
    head = cli("--json", "events", "tail", "--since", since, "--once", "--type",
               "reservation.created")  # fmt: skip
    (created,) = [json.loads(line) for line in head.output.splitlines()]
    tailed = cli("--json", "events", "tail", "--after", created["id"], "--once")
    assert [json.loads(line)["type"] for line in tailed.output.splitlines()] == [
        "reservation.cancelled"
    ]
    unknown = cli("events", "tail", "--after", "evt_doesNotExist1234", "--once")
    assert unknown.exit_code == 4 and "evt_doesNotExist1234" in unknown.output


def test_events_tail_with_a_key_shows_no_api_key_events(world, cli):
    """Keys cannot list API keys, so the tail does not show their events either."""
    from marketplace.services.api_keys import api_key_create, api_key_revoke

    since = datetime.now(UTC).isoformat()
    made, _ = api_key_create(organization=world.org, name="ci", scopes=["read"],
                             created_by=world.owner.user)  # fmt: skip
    api_key_revoke(api_key=made)
    _settled(world.org)
    tailed = cli("--json", "events", "tail", "--since", since, "--once")
    assert (tailed.exit_code, tailed.output) == (0, "")
    asked = cli("events", "tail", "--since", since, "--type", "api_key.created", "--once")
    assert asked.exit_code == 3 and "session_required" in asked.output


class _Handler(http.server.BaseHTTPRequestHandler):
    """A test server's handler: quiet, and one call to answer."""

    def answer(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(handler):
    """`handler` served on a free loopback port in a thread; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def not_the_api():
    """A web server that is not the API: a page at /page/…, a redirect to https at /moved/…."""

    class Handler(_Handler):
        def do_GET(self):
            if self.path.startswith("/moved/"):
                self.send_response(301)
                self.send_header("Location", "https://sy.example" + self.path[6:])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.answer(200, b"<html>Welcome</html>", "text/html")

    with _serving(Handler) as url:
        yield url


def test_an_address_that_is_not_the_api_is_one_line_on_stderr_not_a_traceback(
    cli, not_the_api, monkeypatch
):
    """catch_exceptions=False: a traceback would fail the test instead of giving an exit code."""
    page = cli("--json", "--base-url", f"{not_the_api}/page", "list")
    assert page.exit_code == 1 and page.stdout == ""
    assert "is not JSON (text/html, HTTP 200)" in page.stderr
    moved = cli("--json", "--base-url", f"{not_the_api}/moved", "usage", "export")
    assert moved.exit_code == 1 and moved.stdout == ""
    assert "HTTP 301, a redirect to https://sy.example/api/v1/billing/usage.csv" in moved.stderr
    for url in ("switchyard.example", "http://[::1"):
        bad = cli("--base-url", url, "list")
        assert bad.exit_code == 2 and "Invalid value for '--base-url'" in bad.stderr
    monkeypatch.setenv("SWITCHYARD_API_KEY", "sy_live_ké")
    malformed = cli("list")
    assert malformed.exit_code == 3 and "The API key is malformed" in malformed.stderr
    assert "sy_live_ké" not in malformed.output


def test_not_logged_in_is_exit_code_3_as_documented(world, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("SWITCHYARD_API_KEY", raising=False)
    result = CliRunner().invoke(main, ["--json", "list"], catch_exceptions=False)
    assert result.exit_code == 3 and result.stdout == ""
    assert "Not logged in: run `switchyard login` first." in result.stderr


def test_ctrl_c_stops_a_tail_with_130_and_no_traceback(cli, monkeypatch):
    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr("switchyard.cli.time.sleep", interrupted)
    result = cli("events", "tail")
    assert result.exit_code == 130
    assert result.stdout == "" and "Aborted!" not in result.output


def test_an_output_file_that_cannot_be_written_is_a_usage_error(cli, tmp_path):
    result = cli("usage", "export", "--since", "2026-11-01", "-o", tmp_path / "nope" / "x.csv")
    assert result.exit_code == 2
    assert "cannot write" in result.stderr and "No such file or directory" in result.stderr
    assert not (tmp_path / "nope").exists()


def test_hours_must_be_positive_and_end_is_an_iso_time(world, cli):
    args = ["reserve", "--gpu-model", "h100-sxm-80gb", "--start", _start()]
    for hours in ("0", "-2"):
        result = cli(*args, "--hours", hours)  # 0 was booked as the default hour
        assert result.exit_code == 2 and "not a positive number of hours" in result.stderr
    end = cli(*args, "--end", "tomorrow")
    assert (
        end.exit_code == 2
        and "--end" in end.stderr
        and "'tomorrow' is not an ISO time" in end.stderr
    )
    both = cli(*args, "--hours", 2, "--end", _start(30))  # --hours was ignored
    assert both.exit_code == 2 and "not both" in both.stderr
    assert not Reservation.objects.exists()


def test_extend_takes_positive_hours_or_an_end_not_both(world, cli):
    booked = cli("--json", "reserve", "--gpu-model", "h100-sxm-80gb", "--start", _start(),
                 "--hours", 2)  # fmt: skip
    reservation = Reservation.objects.get(public_id=json.loads(booked.stdout)["id"])
    ends_at = reservation.ends_at
    for hours in ("0", "-2"):
        # 0 was told to give --hours; -2 was sent, to be refused as an end not later.
        result = cli("extend", reservation.public_id, "--hours", hours)
        assert result.exit_code == 2 and "not a positive number of hours" in result.stderr
    both = cli("extend", reservation.public_id, "--hours", 2, "--ends-at", _start(30))
    assert both.exit_code == 2 and "not both" in both.stderr  # --hours was ignored
    reservation.refresh_from_db()
    assert reservation.ends_at == ends_at
    longer = cli("--json", "extend", reservation.public_id, "--hours", 1)
    assert longer.exit_code == 0, longer.stderr
    reservation.refresh_from_db()
    assert reservation.ends_at == ends_at + timedelta(hours=1)


def test_login_narrows_an_existing_config_file_before_writing_the_key(
    world, cli, tmp_path, monkeypatch
):
    """A config file the user made readable by all is made 0600 before the key goes in."""
    import switchyard.cli

    path = tmp_path / "switchyard" / "config.json"
    os.chmod(path, 0o644)
    modes = []
    dump = json.dump

    def dump_and_note_the_mode(data, f, **kwargs):
        modes.append(stat.S_IMODE(os.fstat(f.fileno()).st_mode))
        return dump(data, f, **kwargs)

    monkeypatch.setattr(switchyard.cli.json, "dump", dump_and_note_the_mode)
    assert cli("login", "--api-key-stdin", input=world.secret + "\n").exit_code == 0
    assert modes == [0o600] and stat.S_IMODE(os.stat(path).st_mode) == 0o600


# The `switchyard` command as a shell runs it, in a process of its own.
SWITCHYARD = [sys.executable, "-c", "from switchyard.cli import main; main()"]


def test_a_reader_that_goes_away_ends_the_command_quietly(world, tmp_path):
    """`switchyard list | head -1`: the pipe's reader has gone before the output is written.
    The shell's own tools end there with 128 + SIGPIPE and say nothing; so does the CLI."""
    env = {**os.environ, "SWITCHYARD_API_KEY": world.secret, "SWITCHYARD_BASE_URL": world.url,
           "XDG_CONFIG_HOME": str(tmp_path)}  # fmt: skip
    for args in (["list"], ["--json", "list"], ["usage", "export", "--ledger"]):
        read, write = os.pipe()
        os.close(read)
        try:
            done = subprocess.run([*SWITCHYARD, *args], stdout=write, stderr=subprocess.PIPE,
                                  env=env, text=True, timeout=60)  # fmt: skip
        finally:
            os.close(write)
        assert (done.returncode, done.stderr) == (141, ""), args


def test_ctrl_c_at_the_login_prompt_is_130_and_quiet(tmp_path):
    """At a terminal: the key is asked for with echo off, and Ctrl-C (SIGINT) ends it."""
    import pty

    leader, terminal = pty.openpty()
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    env.pop("SWITCHYARD_API_KEY", None)
    login = subprocess.Popen(
        [*SWITCHYARD, "login", "--base-url", "http://127.0.0.1:9"], stdin=terminal,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    try:
        prompt = b""  # on stderr: getpass's stream where the terminal is not controlling
        while b"API key:" not in prompt:
            chunk = os.read(login.stderr.fileno(), 100)
            assert chunk, f"no prompt: {prompt!r}"
            prompt += chunk
        login.send_signal(signal.SIGINT)  # what Ctrl-C at a terminal sends
        stdout, stderr = login.communicate(timeout=30)
    finally:
        login.kill()
        os.close(leader)
    assert login.returncode == 130
    assert (stdout, stderr) == (b"\n", b"Interrupted.\n")  # no "Aborted!", no traceback
    assert not (tmp_path / "switchyard").exists()


def test_no_key_at_the_login_prompt_is_a_usage_error(world, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["login", "--base-url", world.url], input="")
    assert result.exit_code == 2 and "No API key given." in result.stderr
    assert "Aborted!" not in result.output
    assert not (tmp_path / "switchyard").exists()


@pytest.fixture
def flaky_proxy(world):
    """An HTTP proxy to the live server; `drop = n` closes the next n connections without an
    answer, as a server that has gone away does."""

    class Proxy:
        drop = dropped = forwarded = 0

    class Handler(_Handler):
        def do_GET(self):
            if Proxy.drop:
                Proxy.drop -= 1
                Proxy.dropped += 1
                return  # HTTP/1.0: the connection closes with nothing said
            upstream = urllib.request.Request(
                world.url + self.path, headers={"Authorization": self.headers["Authorization"]}
            )
            try:
                answer = urllib.request.urlopen(upstream, timeout=30)
            except urllib.error.HTTPError as refused:  # a 4xx or 5xx: passed on as it is
                answer = refused
            with answer:
                status, body, kind = answer.status, answer.read(), answer.headers["Content-Type"]
            Proxy.forwarded += 1
            self.answer(status, body, kind)

    with _serving(Handler) as url:
        Proxy.url = url
        yield Proxy


def test_events_tail_carries_on_through_an_outage_until_ctrl_c(
    world, cli, flaky_proxy, monkeypatch
):
    """The API goes away for two polls (each tried 1 + 3 times by the SDK) while an event is
    recorded: the tail says on stderr that it retries, with backoff, and prints that event
    once the API is back, after the one it had printed."""
    from marketplace.models import EventType
    from marketplace.services.events import member_event_record

    since = datetime.now(UTC).isoformat()
    first = json.loads(cli("--json", "reserve", "--gpu-model", "h100-sxm-80gb", "--count", 1,
                           "--start", _start(), "--hours", 2).output)  # fmt: skip
    _settled(world.org)
    sleeps = []
    outage = {}

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 1:  # the first poll is done: the API goes away, an event happens
            outage["forwarded"] = flaky_proxy.forwarded
            flaky_proxy.drop = 8
            member_event_record(membership=world.owner, type=EventType.MEMBER_ADDED)
            _settled(world.org)
        elif flaky_proxy.dropped == 8 and flaky_proxy.forwarded > outage["forwarded"]:
            raise KeyboardInterrupt  # polled again after the outage: Ctrl-C

    monkeypatch.setattr("switchyard.cli.time.sleep", sleep)
    tailed = cli("--base-url", flaky_proxy.url, "--json", "events", "tail", "--since", since)

    assert tailed.exit_code == 130
    assert [(e["type"], e["object_id"]) for e in map(json.loads, tailed.stdout.splitlines())] == [
        ("reservation.created", first["id"]),
        ("member.added", world.owner.public_id),
    ]
    retries = [line for line in tailed.stderr.splitlines() if "retrying" in line]
    assert [line.split("(", 1)[1] for line in retries] == [
        "retrying in 2 s; Ctrl-C to stop)",
        "retrying in 4 s; Ctrl-C to stop)",
    ]
    assert all(line.startswith(f"Could not reach {flaky_proxy.url}") for line in retries)
    assert tailed.stderr.splitlines()[-2:] == ["Reconnected; the tail goes on.", "Interrupted."]


def test_a_filtered_tail_moves_past_what_it_skipped_not_on_its_last_match(world, cli, monkeypatch):
    """A tail of a rare type polled after its last match for ever: once retention deleted it
    (EVENT_RETENTION_DAYS), the poll was 404 event_not_found and the tail ended."""
    from marketplace.models import Event, EventType
    from marketplace.services.events import member_event_record

    member_event_record(membership=world.owner, type=EventType.MEMBER_REMOVED)
    member_event_record(membership=world.owner, type=EventType.MEMBER_ADDED)
    _settled(world.org)
    last_match = Event.objects.get(organization=world.org, type=EventType.MEMBER_REMOVED)
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 1:  # the first poll found nothing new: the match goes, another comes
            last_match.delete()
            member_event_record(membership=world.owner, type=EventType.MEMBER_REMOVED)
            _settled(world.org)
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr("switchyard.cli.time.sleep", sleep)
    tailed = cli("--json", "events", "tail", "--type", "member.removed",
                 "--after", last_match.public_id)  # fmt: skip
    assert tailed.exit_code == 130, tailed.stderr
    (printed,) = map(json.loads, tailed.stdout.splitlines())
    assert printed["type"] == "member.removed" and printed["id"] != last_match.public_id


def test_events_tail_stops_on_what_retrying_cannot_mend(world, cli, monkeypatch):
    monkeypatch.setattr("switchyard.cli.time.sleep", lambda seconds: None)
    unknown = cli("events", "tail", "--after", "evt_doesNotExist1234")  # no --once
    assert unknown.exit_code == 4 and "retrying" not in unknown.stderr
    once = cli("--base-url", "http://127.0.0.1:9", "events", "tail", "--once")
    assert once.exit_code == 8 and "retrying" not in once.stderr


def _moves_on_each_poll(reservation_id: str, statuses: list[str], monkeypatch) -> None:
    """The wait's sleeps, in the CLI's thread, move the reservation through `statuses`, as the
    provisioning worker would between two polls (the live server's threads sleep as before)."""
    import switchyard.client

    main_thread, real_sleep, todo = threading.main_thread(), time.sleep, list(statuses)

    def sleep(seconds):
        if threading.current_thread() is not main_thread:
            return real_sleep(seconds)
        if todo:
            row = Reservation.objects.get(public_id=reservation_id)
            to_status = todo.pop(0)
            cause = "disk full" if to_status == ReservationStatus.FAILED else "by the worker"
            row = reservation_transition(reservation=row, to_status=to_status, cause=cause,
                                         actor_label="t")  # fmt: skip
            if row.status == ReservationStatus.PROVISIONING:
                Reservation.objects.filter(pk=row.pk).update(
                    connection={"host": "203.0.113.9", "ssh_port": 2222, "ports": {}}
                )

    monkeypatch.setattr(switchyard.client.time, "sleep", sleep)


def test_reserve_wait_waits_until_active_telling_each_status(world, cli, monkeypatch):
    from marketplace.services import reservations

    booked = []
    original = reservations.reservation_create

    def remember(**kwargs):
        booked.append(original(**kwargs))
        _moves_on_each_poll(booked[0].public_id, ["provisioning", "active"], monkeypatch)
        return booked[0]

    monkeypatch.setattr(reservations, "reservation_create", remember)
    monkeypatch.setattr("marketplace.apis.reservations.reservation_create", remember)
    result = cli(
        "--json",
        "reserve",
        "--gpu-model",
        "h100-sxm-80gb",
        "--count",
        1,
        "--hours",
        2,
        "--wait",
        "--interval",
        1,
    )  # fmt: skip (starts now: scheduled)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    rid = booked[0].public_id
    assert (shown["id"], shown["status"]) == (rid, "active")
    assert shown["connection"]["ssh_port"] == 2222
    assert result.stderr.splitlines() == [
        f"Reserved {rid}.",
        f"{rid} is scheduled.",
        f"{rid} is provisioning (by the worker).",
        f"{rid} is active (by the worker).",
    ]


def test_wait_exits_5_when_it_ends_first_and_9_when_the_timeout_passes(world, cli, monkeypatch):
    later = json.loads(cli("--json", "reserve", "--gpu-model", "h100-sxm-80gb", "--count", 1,
                           "--start", _start(), "--hours", 1).output)  # fmt: skip
    timed_out = cli("wait", later["id"], "--timeout", 0)
    assert timed_out.exit_code == 9
    assert timed_out.stdout == ""
    assert f"still pending after 0 s (it starts at {later['starts_at']})" in timed_out.stderr

    now = json.loads(cli("--json", "reserve", "--gpu-model", "h100-sxm-80gb", "--count", 1,
                         "--hours", 1).output)  # fmt: skip
    _moves_on_each_poll(now["id"], ["provisioning", "failed"], monkeypatch)
    failed = cli("wait", now["id"], "--interval", 1)
    assert failed.exit_code == 5  # a state conflict, as `ssh` before it is active
    assert f"{now['id']} is failed (disk full); it will not become active." in failed.stderr

    assert cli("cancel", later["id"]).exit_code == 0
    ended = cli("--json", "wait", later["id"], "--for", "ended")
    assert ended.exit_code == 0 and json.loads(ended.stdout)["status"] == "cancelled"
    assert cli("wait", later["id"], "--for", "running").exit_code == 2
    assert cli("wait", later["id"], "--interval", 0).exit_code == 2


def test_ssh_keys_add_list_and_delete_and_a_private_key_is_never_sent(world, cli, tmp_path):
    from marketplace.models import SshKey
    from tests.marketplace.ssh_key_helpers import key_bytes, ssh_key

    public = tmp_path / "id_ed25519.pub"
    public.write_text(ssh_key(body=key_bytes(3)).replace("dev@laptop", "ada@laptop") + "\n")
    added = cli("--json", "ssh-keys", "add", public)
    assert added.exit_code == 0, added.output
    key = json.loads(added.stdout)
    assert key["name"] == "ada@laptop" and key["fingerprint"].startswith("SHA256:")
    named = cli("--json", "ssh-keys", "add", "--name", "ci", "-", input=ssh_key(body=key_bytes(4)))
    assert json.loads(named.stdout)["name"] == "ci"
    listed = cli("ssh-keys", "list")
    assert key["id"] in listed.stdout and "ada@laptop" in listed.stdout

    private = tmp_path / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
                       "-----END OPENSSH PRIVATE KEY-----\n")  # fmt: skip
    refused = cli("ssh-keys", "add", private)
    assert refused.exit_code == 2 and "is a private key" in refused.output
    binary = tmp_path / "key.der"
    binary.write_bytes(b"\x30\x82\xff\xfe")
    assert cli("ssh-keys", "add", binary).exit_code == 2
    assert SshKey.objects.count() == 2

    assert cli("ssh-keys", "delete", key["id"]).exit_code == 0
    assert [k["id"] for k in json.loads(cli("--json", "ssh-keys", "list").stdout)] == [
        json.loads(named.stdout)["id"]
    ]
    assert cli("ssh-keys", "delete", key["id"]).exit_code == 4


def test_billing_balance_ledger_and_invoices_and_a_top_up_needs_the_billing_scope(world, cli):
    from billing.services.ledger import ledger_entry_add

    balance = json.loads(cli("--json", "billing", "balance").stdout)
    assert balance["currency"] == "usd" and "available" in balance
    table = cli("billing", "balance")
    assert table.exit_code == 0 and "funding_state" in table.stdout
    for n in range(3):
        ledger_entry_add(organization=world.org, kind="credit", amount_minor=100 * (n + 1),
                         currency="usd", idempotency_key=f"cli-{n}", description=f"goodwill {n}")  # fmt: skip
    ledger = cli("--json", "billing", "ledger", "--limit", 2)
    assert [(r["amount"], r["description"]) for r in json.loads(ledger.stdout)] == [
        ("3.00", "goodwill 2"),
        ("2.00", "goodwill 1"),
    ]  # newest first
    assert "there are more" in ledger.stderr
    assert json.loads(cli("--json", "billing", "invoices").stdout) == []
    refused = cli("billing", "top-up", "25.00")
    assert refused.exit_code == 3 and "insufficient_scope" in refused.stderr
