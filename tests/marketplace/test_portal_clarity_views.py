"""The portal says what things cost and do before they happen, and in words (issue 16, item 1).

Without a browser: what the pages state, what a POST does without confirmation (nothing), the
402's way out, interruptions, and that no raw field names, enum values or ISO times leak.
"""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from billing.services.funding import BillingFundingGate
from inventory.models import SiteStatus
from marketplace.funding import funding_gate_register
from marketplace.models import Reservation, ReservationStatus, ReservationTransition, Role, Tier
from marketplace.services.api_keys import api_key_create
from marketplace.services.quotes import quote_create
from marketplace.services.reservations import reservation_create, reservation_extend
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    member_client,
    tomorrow,
)
from tests.provisioning_support import ssh_key

pytestmark = pytest.mark.django_db

S = ReservationStatus


@pytest.fixture
def market():
    make_policy()
    h100 = GpuModelFactory()
    site = SiteFactory(slug="mo-i-rana", name="Mo i Rana", region="eu-north")
    make_nodes(site, h100, 2, gpus=8)
    make_rate(h100, "11.4800")
    return site, h100


def _reserve(org, *, hours=24, gpus=1, tier="on_demand", start=None, **kwargs):
    start = start or tomorrow()
    return reservation_create(
        organization=org, gpu_model="h100-sxm-80gb", gpu_count=gpus, starts_at=start,
        ends_at=start + timedelta(hours=hours), tier=tier, **kwargs,
    )  # fmt: skip


def _running(reservation, *, started_ago=timedelta(hours=1), **fields):
    """Move a booked reservation so it runs now (as if provisioned `started_ago`)."""
    now = timezone.now()
    length = reservation.ends_at - reservation.starts_at
    start = now - started_ago
    Reservation.objects.filter(pk=reservation.pk).update(
        status=S.ACTIVE, starts_at=start, ends_at=start + length, activated_at=start, **fields
    )
    reservation.refresh_from_db()
    return reservation


# --- extend -------------------------------------------------------------------------------


