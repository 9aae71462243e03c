"""The `switchyard` command line.

Tables by default, `--json` for scripts. Exit codes (docs/integrators.md):
0 done · 1 other API error · 2 bad usage or invalid request · 3 not authenticated or not
allowed · 4 not found · 5 conflict (state, capacity) · 6 payment required · 7 rate limited ·
8 the API could not be reached · 9 a wait timed out · 130 interrupted (Ctrl-C) · 141 the
output's reader went away.
"""

import json
import os
import shlex
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from switchyard import errors
from switchyard.client import DEFAULT_BASE_URL, Client
from switchyard.models import ApiObject

EXIT_CODES = {
    errors.InvalidRequestError: 2,
    errors.AuthenticationError: 3,
    errors.PermissionDeniedError: 3,
    errors.NotFoundError: 4,
    errors.ConflictError: 5,
    errors.PaymentError: 6,
    errors.RateLimitError: 7,
    errors.APIConnectionError: 8,
    errors.WaitTimeoutError: 9,
}


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit 1 by itself; Group.invoke handles a broken pipe for every output.
        raise BrokenPipeError


err_console = _Console(stderr=True)


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "switchyard" / "config.json"


def _load_config() -> dict:
    try:
        return json.loads(config_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_config(data: dict) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Created readable by the owner only, before the key is written into it.
    # An existing file keeps its mode through O_CREAT: narrowed (fchmod) before the key is in it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return path


class NotLoggedIn(click.ClickException):
    exit_code = 3  # not authenticated


def _new_client(**kwargs) -> Client:
    try:
        return Client(**kwargs)
    except ValueError as exc:  # the base URL
        raise click.BadParameter(str(exc), param_hint="'--base-url'") from None


class State:
    def __init__(self, as_json: bool, base_url: str | None):
        self.as_json = as_json
        self._base_url = base_url
        self._client: Client | None = None

    @property
    def base_url(self) -> str:
        return (
            self._base_url
            or os.environ.get("SWITCHYARD_BASE_URL")
            or _load_config().get("base_url")
            or DEFAULT_BASE_URL
        )

    @property
    def client(self) -> Client:
        if self._client is None:
            key = os.environ.get("SWITCHYARD_API_KEY") or _load_config().get("api_key")
            if not key:
                raise NotLoggedIn("Not logged in: run `switchyard login` first.")
            self._client = _new_client(api_key=key, base_url=self.base_url)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _out(state: State, data, columns: list[str], title: str | None = None) -> None:
    """Print objects as a table (one object: a field and value per row), or JSON with --json."""
    items = data if isinstance(data, list) else [data]
    plain = [i.to_dict() if isinstance(i, ApiObject) else i for i in items]
    if state.as_json:
        click.echo(json.dumps(plain if isinstance(data, list) else plain[0], indent=2))
        return
    table = Table(title=title)  # cells as Text: values are data, never rich markup
    if isinstance(data, list):
        for column in columns:
            table.add_column(column)
        for item in plain:
            table.add_row(*[Text(_cell(item, c)) for c in columns])
    else:
        table.add_column("field")
        table.add_column("value", overflow="fold")
        for column in columns:
            table.add_row(column, Text(_cell(plain[0], column)))
    # Piped or captured output is not cut to 80 columns.
    _Console(width=None if sys.stdout.isatty() else 200).print(table)


def _cell(item: dict, column: str) -> str:
    value = item
    for part in column.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


class Group(click.Group):
    """Turns API errors into a message on stderr and the documented exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except errors.SwitchyardError as exc:
            # Escaped: the message may echo input ("Unknown event type '[/x]'"), not markup.
            request = f" [dim](request {escape(exc.request_id)})[/dim]" if exc.request_id else ""
            err_console.print(
                f"[red]Error:[/red] {escape(str(exc))}{request}", highlight=False, soft_wrap=True
            )
            code = next((c for cls, c in EXIT_CODES.items() if isinstance(exc, cls)), 1)
            ctx.exit(code)
        except KeyboardInterrupt:
            # Ctrl-C (how `events tail` is stopped): the shell's 128 + SIGINT, not 1 ("an API
            # error") with click's "Aborted!".
            err_console.print("Interrupted.", highlight=False)
            ctx.exit(130)
        except BrokenPipeError:
            # The reader of the output went away (`switchyard list | head -1`): stop quietly,
            # as the shell's own tools do (128 + SIGPIPE). Standard output is pointed at
            # /dev/null so that the interpreter's last flush of what it still holds cannot fail.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            ctx.exit(141)


@click.group(cls=Group)
@click.option("--json", "as_json", is_flag=True, help="JSON output, for scripts.")
@click.option("--base-url", envvar="SWITCHYARD_BASE_URL", help="The API's address.")
@click.version_option(package_name="switchyard")
@click.pass_context
def main(ctx, as_json: bool, base_url: str | None):
    """Switchyard: GPU capacity at former bitcoin-mining sites."""
    ctx.obj = State(as_json, base_url)
    ctx.call_on_close(ctx.obj.close)  # the client's connections, when the command is done


@main.command()
@click.option("--base-url", "login_base_url", help="The API's address to remember.")
@click.option("--api-key-stdin", is_flag=True, help="Read the key from standard input.")
@click.pass_obj
def login(state: State, login_base_url: str | None, api_key_stdin: bool):
    """Store an API key in your user config (asked for, never on the command line)."""
    if api_key_stdin:
        key = sys.stdin.readline().strip()
    else:
        try:
            key = click.prompt("API key", hide_input=True).strip()
        except click.Abort as exc:
            # click turns Ctrl-C and the end of input at a prompt into Abort ("Aborted!",
            # exit 1): Ctrl-C is 130 as everywhere else, no key a usage error.
            if isinstance(exc.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise click.UsageError("No API key given.") from None
    base_url = login_base_url or state.base_url
    with _new_client(api_key=key, base_url=base_url, max_retries=1) as client:
        organization = client.organization.retrieve()
    path = _save_config({"api_key": key, "base_url": base_url})
    name = organization.get("name") or organization.get("organization", {}).get("name", "")
    if state.as_json:
        click.echo(json.dumps({"organization": organization.to_dict(), "config": str(path)}))
    else:
        click.echo(f"Logged in to {base_url} as {name}; key stored in {path} (mode 600).")


@main.group()
def gpus():
    """GPU availability."""


def _time(value: str, option: str) -> datetime:
    """An ISO time the user typed; one without an offset is UTC (sent with its offset)."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO time (2027-01-04T00:00:00+00:00).", param_hint=option
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _period(start: str | None, hours: float | None, end: str | None) -> tuple[str, str]:
    starts = _time(start, "--start") if start else datetime.now(UTC)
    if end:
        if hours is not None:
            raise click.UsageError("Give --hours or --end, not both.")
        return starts.isoformat(), _time(end, "--end").isoformat()
    if hours is not None and not hours > 0:
        raise click.BadParameter(
            f"{hours:g} is not a positive number of hours.", param_hint="--hours"
        )
    return starts.isoformat(), (starts + timedelta(hours=1 if hours is None else hours)).isoformat()


TERMS = ["1w", "1m", "3m", "1y"]

_search_options = [
    click.option("--gpu-model", help="e.g. h100-sxm-80gb"),
    click.option("--count", "gpu_count", type=int, default=1, show_default=True),
    click.option("--start", help="ISO time; default now."),
    click.option("--hours", type=float, help="Length (default 1) unless --end."),
    click.option("--end", help="ISO time."),
    click.option("--region"),
    click.option("--site"),
    click.option("--tier", type=click.Choice(["on_demand", "reserved", "interruptible"])),
    click.option(
        "--term",
        type=click.Choice(TERMS),
        help="The reserved tier's commitment (with --tier reserved).",
    ),
    click.option(
        "--min-reliability",
        help="0-1: only nodes at least this reliable over 30 days (kept when booking).",
    ),
]


def search_options(f):
    for option in reversed(_search_options):
        f = option(f)
    return f


@gpus.command("search")
@search_options
@click.option("--max-price", help="Per GPU-hour, in each offer's currency (or --currency's).")
@click.option("--currency", help="Only offers priced in it (e.g. usd): you book in the one you "
              "are billed in.")  # fmt: skip
@click.pass_obj
def gpus_search(state, gpu_model, gpu_count, start, hours, end, region, site, tier, term,
                min_reliability, max_price, currency):  # fmt: skip
    """Priced offers that can be reserved now, cheapest first."""
    starts, ends = _period(start, hours, end)
    offers = list(
        state.client.availability.search(
            gpu_model=gpu_model, gpu_count=gpu_count, start=starts, end=ends, region=region,
            site=site, tier=tier, term=term, max_price=max_price, min_reliability=min_reliability,
            currency=currency,
        )
    )  # fmt: skip
    _out(state, offers, ["site.id", "site.region", "gpu_model", "gpu_count", "price_per_gpu_hour",
                         "total", "currency"], "Offers")  # fmt: skip


@main.command()
@search_options
@click.pass_obj
def quote(state, gpu_model, gpu_count, start, hours, end, region, site, tier, term,
          min_reliability):  # fmt: skip
    """Price the best offer and hold it for a few minutes."""
    starts, ends = _period(start, hours, end)
    body = {"gpu_model": gpu_model, "gpu_count": gpu_count, "starts_at": starts, "ends_at": ends,
            "region": region, "site": site, "tier": tier, "term": term,
            "min_reliability": min_reliability}  # fmt: skip
    result = state.client.quotes.create(**{k: v for k, v in body.items() if v is not None})
    _out(state, result, ["id", "site", "gpu_model", "gpu_count", "total", "currency",
                         "expires_at"], "Quote")  # fmt: skip


def _first(rows, limit: int) -> list:
    """The first `limit` of an iterator over cursor pages; when more follow, says so on stderr
    (a script reading `--json list` would otherwise take a cut list for the whole). Knowing
    costs one page more only when the limit ends a page."""
    rows = iter(rows)
    taken = []
    for row in rows:
        taken.append(row)
        if len(taken) >= limit:
            if next(rows, None) is not None:
                err_console.print(
                    f"Showing the first {limit}; there are more (raise --limit).",
                    highlight=False,
                    soft_wrap=True,
                )
            break
    return taken


# A list shows at least one row: 0 or less is a usage error, not one row nor every row.
LIMIT = click.IntRange(min=1)

RESERVATION_COLUMNS = ["id", "status", "gpu_model", "gpu_count", "site", "starts_at", "ends_at",
                       "total", "currency"]  # fmt: skip
# A reservation waited for: what to connect with.
WAITED_COLUMNS = [*RESERVATION_COLUMNS, "status_reason", "connection.host", "connection.ssh_port"]


def wait_options(f):
    f = click.option("--interval", type=click.FloatRange(min=1), default=5.0, show_default=True,
                     help="Seconds between polls.")(f)  # fmt: skip
    return click.option("--timeout", type=click.FloatRange(min=0), default=900.0,
                        show_default=True, help="Seconds to wait at most; then exit 9.")(f)  # fmt: skip


@main.command()
@click.option("--quote", "quote_id", help="quo_…: reserve at the quoted price.")
@click.option("--listing", "listing_id", help="lst_…: book resold time (--count and the period).")
@search_options
@click.option("--max-price", help="Per GPU-hour: refuse a booking priced above it.")
@click.option("--ssh-key-id", "ssh_key_ids", multiple=True, help="ssh_…, repeatable.")
@click.option("--image")
@click.option("--wait", "wait_active", is_flag=True,
              help="Then wait until it is active (see `switchyard wait`).")  # fmt: skip
@wait_options
@click.pass_obj
def reserve(state, quote_id, listing_id, gpu_model, gpu_count, start, hours, end, region, site,
            tier, term, min_reliability, max_price, ssh_key_ids, image, wait_active, timeout,
            interval):  # fmt: skip
    """Reserve GPUs: from a quote, from a resale listing, or directly."""
    if quote_id:
        body = {"quote": quote_id}
    elif listing_id:
        if not start:
            raise click.UsageError("Give --start (and --hours or --end) inside the listing.")
        starts, ends = _period(start, hours, end)
        body = {"listing": listing_id, "gpu_count": gpu_count, "starts_at": starts,
                "ends_at": ends, "tier": tier}  # fmt: skip
    else:
        if not gpu_model:
            raise click.UsageError("Give --quote, --listing, or --gpu-model and the period.")
        starts, ends = _period(start, hours, end)
        body = {"gpu_model": gpu_model, "gpu_count": gpu_count, "starts_at": starts,
                "ends_at": ends, "region": region, "site": site, "tier": tier, "term": term,
                "min_reliability": min_reliability}  # fmt: skip
    body["max_price"] = max_price
    if ssh_key_ids:
        body["ssh_key_ids"] = list(ssh_key_ids)
    if image:
        body["workload"] = {"image": image}
    result = state.client.reservations.create(**{k: v for k, v in body.items() if v is not None})
    if wait_active:
        # Booked whatever happens next: say so first, so an interrupted wait leaves its id.
        err_console.print(f"Reserved {escape(result.id)}.", highlight=False)
        result = _wait(state, result.id, "active", timeout, interval)
        _out(state, result, WAITED_COLUMNS, "Reservation")
        return
    _out(state, result, RESERVATION_COLUMNS, "Reservation")


@main.command()
@click.argument("reservation_id")
@click.option("--for", "until", type=click.Choice(["active", "ended"]), default="active",
              show_default=True,
              help="active; or ended: completed, cancelled, failed or preempted.")  # fmt: skip
@wait_options
@click.pass_obj
def wait(state, reservation_id, until, timeout, interval):
    """Wait until a reservation is active (or has ended), then show it."""
    _out(state, _wait(state, reservation_id, until, timeout, interval), WAITED_COLUMNS,
         "Reservation")  # fmt: skip


def _wait(state, reservation_id: str, until: str, timeout: float, interval: float):
    """Poll the reservation, telling each status seen on stderr. Ending before it is active
    exits 5 (a state conflict) and the timeout 9, each with the last status on stderr."""

    def seen(reservation) -> None:
        reason = f" ({reservation.status_reason})" if reservation.get("status_reason") else ""
        err_console.print(
            f"{escape(reservation_id)} is {escape(str(reservation.status))}{escape(reason)}.",
            highlight=False,
            soft_wrap=True,
        )

    return state.client.reservations.wait(
        reservation_id, until=until, timeout=timeout, interval=interval, on_status=seen
    )


@main.command("list")
@click.option("--status", multiple=True)
@click.option("--limit", type=LIMIT, default=50, show_default=True, help="At most this many.")
@click.pass_obj
def list_(state, status, limit):
    """Your reservations, newest first."""
    rows = _first(state.client.reservations.list(status=list(status) or None), limit)
    _out(state, rows, RESERVATION_COLUMNS, "Reservations")


@main.command()
@click.argument("reservation_id")
@click.pass_obj
def show(state, reservation_id):
    """One reservation, with its connection details once active."""
    result = state.client.reservations.retrieve(reservation_id)
    _out(state, result, [*RESERVATION_COLUMNS, "allowed_actions", "connection.host",
                         "connection.ssh_port"], "Reservation")  # fmt: skip


@main.command()
@click.argument("reservation_id")
@click.option("--reason", default="")
@click.pass_obj
def cancel(state, reservation_id, reason):
    """Cancel (before it starts) or stop early (while active)."""
    result = state.client.reservations.cancel(reservation_id, reason=reason)
    _out(state, result, RESERVATION_COLUMNS, "Reservation")


@main.command()
@click.argument("reservation_id")
@click.option("--ends-at", help="The new end (ISO time).")
@click.option("--hours", type=float, help="Or: this many hours more.")
@click.pass_obj
def extend(state, reservation_id, ends_at, hours):
    """Move the end later, on the same GPUs."""
    if ends_at and hours is not None:
        raise click.UsageError("Give --ends-at or --hours, not both.")
    if ends_at:
        ends_at = _time(ends_at, "--ends-at").isoformat()
    else:
        if hours is None:
            raise click.UsageError("Give --ends-at or --hours.")
        if not hours > 0:
            raise click.BadParameter(
                f"{hours:g} is not a positive number of hours.", param_hint="--hours"
            )
        current = state.client.reservations.retrieve(reservation_id)
        ends = _parse_time(current.ends_at)
        ends_at = (ends + timedelta(hours=hours)).isoformat()
    result = state.client.reservations.extend(reservation_id, ends_at=ends_at)
    _out(state, result, RESERVATION_COLUMNS, "Reservation")


@main.command()
@click.argument("reservation_id")
@click.option("--user", default="root", show_default=True)
@click.option("--print", "print_only", is_flag=True, help="Print the ssh command, do not run it.")
@click.argument("ssh_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def ssh(state, reservation_id, user, print_only, ssh_args):
    """Open an SSH session to an active reservation's first node."""
    reservation = state.client.reservations.retrieve(reservation_id)
    connection = reservation.get("connection")
    refusal = None
    if not connection:
        refusal = f"is {escape(str(reservation.status))}: no connection details until it is active."
    elif connection.get("ssh_port") is None:
        # Booked without SSH keys: no port 22 is published, and `ssh -p None` is no command.
        refusal = "has no SSH port: it was reserved without SSH keys (reserve --ssh-key-id ssh_…)."
    if refusal:
        # A state conflict, as the API's own 409s: exit 5.
        err_console.print(
            f"[red]Error:[/red] {escape(reservation_id)} {refusal}",
            highlight=False,
            soft_wrap=True,
        )
        click.get_current_context().exit(5)
    command = ["ssh", "-p", str(connection["ssh_port"]), f"{user}@{connection['host']}",
               *ssh_args]  # fmt: skip
    if print_only:
        click.echo(shlex.join(command))
        return
    try:
        os.execvp("ssh", command)
    except FileNotFoundError:
        raise click.ClickException(
            "No ssh command on this machine's PATH; install OpenSSH's client, or run "
            f"`switchyard ssh --print {reservation_id}` to see the command."
        ) from None


@main.group()
def events():
    """The organisation's events."""


@events.command("tail")
@click.option("--type", "types", multiple=True, help="Only these types (repeatable).")
@click.option("--since", help="Only events created after this time (ISO); default now.")
@click.option("--after", "after", help="Continue after this event (evt_…) a tail printed.")
@click.option("--interval", type=float, default=2.0, show_default=True)
@click.option("--once", is_flag=True, help="Print what is new and stop.")
@click.pass_obj
def events_tail(state, types, since, after, interval, once):
    """Follow new events, oldest first (Ctrl-C to stop).

    Reads the forward feed (GET events?after=…), which holds an event back until every
    transaction older than it has ended, so one that commits late is printed, never skipped."""
    filters = {"type": list(types) or None}
    if since or not after:
        floor = _time(since, "--since") if since else datetime.now(UTC)
        filters["created_after"] = floor.isoformat()
    failures = 0
    while True:
        feed = state.client.events.poll(after=after, **filters)
        try:
            for event in feed:
                if state.as_json:
                    click.echo(json.dumps(event.to_dict()))
                else:
                    click.echo(f"{event.created}  {event.type:<36} {event.object_id}  {event.id}")
        except errors.SwitchyardError as exc:
            # An outage, a 5xx or a 429 outlasting the SDK's own retries: a tail keeps its
            # position (`after`) and carries on with backoff until Ctrl-C; --once reports it.
            if once or not _transient(exc):
                raise
            failures += 1
            wait = min(interval * 2 ** (failures - 1), TAIL_MAX_BACKOFF_SECONDS)
            if isinstance(exc, errors.RateLimitError) and exc.retry_after:
                wait = max(wait, float(exc.retry_after))
            err_console.print(
                f"{escape(str(exc))} (retrying in {wait:g} s; Ctrl-C to stop)",
                highlight=False,
                soft_wrap=True,
            )
            time.sleep(wait)
            continue
        finally:
            # Past what --type skipped, not on the last match: that one is deleted in time.
            after = feed.position
        if failures:
            err_console.print("Reconnected; the tail goes on.", highlight=False)
            failures = 0
        if once:
            return
        time.sleep(interval)


TAIL_MAX_BACKOFF_SECONDS = 60.0


def _transient(exc: errors.SwitchyardError) -> bool:
    """What can end by itself: no connection, a rate limit, a server error (not a 4xx, nor a
    200 that is not the API's answer)."""
    if isinstance(exc, errors.APIError):
        return exc.status is not None and exc.status >= 500
    return isinstance(exc, (errors.APIConnectionError, errors.RateLimitError))


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@main.group()
def webhooks():
    """Webhook endpoints and their deliveries."""


ENDPOINT_COLUMNS = ["id", "url", "event_types", "enabled", "failing_since"]


@webhooks.command("list")
@click.pass_obj
def webhooks_list(state):
    _out(state, list(state.client.webhook_endpoints.list()), ENDPOINT_COLUMNS, "Webhook endpoints")


@webhooks.command("create")
@click.argument("url")
@click.option(
    "--event", "event_types", multiple=True, help="An event type (repeatable); none: all."
)
@click.option("--description", default="")
@click.pass_obj
def webhooks_create(state, url, event_types, description):
    """Register an endpoint; prints its signing secret (shown once)."""
    endpoint = state.client.webhook_endpoints.create(
        url=url, event_types=list(event_types), description=description
    )
    _out(state, endpoint, [*ENDPOINT_COLUMNS, "secret"], "Webhook endpoint (store the secret)")


@webhooks.command("rotate")
@click.argument("endpoint_id")
@click.option(
    "--expire-previous", is_flag=True, help="A leaked secret: the replaced secrets stop now."
)
@click.pass_obj
def webhooks_rotate(state, endpoint_id, expire_previous):
    """A new signing secret; the one it replaces keeps signing for the overlap period."""
    endpoint = state.client.webhook_endpoints.rotate_secret(
        endpoint_id, expire_previous=expire_previous
    )
    _out(state, endpoint, ["id", "secret", "previous_secrets_expire_at"], "New secret")


@webhooks.command("enable")
@click.argument("endpoint_id")
@click.pass_obj
def webhooks_enable(state, endpoint_id):
    _out(state, state.client.webhook_endpoints.update(endpoint_id, enabled=True), ENDPOINT_COLUMNS)


@webhooks.command("disable")
@click.argument("endpoint_id")
@click.pass_obj
def webhooks_disable(state, endpoint_id):
    _out(state, state.client.webhook_endpoints.update(endpoint_id, enabled=False), ENDPOINT_COLUMNS)


@webhooks.command("delete")
@click.argument("endpoint_id")
@click.pass_obj
def webhooks_delete(state, endpoint_id):
    state.client.webhook_endpoints.delete(endpoint_id)
    if state.as_json:
        click.echo(json.dumps({"deleted": endpoint_id}))
    else:
        click.echo(f"Deleted {endpoint_id}.")


@webhooks.command("deliveries")
@click.argument("endpoint_id")
@click.option("--status", type=click.Choice(["pending", "succeeded", "failed"]))
@click.option("--limit", type=LIMIT, default=50, show_default=True, help="At most this many.")
@click.pass_obj
def webhooks_deliveries(state, endpoint_id, status, limit):
    rows = _first(state.client.webhook_endpoints.deliveries(endpoint_id, status=status), limit)
    _out(state, rows, ["id", "event_type", "event", "status", "attempt_count", "next_attempt_at"],
         "Deliveries")  # fmt: skip


@webhooks.command("resend")
@click.argument("delivery_id")
@click.pass_obj
def webhooks_resend(state, delivery_id):
    _out(state, state.client.webhook_deliveries.resend(delivery_id), ["id", "status"])


@main.group()
def resale():
    """Sell reserved time you will not use, and see what sold (buy with `reserve --listing`)."""


LISTING_COLUMNS = ["id", "status", "for_sale", "reservation", "node", "gpu_count", "tier",
                   "starts_at", "ends_at", "price_per_gpu_hour", "currency"]  # fmt: skip


@resale.command("list")
@click.option("--status", multiple=True,
              type=click.Choice(["open", "sold", "returned", "withdrawn", "expired"]))  # fmt: skip
@click.option("--limit", type=LIMIT, default=50, show_default=True, help="At most this many.")
@click.pass_obj
def resale_list(state, status, limit):
    """Your listings, newest first."""
    rows = _first(state.client.resale.listings(status=list(status) or None), limit)
    _out(state, rows, LISTING_COLUMNS, "Listings")


@resale.command("sell")
@click.argument("reservation_id")
@click.option("--count", "gpu_count", type=int, required=True, help="Whole GPUs to list.")
@click.option("--start", required=True, help="ISO time inside the term, not yet begun.")
@click.option("--hours", type=float, help="Length (default 1) unless --end.")
@click.option("--end", help="ISO time inside the term.")
@click.option("--price", required=True, help="Asking price per GPU-hour (not below the floor).")
@click.option("--tier", type=click.Choice(["on_demand", "interruptible"]), default="on_demand",
              show_default=True, help="How buyers get it.")  # fmt: skip
@click.option("--node", help="The term's node to list from (hostname); default: the best fit.")
@click.pass_obj
def resale_sell(state, reservation_id, gpu_count, start, hours, end, price, tier, node):
    """List part of a reserved term for sale."""
    starts, ends = _period(start, hours, end)
    body = {"reservation": reservation_id, "gpu_count": gpu_count, "starts_at": starts,
            "ends_at": ends, "price_per_gpu_hour": price, "tier": tier, "node": node}  # fmt: skip
    listing = state.client.resale.create_listing(**{k: v for k, v in body.items() if v is not None})
    _out(state, listing, LISTING_COLUMNS, "Listing")


@resale.command("withdraw")
@click.argument("listing_id")
@click.pass_obj
def resale_withdraw(state, listing_id):
    """Take a listing off sale (until it has sold)."""
    _out(state, state.client.resale.withdraw_listing(listing_id), LISTING_COLUMNS, "Listing")


@resale.command("sales")
@click.option("--limit", type=LIMIT, default=50, show_default=True, help="At most this many.")
@click.pass_obj
def resale_sales(state, limit):
    """What sold, newest first, with proceeds and fees so far."""
    rows = _first(state.client.resale.sales(), limit)
    _out(state, rows, ["id", "reservation", "gpu_count", "starts_at", "ends_at", "sale.total",
                       "sale.proceeds", "sale.fees", "sale.net", "currency"], "Sales")  # fmt: skip


@main.group()
def usage():
    """Usage and ledger exports."""


@usage.command("export")
@click.option("--since", help="First UTC day (YYYY-MM-DD).")
@click.option("--until", help="Day after the last (YYYY-MM-DD).")
@click.option("--ledger", is_flag=True, help="The ledger instead of usage by day.")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True), help="Default: stdout."
)
@click.pass_obj
def usage_export(state, since, until, ledger, output):
    """Download usage (one row per reservation and day) or the ledger as CSV."""
    billing = state.client.billing
    chunks = (billing.ledger_csv if ledger else billing.usage_csv)(since=since, until=until)
    if output:
        # Written beside it and renamed when complete: a refused or broken download leaves
        # an existing file as it was, never empty or cut short.
        partial = Path(output).with_name(f".{Path(output).name}.partial")
        try:
            f = open(partial, "wb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise click.BadParameter(
                f"cannot write {output}: {exc.strerror}", param_hint="'-o' / '--output'"
            ) from None
        try:
            with f:
                for chunk in chunks:
                    f.write(chunk)
            os.replace(partial, output)
        finally:
            partial.unlink(missing_ok=True)
        err_console.print(f"Wrote {escape(output)}")
    else:
        out = sys.stdout.buffer
        for chunk in chunks:
            out.write(chunk)