def test_the_extend_field_is_pre_filled_to_the_minute_with_a_minute_step(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    start = tomorrow()
    reservation = _reserve(org, start=start)
    # An end with seconds, as an extension to an odd time leaves it.
    odd_end = reservation.ends_at + timedelta(minutes=1, seconds=54)
    Reservation.objects.filter(pk=reservation.pk).update(ends_at=odd_end)

    page = member_client(org, Role.MEMBER).get(f"/reservations/{reservation.public_id}")
    field = re.search(r'<input[^>]*name="ends_at"[^>]*>', page.content.decode()).group(0)

    expected = (odd_end.replace(second=0) + timedelta(minutes=1, hours=1)).strftime(
        "%Y-%m-%dT%H:%M"
    )
    assert f'value="{expected}"' in field  # no seconds: every whole minute is a valid step
    assert 'step="60"' in field and 'type="datetime-local"' in field


def test_extending_shows_the_cost_first_and_changes_nothing_until_confirmed(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    reservation = _reserve(org, gpus=2, hours=2)
    new_end = (reservation.ends_at + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M")
    path = f"/reservations/{reservation.public_id}/extend"

    preview = client.post(path, {"ends_at": new_end})

    html = preview.content.decode()
    assert preview.status_code == 200
    assert 'id="added-amount">68.88 USD<' in html  # 2 GPUs × 11.48 × 3 h
    assert "114.80 USD (was 45.92 USD)" in html
    # The current end is what it "was", not "now" (read as the time of day).
    old_end = reservation.ends_at.strftime("%Y-%m-%d %H:%M")
    assert f'<dd id="new-end">{new_end.replace("T", " ")} UTC (was {old_end} UTC)</dd>' in html
    reservation.refresh_from_db()
    assert reservation.ends_at == reservation.starts_at + timedelta(hours=2)
    assert reservation.total_amount == Decimal("45.92")

    done = client.post(path, {"ends_at": new_end, "confirm": "True"})
    assert done.status_code == 302
    reservation.refresh_from_db()
    assert reservation.total_amount == Decimal("114.80")


def test_extending_an_end_off_the_minute_states_the_time_the_cost_is_for(
    market,
    allow_all_funding,  # noqa: F811
):
    """A booking for "now" ends at a time with seconds (booked at 21:58:24 for 3 hours), and a
    new end is to the minute, so the time added is not whole minutes. The page said "Added
    1 h 00 min × 2 GPUs at 11.4800" and "Costs 23.19 USD" (the price of 1 h 00 min 36 s), and
    "was" an end without its seconds: the figures it showed did not multiply to the cost."""
    org = OrganizationFactory()
    start = tomorrow() + timedelta(seconds=24)
    reservation = _reserve(org, gpus=2, hours=3, start=start)
    new_end = reservation.ends_at.replace(second=0) + timedelta(hours=1, minutes=1)

    html = (
        member_client(org, Role.MEMBER)
        .post(
            f"/reservations/{reservation.public_id}/extend",
            {"ends_at": new_end.strftime("%Y-%m-%dT%H:%M")},
        )
        .content.decode()
    )

    assert new_end - reservation.ends_at == timedelta(hours=1, seconds=36)
    was = reservation.ends_at.strftime("%Y-%m-%d %H:%M:%S")
    assert f'<dd id="new-end">{new_end:%Y-%m-%d %H:%M} UTC (was {was} UTC)</dd>' in html
    assert '<dd id="added">1 h 00 min 36 s × 2 GPUs at 11.4800 USD per GPU-hour</dd>' in html
    assert 'id="added-amount">23.19 USD<' in html  # 2 × 11.48 × (1 + 36/3600) = 23.1896
    reservation.refresh_from_db()
    assert reservation.ends_at == start + timedelta(hours=3)


def test_an_extension_is_to_the_minute(market, allow_all_funding):  # noqa: F811
    org = OrganizationFactory()
    reservation = _reserve(org, hours=2)
    later = (reservation.ends_at + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M") + ":30"

    response = member_client(org, Role.MEMBER).post(
        f"/reservations/{reservation.public_id}/extend", {"ends_at": later, "confirm": "True"}
    )

    assert response.status_code == 400
    assert "to the minute, without seconds" in response.content.decode()
    reservation.refresh_from_db()
    assert reservation.ends_at == reservation.starts_at + timedelta(hours=2)


def test_an_extension_to_an_earlier_end_is_refused_on_the_field(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    reservation = _reserve(org, hours=2)
    earlier = (reservation.ends_at - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")

    response = member_client(org, Role.MEMBER).post(
        f"/reservations/{reservation.public_id}/extend", {"ends_at": earlier}
    )

    assert response.status_code == 400
    assert "Choose a time after the current end" in response.content.decode()
    reservation.refresh_from_db()
    assert reservation.ends_at == reservation.starts_at + timedelta(hours=2)


# --- stop and cancel ------------------------------------------------------------------------


def test_stopping_states_the_refund_and_a_post_without_confirmation_stops_nothing(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    reservation = _running(_reserve(org, tier="reserved", term="1w", hours=24 * 7))
    path = f"/reservations/{reservation.public_id}/cancel"

    detail = client.get(f"/reservations/{reservation.public_id}").content.decode()
    assert f'href="{path}"' in detail and "Stop early…" in detail
    assert f'action="{path}"' not in detail  # no one-click stop on the detail page

    unconfirmed = client.post(path, {"reason": "done"})
    html = unconfirmed.content.decode()
    assert unconfirmed.status_code == 200
    assert 'id="refund">0.00 USD<' in html  # a reserved term that began refunds nothing
    assert "Stop now, refund 0.00 USD" in html
    reservation.refresh_from_db()
    assert reservation.status == S.ACTIVE

    confirmed = client.post(path, {"reason": "done", "confirm": "True"}, follow=True)
    assert "Stopped. Refund: 0.00 USD." in confirmed.content.decode()
    reservation.refresh_from_db()
    assert reservation.status in (S.RELEASING, S.COMPLETED)


def test_a_billing_member_cannot_reach_the_cancel_confirmation(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    reservation = _reserve(org)
    client = member_client(org, Role.BILLING)
    assert client.get(f"/reservations/{reservation.public_id}/cancel").status_code == 403
    response = client.post(f"/reservations/{reservation.public_id}/cancel", {"confirm": "True"})
    assert response.status_code == 403
    reservation.refresh_from_db()
    assert reservation.status == S.PENDING


# --- money on the quote, and the 402's way out ----------------------------------------------


def test_the_quote_states_what_is_due_now_and_what_it_may_cost_in_total(market):
    org = OrganizationFactory()
    start = tomorrow()
    quote = quote_create(
        organization=org, gpu_model="h100-sxm-80gb", gpu_count=1, starts_at=start,
        ends_at=start + timedelta(hours=24), tier="on_demand",
    )  # fmt: skip

    html = member_client(org, Role.OWNER).get(f"/quotes/{quote.public_id}").content.decode()

    assert 'id="quote-total">275.52 USD<' in html
    assert "Reserve · 11.48 USD due now" in html  # the first hour, not the 275.52
    assert "Reserve for 275.52" not in html
    assert "not enough for what is due now" in html  # a 0.00 balance, said before trying
    assert 'href="/billing/top-ups"' in html


def _reserve_from_a_quote(org):
    """The owner reserves 4 H100s for 3 hours from the quote page, with an SSH key."""
    start = tomorrow()
    quote = quote_create(
        organization=org, gpu_model="h100-sxm-80gb", gpu_count=4, starts_at=start,
        ends_at=start + timedelta(hours=3), tier="on_demand",
    )  # fmt: skip
    return member_client(org, Role.OWNER).post(
        f"/quotes/{quote.public_id}", {"ssh_public_keys": ssh_key()}
    )


def test_a_402_offers_top_up_a_card_and_a_smaller_request_and_reserves_nothing(market):
    org = OrganizationFactory()
    response = _reserve_from_a_quote(org)

    html = response.content.decode()
    assert response.status_code == 402
    assert "Not reserved: payment needed." in html
    way_out = html.split('id="payment-required"')[1].split("</div>")[0]
    assert 'href="/billing/top-ups"' in way_out
    assert 'href="/billing/payment-methods"' in way_out
    assert "gpu_count=2" in way_out and "Ask for fewer GPUs" in way_out
    assert not Reservation.objects.filter(organization=org).exists()


def test_a_402_for_the_spend_limit_points_to_the_limit_not_to_a_top_up(market):
    # Topping up cannot fix it: the month's limit is what refused the booking.
    from billing.models import LedgerKind
    from billing.services.accounts import billing_account_get_or_create
    from billing.services.ledger import ledger_entry_add

    org = OrganizationFactory()
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=100000,
                     currency="usd", idempotency_key="c")  # fmt: skip
    account = billing_account_get_or_create(organization=org)
    account.monthly_spend_limit_minor = 100
    account.save(update_fields=["monthly_spend_limit_minor"])
    response = _reserve_from_a_quote(org)

    html = response.content.decode()
    assert response.status_code == 402
    assert "Not reserved: over this month's spend limit." in html
    way_out = html.split('id="payment-required"')[1].split("</div>")[0]
    assert "Change the spend limit" in way_out and 'href="/billing/top-ups"' not in way_out
    assert not Reservation.objects.filter(organization=org).exists()


# --- SSH ----------------------------------------------------------------------------------


def test_reserving_without_an_ssh_key_is_refused_unless_asked_for(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    start = tomorrow()
    quote = quote_create(
        organization=org, gpu_model="h100-sxm-80gb", gpu_count=1, starts_at=start,
        ends_at=start + timedelta(hours=2), tier="on_demand",
    )  # fmt: skip

    refused = client.post(f"/quotes/{quote.public_id}", {"image": ""})
    assert refused.status_code == 400
    assert "Add an SSH key to log in to the nodes" in refused.content.decode()
    assert not Reservation.objects.filter(organization=org).exists()

    chosen = client.post(f"/quotes/{quote.public_id}", {"without_ssh": "on"})
    assert chosen.status_code == 302
    reservation = _running(Reservation.objects.get(organization=org))
    Reservation.objects.filter(pk=reservation.pk).update(
        connection={"host": "10.0.0.5", "ssh_port": 2222, "ports": {}}
    )
    page = client.get(f"/reservations/{reservation.public_id}").content.decode()
    assert "ssh -p 2222" not in page  # a command that could not work is not offered
    assert "No SSH (the workload has no SSH keys)." in page


# --- interruptions ----------------------------------------------------------------------------


def test_an_announced_interruption_counts_down_everywhere_and_extend_is_not_offered(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    reservation = _running(_reserve(org, tier="interruptible"))
    Reservation.objects.filter(pk=reservation.pk).update(
        preempt_at=timezone.now() + timedelta(minutes=3, seconds=30),
        preempt_reason="Grid curtailment at Mo i Rana",
    )

    for path in ("/dashboard", "/reservations", f"/reservations/{reservation.public_id}"):
        html = client.get(path).content.decode()
        assert "Interruption in 3 min" in html, path
    detail = client.get(f"/reservations/{reservation.public_id}").content.decode()
    assert 'id="extend"' not in detail
    refused = client.post(
        f"/reservations/{reservation.public_id}/extend",
        {"ends_at": "2099-01-01T00:00", "confirm": "True"},
    )
    assert refused.status_code in (302, 400)
    reservation.refresh_from_db()
    assert reservation.ends_at < timezone.now() + timedelta(days=2)


def test_a_search_that_finds_nothing_because_every_site_is_curtailed_says_so(
    market,
    allow_all_funding,  # noqa: F811
):
    site, _ = market
    site.status = SiteStatus.CURTAILED
    site.save(update_fields=["status"])
    org = OrganizationFactory()

    html = (
        member_client(org, Role.MEMBER)
        .get("/gpus", {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "plan": "on_demand"})
        .content.decode()
    )

    assert "Every site that has these GPUs is curtailed now" in html
    assert "Mo i Rana" in html
    assert "Try fewer GPUs" not in html


def test_a_search_link_without_a_count_or_plan_searches_for_what_the_form_shows(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)

    bare = client.get("/gpus", {"gpu_model": "h100-sxm-80gb"})
    spelled = client.get("/gpus", {"gpu_model": "h100-sxm-80gb", "gpu_count": 1,
                                   "plan": "on_demand"})  # fmt: skip

    assert bare.status_code == 200
    assert "This field is required" not in bare.content.decode()
    assert bare.context["form"].cleaned_data["tier"] == Tier.ON_DEMAND
    offers = [offer for offer, _, _ in bare.context["offers"]]
    assert [o.site.slug for o in offers] == [o.site.slug for o, _, _ in spelled.context["offers"]]
    assert offers and all(o.gpu_count == 1 for o in offers)


# --- words, not internals ---------------------------------------------------------------------

RAW = [
    (re.compile(r"\bon_demand\b"), "a tier's value"),
    (re.compile(r"\bstarts_at\b|\bends_at\b(?!\")"), "a field name"),
    (re.compile(r"\((?:1w|1m|3m|1y)\)"), "a term's value"),
    (re.compile(r"utilisation \d|→ × \d"), "a raw multiplier line"),
    (re.compile(r"\d{2}:\d{2}:\d{2}\.\d+"), "an ISO time with microseconds"),
    (re.compile(r"rounded half-up"), "the rounding rule"),
    (re.compile(r"api_key:|user:[a-z]"), "an actor label"),
    (re.compile(r">(pending|active|cancelled|reserved|interruptible)<"), "an enum value"),
]


def _visible_text(html: str) -> str:
    """The page without tags, attribute values, scripts and form values (what people read)."""
    html = re.sub(r"<(script|style)\b.*?</\1>", "", html, flags=re.S)
    html = re.sub(r"<option[^>]*>", "<option>", html)
    return re.sub(r"<[^>]+>", "><", html)


def test_pages_speak_in_words_not_field_names_enum_values_or_iso_times(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    client = member_client(org, Role.OWNER)
    key, _ = api_key_create(organization=org, name="CI runner", scopes=["write"], created_by=None)
    reserved = _reserve(org, tier="reserved", term="1w", hours=24 * 7, gpus=8)
    reservation_extend(
        reservation=reserved,
        new_ends_at=reserved.ends_at + timedelta(hours=1, seconds=30, microseconds=5),
        actor_label=f"api_key:{key.prefix}",
    )
    start = tomorrow()
    quote = quote_create(
        organization=org, gpu_model="h100-sxm-80gb", gpu_count=1, starts_at=start,
        ends_at=start + timedelta(days=7), tier="reserved", term="1w",
    )  # fmt: skip
    pages = {
        "/dashboard": None,
        "/reservations": None,
        f"/reservations/{reserved.public_id}": None,
        f"/quotes/{quote.public_id}": None,
        "/gpus?gpu_model=h100-sxm-80gb&gpu_count=1&plan=reserved_1w": None,
        "/billing/": None,
        "/billing/usage": None,
        "/sites": None,
        "/sites/mo-i-rana": None,
        "/gpus": None,
    }
    for path in pages:
        response = client.get(path)
        assert response.status_code == 200, path
        text = _visible_text(response.content.decode())
        for pattern, what in RAW:
            match = pattern.search(text)
            assert match is None, f"{path} shows {what}: {match.group(0)!r}"

    detail = client.get(f"/reservations/{reserved.public_id}").content.decode()
    assert "<title>8 × NVIDIA H100 SXM 80GB at Mo i Rana · Switchyard</title>" in detail
    assert 'data-copy="' + reserved.public_id + '"' in detail  # the id, small and copyable
    assert "API key “CI runner”" in detail  # not api_key:sy_…
    assert "Reserved, 1 week" in detail
    # 8 × 11.48 × 0.95 (1-week discount) × 169 h, with a thousands separator
    reserved.refresh_from_db()
    assert f"{reserved.total_amount:,} USD" in detail and "," in f"{reserved.total_amount:,}"
    transition = ReservationTransition.objects.filter(reservation=reserved).last()
    assert transition.cause.count(":") >= 2  # the stored cause has ISO times; the page does not
    assert re.search(r"extended: end \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC → ", detail)


def test_the_live_endpoint_gives_running_figures_for_the_organisations_own_only(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    other = OrganizationFactory()
    mine = _running(_reserve(org, gpus=2), started_ago=timedelta(hours=1, minutes=30))
    theirs = _running(_reserve(other))
    # What billing has charged so far (metered usage): the figure shown, not a guess. Billing
    # answers that question (the fixture's allow-all gate knows no charges).
    funding_gate_register(BillingFundingGate())
    LedgerEntry.objects.create(
        organization=org, reservation=mine, kind=LedgerKind.USAGE, amount_minor=-3444,
        currency="usd", description="usage", idempotency_key="usage-1", gpu_seconds=10800,
    )  # fmt: skip

    response = member_client(org, Role.MEMBER).get(
        "/reservations/live", {"id": [mine.public_id, theirs.public_id]}
    )

    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    rows = response.json()["reservations"]
    assert [r["id"] for r in rows] == [mine.public_id]
    row = rows[0]
    assert row["status_label"] == "Running"
    assert 5400 <= row["elapsed_seconds"] <= 5405
    assert row["cost_so_far"] == "34.44" and row["cost_so_far_display"] == "34.44 USD"
    assert 22 * 3600 + 29 * 60 <= row["remaining_seconds"] <= 22 * 3600 + 30 * 60
    assert row["remaining"] in ("22 h 29 min", "22 h 30 min")
    assert row["interruption_in_seconds"] is None
    assert Tier.ON_DEMAND == mine.tier


def test_a_reservation_past_its_start_but_not_running_says_it_is_starting(
    market,
    allow_all_funding,  # noqa: F811
):
    """Not "starts in 0 min": its time has come, it is being set up (or moved after a fault)."""
    org = OrganizationFactory()
    later, now_due = _reserve(org), _reserve(org, start=timezone.now() + timedelta(seconds=2))
    Reservation.objects.filter(pk=now_due.pk).update(
        starts_at=timezone.now() - timedelta(minutes=1), status=ReservationStatus.PROVISIONING
    )
    rows = (
        member_client(org, Role.MEMBER)
        .get("/reservations/live", {"id": [later.public_id, now_due.public_id]})
        .json()["reservations"]
    )
    labels = {r["id"]: r["time_left"] for r in rows}
    assert labels[later.public_id].startswith("starts in ")
    assert labels[now_due.public_id] == "starting now"


def test_a_reservation_booked_with_an_api_key_shows_the_keys_name_in_its_history(
    market,
    allow_all_funding,  # noqa: F811
):
    from tests.marketplace.api_fixtures import key_client

    org = OrganizationFactory()
    api = key_client(org)  # named "test key"
    start = tomorrow()
    created = api.post(
        "/api/v1/reservations",
        {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "starts_at": start.isoformat(),
         "ends_at": (start + timedelta(hours=1)).isoformat(), "tier": "on_demand",
         "workload": {"ssh_public_keys": [ssh_key()]}},
        format="json",
    )  # fmt: skip
    assert created.status_code == 201, created.content

    reservation = Reservation.objects.get(organization=org)
    label = reservation.transitions.get(from_status="").actor_label
    assert label.startswith("api_key:")  # not "api": the key that booked it
    html = member_client(org, Role.MEMBER).get(f"/reservations/{reservation.public_id}")
    history = html.content.decode().split('id="history"')[1]
    assert "API key “test key”" in history and ">api<" not in history


@pytest.mark.parametrize(("seconds", "said"), [(3600, "1 h 00 min"), (900, "15 min")])
def test_the_reset_request_answer_states_the_configured_link_lifetime(
    client, settings, seconds, said
):
    """PASSWORD_RESET_TIMEOUT_SECONDS is configurable: the answer to a reset request states it
    (it said "an hour" whatever was set)."""
    settings.PASSWORD_RESET_TIMEOUT = seconds

    page = client.get("/password-reset/sent").content.decode()

    assert f"It works once, for {said}." in page and "an hour" not in page