@main.group("ssh-keys")
def ssh_keys():
    """The organisation's SSH public keys (put on the machines it reserves)."""


SSH_KEY_COLUMNS = ["id", "name", "fingerprint", "created_at"]


@ssh_keys.command("list")
@click.pass_obj
def ssh_keys_list(state):
    """Every saved key; pass their ids to `reserve --ssh-key-id`."""
    _out(state, list(state.client.ssh_keys.list()), SSH_KEY_COLUMNS, "SSH keys")


@ssh_keys.command("add")
@click.argument("public_key_file", type=click.File("r", encoding="utf-8", errors="strict"))
@click.option("--name", help="Default: the key's comment, else the file's name.")
@click.pass_obj
def ssh_keys_add(state, public_key_file, name):
    """Save a public key from a file (`-` for standard input), e.g. ~/.ssh/id_ed25519.pub."""
    try:
        text = public_key_file.read(64 * 1024).strip()
    except UnicodeDecodeError:
        raise click.BadParameter(
            "is not text; give the public key (.pub), not the private one.",
            param_hint="PUBLIC_KEY_FILE",
        ) from None
    if "PRIVATE KEY" in text:
        # Never sent anywhere: the API would refuse it, but only after it had crossed the wire.
        raise click.BadParameter(
            "is a private key; give its public half (the .pub file).",
            param_hint="PUBLIC_KEY_FILE",
        )
    if not name:
        parts = text.split(None, 2)
        name = parts[2] if len(parts) == 3 else Path(public_key_file.name).name
    result = state.client.ssh_keys.create(name=name[:100], public_key=text)
    _out(state, result, SSH_KEY_COLUMNS, "SSH key")


@ssh_keys.command("delete")
@click.argument("ssh_key_id")
@click.pass_obj
def ssh_keys_delete(state, ssh_key_id):
    """Delete a key (machines already running keep it until they end)."""
    state.client.ssh_keys.delete(ssh_key_id)
    err_console.print(f"Deleted {escape(ssh_key_id)}.", highlight=False)


@main.group()
def billing():
    """Balance, ledger, invoices and top-ups."""


BALANCE_COLUMNS = ["currency", "mode", "balance", "accrued", "held", "available",
                   "funding_state", "grace_until", "invoice_past_due", "bookings_refused_from",
                   "auto_recharge_enabled", "spent_this_month",
                   "monthly_spend_limit"]  # fmt: skip


@billing.command("balance")
@click.pass_obj
def billing_balance(state):
    """What the organisation has, owes and holds, and whether it may book."""
    _out(state, state.client.billing.balance(), BALANCE_COLUMNS, "Balance")


@billing.command("ledger")
@click.option("--limit", type=LIMIT, default=50, show_default=True, help="At most this many.")
@click.pass_obj
def billing_ledger(state, limit):
    """Ledger lines, newest first (`usage export --ledger` for a whole period as CSV)."""
    rows = _first(state.client.billing.ledger(), limit)
    _out(state, rows, ["id", "created_at", "kind", "amount", "currency", "reservation",
                       "description"], "Ledger")  # fmt: skip


@billing.command("invoices")
@click.option("--limit", type=LIMIT, default=50, show_default=True, help="At most this many.")
@click.pass_obj
def billing_invoices(state, limit):
    """Invoices (postpaid), newest first, with the page to pay each."""
    rows = _first(state.client.billing.invoices(), limit)
    _out(state, rows, ["id", "status", "period_start", "period_end", "amount_due", "amount_paid",
                       "currency", "past_due", "hosted_invoice_url"],
         "Invoices")  # fmt: skip


@billing.command("top-up")
@click.argument("amount")
@click.pass_obj
def billing_top_up(state, amount):
    """Charge the default card AMOUNT (e.g. 100.00) into the prepaid balance."""
    _out(state, state.client.billing.top_up(amount=amount), ["id", "status", "amount",
         "currency", "automatic", "failure_reason", "created_at"], "Top-up")  # fmt: skip
