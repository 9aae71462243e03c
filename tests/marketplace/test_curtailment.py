"""Grid curtailment of all flexible load: interruptible reservations are preempted with notice,
the rest protected, the window not sold. Megawatt targets: test_curtailment_megawatts.py."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import re
import time
from datetime import timedelta
from decimal import Decimal
from html import unescape

import pytest
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from config.errors import Conflict, ValidationFailed
from inventory.models import SiteStatus
from marketplace.models import (
    Allocation,
    Curtailment,
    CurtailmentVictim,
    Event,
    Reservation,
    ReservationStatus,
    Role,
)
from marketplace.provisioning.scheduler import reservations_dispatch_due
from marketplace.selectors.availability import AvailabilityQuery, availability_search
from marketplace.services.curtailment import curtailment_announce, curtailment_call_off
from tests.factories import MembershipFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    book_at_market,
    fresh_rate_limits,
    key_client,
    market,
    org,
    owner,
)
from tests.marketplace.market_helpers import member_client

pytestmark = pytest.mark.django_db
S = ReservationStatus


def _book(org, *, tier, start, hours, active=False, gpus=2):
    return book_at_market(org, tier=tier, start=start, hours=hours, active=active, gpus=gpus)


@pytest.fixture
def booked(market, org, owner):
    now = timezone.now()
    return {
        "running": _book(org, tier="interruptible", start=now, hours=6, active=True),
        "on_demand": _book(org, tier="on_demand", start=now, hours=6, active=True),
        "starts_inside": _book(org, tier="interruptible", start=now + timedelta(hours=3), hours=2),
        "starts_after_until": _book(
            org, tier="interruptible", start=now + timedelta(hours=10), hours=2
        ),
        "ends_before": _book(org, tier="interruptible", start=now, hours=0.5),
    }


def _fresh(reservation):
    reservation.refresh_from_db()
    return reservation


def test_an_announcement_notices_running_interruptible_work_and_protects_the_rest(
    booked, market, org, owner, mailoutbox, django_capture_on_commit_callbacks
):
    site, _ = market
    # An admin whose account was deactivated has lost their access: not e-mailed.
    MembershipFactory(organization=org, role=Role.ADMIN, user__is_active=False, user__password="!")
    shed_at = timezone.now() + timedelta(hours=1)

    with django_capture_on_commit_callbacks(execute=True):
        curtailment = curtailment_announce(
            site=site,
            # Given with an offset (as the API takes it): the mail still says it in UTC.
            shed_at=shed_at.astimezone(timezone.get_fixed_timezone(120)),
            until=shed_at + timedelta(hours=7),
            reason="ERCOT EEA 2",
        )

    site.refresh_from_db()
    assert site.status == SiteStatus.ACTIVE  # it sells outside the window
    running = _fresh(booked["running"])
    assert (running.status, running.preempt_at) == (S.ACTIVE, shed_at)
    assert "ERCOT EEA 2" in running.preempt_reason
    inside = _fresh(booked["starts_inside"])
    assert inside.status == S.PREEMPTED and inside.activated_at is None
    assert not Allocation.objects.filter(reservation=inside, is_live=True).exists()
    for name in ("on_demand", "starts_after_until", "ends_before"):
        untouched = _fresh(booked[name])
        assert untouched.preempt_at is None and untouched.status == booked[name].status, name
    assert (curtailment.reservations_notified, curtailment.reservations_preempted) == (1, 1)
    # Nothing more is sold there for the window; after it, the site sells again.
    search = {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "tier": "on_demand"}
    inside = {"starts_at": shed_at + timedelta(hours=6), "ends_at": shed_at + timedelta(hours=8)}
    assert availability_search(AvailabilityQuery(**search, **inside)) == []
    after = {
        "starts_at": shed_at + timedelta(days=1),
        "ends_at": shed_at + timedelta(days=1, hours=1),
    }
    assert [o.site.slug for o in availability_search(AvailabilityQuery(**search, **after))] == [
        "abilene-1"
    ]
    # The owner is told which reservations stop and when.
    (mail,) = mailoutbox
    assert mail.to == [owner.user.email]
    assert (
        booked["running"].public_id in mail.body and booked["starts_inside"].public_id in mail.body
    )
    assert booked["on_demand"].public_id not in mail.body
    # The time as the other mails write it, in UTC and labelled so.
    assert f"stops at {shed_at:%Y-%m-%d %H:%M} UTC" in mail.body
    # Each with a link to its page in the portal, on SITE_URL.
    for name in ("running", "starts_inside"):
        link = f"{settings.SITE_URL.rstrip('/')}/reservations/{booked[name].public_id}\n"
        assert link in mail.body, name


def test_the_api_shows_the_notice_until_the_preemption(booked, market, org):
    site, _ = market
    client = key_client(org)
    running = booked["running"]
    url = f"/api/v1/reservations/{running.public_id}"
    assert client.get(url).json()["interruption"] is None

    shed_at = timezone.now() + timedelta(hours=1)
    curtailment_announce(site=site, shed_at=shed_at, reason="Demand response event")

    notice = client.get(url).json()["interruption"]
    assert notice["at"] == shed_at.isoformat().replace("+00:00", "Z")
    assert "Demand response event" in notice["reason"]
    listed = {
        r["id"]: r["interruption"] for r in client.get("/api/v1/reservations").json()["results"]
    }
    assert listed[running.public_id] == notice
    assert listed[booked["on_demand"].public_id] is None


def test_a_quote_across_a_curtailment_is_refused_as_curtailed_and_writes_nothing(market, org):
    site, _ = market
    client = key_client(org)
    start = timezone.now() + timedelta(hours=2)
    ask = {
        "gpu_model": "h100-sxm-80gb",
        "gpu_count": 2,
        "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=2)).isoformat(),
        "tier": "interruptible",
        "site": "abilene-1",
    }
    quoted = client.post("/api/v1/quotes", ask, format="json")
    assert quoted.status_code == 201, quoted.content
    shed_at = timezone.now() + timedelta(hours=1)
    curtailment_announce(
        site=site, shed_at=shed_at, until=shed_at + timedelta(hours=4), reason="HQ peak"
    )
    reservations, events = Reservation.objects.count(), Event.objects.count()

    # The GPUs are free; the window is what is not sold: the refusal says so, as a direct
    # booking's does, rather than that the GPUs were taken.
    booked = client.post("/api/v1/reservations", {"quote": quoted.json()["id"]}, format="json")
    assert booked.status_code == 409, booked.content
    assert booked.json()["error"]["code"] == "site_curtailed"
    assert "shedding load" in booked.json()["error"]["message"]
    # A new quote at that site for the window: the same reason.
    again = client.post("/api/v1/quotes", ask, format="json")
    assert again.status_code == 409, again.content
    assert again.json()["error"]["code"] == "site_curtailed"
    assert (Reservation.objects.count(), Event.objects.count()) == (reservations, events)
    # Not naming the site, it is the search's own refusal (no site has them).
    anywhere = {k: v for k, v in ask.items() if k != "site"}
    anywhere = client.post("/api/v1/quotes", anywhere, format="json")
    assert anywhere.json()["error"]["code"] == "not_available"


def test_at_shed_time_the_dispatcher_preempts_and_stops_the_running_work(booked, market):
    site, _ = market
    # The operator's call gives one second, less than the minimum notice: it is what we give.
    curtailment = curtailment_announce(
        site=site,
        shed_at=timezone.now() + timedelta(seconds=1),
        reason="Frequency event",
        call_notice=True,
    )
    assert curtailment.short_notice
    assert "Short notice" in _fresh(booked["running"]).preempt_reason
    assert reservations_dispatch_due()["preempted"] == 0  # the notice has not run out
    time.sleep(1.1)

    counts = reservations_dispatch_due()

    running = _fresh(booked["running"])
    # Billed to the notice's time, whenever the tick that carried it out came.
    assert (running.status, running.released_at) == (S.PREEMPTED, curtailment.preempt_at)
    assert "Frequency event" in running.status_reason
    # Both interruptible reservations running across shed time: the one already active and the
    # one that started right away (not provisioned yet: nothing to stop, never charged).
    assert counts["preempted"] == 2
    assert _fresh(booked["ends_before"]).status == S.PREEMPTED
    assert counts["ended"] == 1  # the release task that stops the active one's workload
    assert not Allocation.objects.filter(reservation=running, is_live=True).exists()
    # What was held is kept as history, cut when the tick freed the GPUs.
    held = Allocation.objects.filter(reservation=running)
    assert held and all(running.released_at <= a.period.upper <= timezone.now() for a in held)
    assert _fresh(booked["on_demand"]).status == S.ACTIVE
    assert reservations_dispatch_due()["preempted"] == 0


def test_an_earlier_notice_is_not_postponed_by_a_later_announcement(booked, market):
    site, _ = market
    first = timezone.now() + timedelta(minutes=30)
    curtailment_announce(site=site, shed_at=first, reason="first")
    curtailment_announce(site=site, shed_at=first + timedelta(hours=1), reason="second")

    running = _fresh(booked["running"])
    assert running.preempt_at == first and "first" in running.preempt_reason
    assert Curtailment.objects.count() == 2


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        ({"shed_at": -timedelta(minutes=5)}, ValidationFailed, "shed_at"),
        ({"until": timedelta(0)}, ValidationFailed, "until"),
        ({"reason": "  "}, ValidationFailed, "reason"),
        ({"site_status": SiteStatus.RETIRED}, Conflict, "site"),
    ],
)
def test_a_bad_announcement_is_refused_and_changes_nothing(booked, market, change, error, field):
    site, _ = market
    if "site_status" in change:
        type(site).objects.filter(pk=site.pk).update(status=change["site_status"])
        site.refresh_from_db()
    now = timezone.now()
    shed_at = now + change.get("shed_at", timedelta(hours=1))
    until = shed_at + change["until"] if "until" in change else None

    with pytest.raises(error) as raised:
        curtailment_announce(
            site=site, shed_at=shed_at, until=until, reason=change.get("reason", "why")
        )

    assert raised.value.field == field
    assert not Curtailment.objects.exists()
    assert _fresh(booked["running"]).preempt_at is None
    assert _fresh(booked["starts_inside"]).status == booked["starts_inside"].status
    site.refresh_from_db()
    assert site.status == change.get("site_status", SiteStatus.ACTIVE)


@pytest.fixture
def staff_client(client):
    from tests.factories import UserFactory

    client.force_login(UserFactory(username="grid-desk", is_staff=True, is_superuser=True))
    return client


def _admin_form(site, shed_at, reason="ERCOT conservation appeal"):
    local = timezone.localtime(shed_at)
    return {
        "site": site.pk,
        "shed_at_0": local.strftime("%Y-%m-%d"),
        "shed_at_1": local.strftime("%H:%M:%S"),
        "until_0": "",
        "until_1": "",
        "reason": reason,
    }


ADD = "/admin/marketplace/curtailment/add/"


def _posted_back(page) -> dict:
    """What the confirmation page's form posts: its hidden inputs (the call, the plan shown)."""
    html = page.content.decode()
    form = html[html.rindex('<form method="post">') :]
    form = form[: form.index("</form>")]
    inputs = re.findall(r'<input type="hidden" name="([^"]+)"(?: value="([^"]*)")?', form)
    return {name: unescape(value) for name, value in inputs}


def _table(page, table_id: str) -> str:
    html = page.content.decode()
    if f'id="{table_id}"' not in html:
        return ""
    table = html[html.index(f'id="{table_id}"') :]
    return table[: table.index("</table>")]


def _untouched(booked) -> None:
    assert not Curtailment.objects.exists() and not CurtailmentVictim.objects.exists()
    for name, reservation in booked.items():
        fresh = _fresh(reservation)
        assert (fresh.status, fresh.preempt_at) == (reservation.status, None), name


def test_staff_see_whom_a_curtailment_hits_before_announcing_it_and_nothing_is_written(
    booked, market, org, staff_client, mailoutbox
):
    site, _ = market
    shed_at = (timezone.now() + timedelta(hours=2)).replace(microsecond=0)
    events = Event.objects.count()

    with CaptureQueriesContext(connection) as queries:
        page = staff_client.post(ADD, _admin_form(site, shed_at))

    assert page.status_code == 200
    writes = [
        q["sql"]
        for q in queries
        if q["sql"].lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))
        or "FOR UPDATE" in q["sql"].upper()
    ]
    assert writes == []
    _untouched(booked)
    assert (Event.objects.count(), len(mailoutbox), LogEntry.objects.count()) == (events, 0, 0)
    # running: noticed at shed time; both that start later (no `until`): preempted at once.
    noticed, at_once = _table(page, "plan-noticed"), _table(page, "plan-preempted")
    assert booked["running"].public_id in noticed
    assert booked["starts_inside"].public_id not in noticed
    assert org.name in noticed and "1.610 kW (rated)" in noticed
    for name in ("starts_inside", "starts_after_until"):
        assert booked[name].public_id in at_once and booked[name].public_id not in noticed
    body = page.content.decode()
    for name in ("on_demand", "ends_before"):
        assert booked[name].public_id not in body
    assert 'would shed <strong id="plan-shed">0.00483 MW</strong> from 3 reservations' in body
    assert f"Preempted at {shed_at:%Y-%m-%d %H:%M:%S} (UTC), the shed time" in body
    assert f"Organisations: {org.name}</li>" in body
    assert 'id="plan-short"' not in body and 'id="plan-changed"' not in body


def test_staff_announce_a_curtailment_in_the_admin_as_the_confirmation_showed(
    booked, market, staff_client
):
    site, _ = market
    shed_at = (timezone.now() + timedelta(hours=2)).replace(microsecond=0)
    page = staff_client.post(ADD, _admin_form(site, shed_at))

    response = staff_client.post(ADD, _posted_back(page), follow=True)

    assert response.status_code == 200
    (curtailment,) = Curtailment.objects.all()
    assert curtailment.announced_by.username == "grid-desk"
    # As shown: running noticed; both that start later (no `until` given): preempted now.
    assert (curtailment.reservations_notified, curtailment.reservations_preempted) == (1, 2)
    assert curtailment.shed_kw == Decimal("4.830")  # the 0.00483 MW the page said
    assert set(curtailment.victims.values_list("reservation_id", flat=True)) == {
        booked[name].pk for name in ("running", "starts_inside", "starts_after_until")
    }
    assert b"asked all flexible load" in response.content
    assert LogEntry.objects.get().object_id == str(curtailment.pk)
    assert _fresh(booked["running"]).preempt_at == shed_at
    site.refresh_from_db()
    assert site.status == SiteStatus.ACTIVE
    # A record: the change page edits nothing, and it cannot be deleted.
    page = staff_client.get(f"/admin/marketplace/curtailment/{curtailment.pk}/change/")
    assert page.status_code == 200 and b'name="reason"' not in page.content
    assert (
        staff_client.get(f"/admin/marketplace/curtailment/{curtailment.pk}/delete/").status_code
        == 403
    )


def _past(site, form):
    return {**form, **_admin_form(site, timezone.now() - timedelta(hours=1), form["reason"])}


def _too_short_to_notice(site, form):
    # Shed in 30 s for a minute: the minimum notice (2 min) would run out after the window.
    shed_at = timezone.now() + timedelta(seconds=30)
    until = timezone.localtime(shed_at + timedelta(minutes=1))
    return {
        **form,
        **_admin_form(site, shed_at, form["reason"]),
        "until_0": until.strftime("%Y-%m-%d"),
        "until_1": until.strftime("%H:%M:%S"),
    }


def _ends_before_it_starts_unexplained(site, form):
    # With another field wrong the service's check is not reached: the database constraint's
    # own words were shown ("Constraint “curtailment_until_after_shed_at” is violated.").
    shed_at = timezone.now() + timedelta(hours=2)
    until = timezone.localtime(shed_at - timedelta(hours=1))
    return {
        **form,
        **_admin_form(site, shed_at, " "),
        "until_0": until.strftime("%Y-%m-%d"),
        "until_1": until.strftime("%H:%M:%S"),
    }


@pytest.mark.parametrize("confirming", [False, True], ids=["on the form", "on confirming"])
@pytest.mark.parametrize(
    ("spoil", "error"),
    [
        (_past, "shed_at is in the past."),
        (_too_short_to_notice, "The window ends before the minimum notice runs out (120 s)."),
        (lambda site, form: {**form, "reason": " "}, "This field is required."),
        (
            _ends_before_it_starts_unexplained,
            "The window must end after it starts (until after shed_at).",
        ),
    ],
    ids=["past", "notice too short", "no reason", "ends before it starts"],
)
def test_bad_input_shows_the_admin_form_again_with_its_errors_and_writes_nothing(
    booked, market, staff_client, spoil, error, confirming
):
    site, _ = market
    form = _admin_form(site, timezone.now() + timedelta(hours=2))
    if confirming:  # the call was fine when shown, and is not when confirmed
        form = _posted_back(staff_client.post(ADD, form))
        assert form["confirmed"] == "yes" and form["plan"]

    response = staff_client.post(ADD, spoil(site, form))

    assert response.status_code == 200
    body = response.content.decode()
    assert error in body and 'class="errorlist' in body
    assert "is violated" not in body
    assert 'id="plan-summary"' not in body and 'name="reason"' in body  # the form, not a plan
    _untouched(booked)
    assert not LogEntry.objects.exists()
    site.refresh_from_db()
    assert site.status == SiteStatus.ACTIVE


def test_a_plan_that_changed_before_confirmation_is_shown_again_and_nothing_is_announced(
    booked, market, org, staff_client
):
    site, _ = market
    shed_at = (timezone.now() + timedelta(hours=2)).replace(microsecond=0)
    shown = _posted_back(staff_client.post(ADD, _admin_form(site, shed_at)))
    # A booking lands in the window between the preview and the confirmation.
    landed = _book(org, tier="interruptible", start=shed_at + timedelta(hours=1), hours=1)

    page = staff_client.post(ADD, shown)

    assert page.status_code == 200
    body = page.content.decode()
    assert 'id="plan-changed"' in body and "nothing was announced" in body
    assert landed.public_id in _table(page, "plan-preempted")
    assert "from 4 reservations" in body
    _untouched(booked)
    assert _fresh(landed).status == landed.status and not LogEntry.objects.exists()
    again = _posted_back(page)
    assert again["plan"] != shown["plan"]

    staff_client.post(ADD, again)

    (curtailment,) = Curtailment.objects.all()
    assert (curtailment.reservations_notified, curtailment.reservations_preempted) == (1, 3)
    assert _fresh(landed).status == S.PREEMPTED


def test_staff_who_may_not_add_curtailments_get_403_and_nothing_is_written(booked, market, client):
    from django.contrib.auth.models import Permission

    from tests.factories import UserFactory

    site, _ = market
    user = UserFactory(username="support", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename="view_curtailment"))
    client.force_login(user)
    form = _admin_form(site, timezone.now() + timedelta(hours=2))

    assert client.post(ADD, form).status_code == 403
    assert client.post(ADD, {**form, "confirmed": "yes", "plan": "0" * 32}).status_code == 403
    _untouched(booked)


def test_calling_it_off_before_shed_time_withdraws_the_notices_and_sells_the_site_again(
    booked, market
):
    site, _ = market
    curtailment = curtailment_announce(
        site=site, shed_at=timezone.now() + timedelta(hours=1), reason="Forecast peak"
    )

    withdrawn = curtailment_call_off(curtailment=curtailment)

    assert withdrawn == 1
    running = _fresh(booked["running"])
    assert (running.preempt_at, running.preempt_reason) == (None, "")
    assert _fresh(booked["starts_inside"]).status == S.PREEMPTED  # stays: it never ran
    site.refresh_from_db()
    assert site.status == SiteStatus.ACTIVE
    curtailment.refresh_from_db()
    assert curtailment.called_off_at is not None
    assert reservations_dispatch_due()["preempted"] == 0
    with pytest.raises(Conflict) as again:
        curtailment_call_off(curtailment=curtailment)
    assert again.value.code == "already_called_off"


def test_calling_one_off_hands_its_reservations_to_the_other_pending_curtailment(booked, market):
    site, _ = market
    now = timezone.now()
    early = curtailment_announce(site=site, shed_at=now + timedelta(hours=1), reason="early")
    late = curtailment_announce(site=site, shed_at=now + timedelta(hours=2), reason="late")
    assert late.reservations_notified == 0  # the early one sheds them already

    curtailment_call_off(curtailment=early)

    running = _fresh(booked["running"])
    assert running.preempt_at == now + timedelta(hours=2) and "late" in running.preempt_reason
    late.refresh_from_db()
    assert late.reservations_notified == 1
    assert late.victims.filter(withdrawn_at__isnull=True).get().reservation_id == running.pk


def test_during_its_window_calling_it_off_ends_it_now_and_sells_the_rest(booked, market):
    site, _ = market
    start = timezone.now() + timedelta(minutes=5)
    curtailment = curtailment_announce(
        site=site, shed_at=start, until=start + timedelta(hours=4), reason="now"
    )
    later = timezone.now() + timedelta(minutes=6)

    withdrawn = curtailment_call_off(curtailment=curtailment, now=later)

    assert withdrawn == 2  # running across the window, not preempted yet (dispatcher lag)
    assert _fresh(booked["running"]).preempt_at is None
    curtailment.refresh_from_db()
    assert curtailment.called_off_at is None and curtailment.until == later
    with pytest.raises(Conflict) as refused:
        curtailment_call_off(curtailment=curtailment, now=later + timedelta(seconds=1))
    assert refused.value.code == "curtailment_ended"


def test_staff_call_one_off_from_the_admin_list(booked, market, staff_client):
    site, _ = market
    curtailment = curtailment_announce(
        site=site, shed_at=timezone.now() + timedelta(hours=1), reason="Forecast peak"
    )

    response = staff_client.post(
        "/admin/marketplace/curtailment/",
        {"action": "call_off", "_selected_action": [curtailment.pk]},
        follow=True,
    )

    assert b"called off or ended, 1 notice(s) withdrawn" in response.content
    assert _fresh(booked["running"]).preempt_at is None


@pytest.mark.django_db(transaction=True)
def test_an_announce_picked_as_a_deadlocks_victim_is_taken_again(market, org, monkeypatch):
    """A worker holding a running reservation's row asks for one of the site's nodes while the
    announce, holding the nodes, waits for that reservation: PostgreSQL rolls one of the two
    back: the one whose deadlock check finds the circle. Only the announce checks here (the
    worker's deadlock_timeout is a minute, the announce's 3 s, time enough for the worker to
    close the circle on a loaded machine), so the announce is the victim; it is taken again,
    once the worker is done, instead of failing (from the API, the admin or a grid call
    alike)."""
    import threading

    from django.db import connection, transaction

    from inventory.models import Node
    from marketplace.models import Reservation
    from marketplace.services import curtailment as service
    from tests.races import until_a_backend_waits_for_this_one

    site, _ = market
    running = _book(org, tier="interruptible", start=timezone.now(), hours=6, active=True)
    node_id = Allocation.objects.filter(reservation=running).values_list("node_id", flat=True)[0]
    holding, failures, announce_waited = threading.Event(), [], []

    def worker() -> None:
        try:
            with transaction.atomic():
                with connection.cursor() as cur:
                    cur.execute("SET LOCAL deadlock_timeout = '60s'")
                Reservation.objects.select_for_update().get(pk=running.pk)
                holding.set()
                # Once the announce, holding the nodes, waits for the reservation's row:
                announce_waited.append(until_a_backend_waits_for_this_one())
                Node.objects.select_for_update().get(pk=node_id)  # closes the circle
        except Exception as exc:  # noqa: BLE001 (reported below)
            failures.append(exc)
        finally:
            connection.close()

    attempts = []
    lock_site = service._lock_site
    monkeypatch.setattr(
        service, "_lock_site", lambda site_id: attempts.append(1) or lock_site(site_id)
    )
    thread = threading.Thread(target=worker)
    thread.start()
    assert holding.wait(10)

    with connection.cursor() as cur:
        cur.execute("SET deadlock_timeout = '3s'")
    try:
        curtailment = curtailment_announce(
            site=site, shed_at=timezone.now() + timedelta(minutes=30), reason="ERCOT EEA 2"
        )
    finally:
        with connection.cursor() as cur:
            cur.execute("RESET deadlock_timeout")
    thread.join(20)

    assert announce_waited == [True]
    assert failures == []  # the worker was not the victim and finished
    # The announce was rolled back and taken again (on a loaded machine its retry can meet the
    # worker's circle once more before the worker has its node: a victim again, taken again).
    assert len(attempts) >= 2
    assert Curtailment.objects.get() == curtailment
    assert curtailment.reservations_notified == 1


def test_a_void_notice_on_protected_work_is_lifted_not_taken_again_every_tick(market, org):
    """A protected reservation with a notice no curtailment forces (its victim row withdrawn,
    say) is not preempted; its notice is lifted, so it does not stand first in every tick's
    batch ahead of the interruptible work that is due."""
    from marketplace.models import Event, Reservation
    from marketplace.services.curtailment import reservations_preempt_due

    now = timezone.now()
    protected = _book(org, tier="on_demand", start=now, hours=6, active=True)
    due = _book(org, tier="interruptible", start=now, hours=6, active=True)
    Reservation.objects.filter(pk__in=[protected.pk, due.pk]).update(
        preempt_at=now - timedelta(minutes=1), preempt_reason="grid"
    )

    assert reservations_preempt_due(now=now, limit=1) == 0  # the protected one came first
    assert reservations_preempt_due(now=now, limit=1) == 1  # then the interruptible one
    protected.refresh_from_db()
    assert (protected.status, protected.preempt_at) == (ReservationStatus.ACTIVE, None)
    assert Event.objects.filter(
        object_id=protected.public_id, type="reservation.interruption_withdrawn"
    ).exists()
    assert Reservation.objects.get(pk=due.pk).status == ReservationStatus.PREEMPTED


def test_a_late_dispatcher_bills_nothing_after_the_notices_time(market, org, monkeypatch):
    """The notice says the work stops at its time and the time after it is not charged: when
    the dispatcher gets to it late (beat held up, a worker backlog), billing still ends there,
    not at the tick that carried it out."""
    from billing.models import LedgerEntry, LedgerKind
    from billing.money import to_minor_units
    from billing.services.usage import reservation_delivered_seconds, reservation_meter
    from marketplace.services.curtailment import reservations_preempt_due

    site, _ = market
    now = timezone.now()
    running = _book(org, tier="interruptible", start=now, hours=6, active=True)
    shed_at = running.activated_at + timedelta(hours=1)
    curtailment_announce(
        site=site, shed_at=shed_at, until=shed_at + timedelta(hours=1), reason="ERCOT EEA 1"
    )
    late = shed_at + timedelta(minutes=10)
    # The minute's metering ran meanwhile, while the work still looked live.
    reservation_meter(reservation_id=running.pk, now=late - timedelta(minutes=1))
    monkeypatch.setattr(timezone, "now", lambda: late)

    assert reservations_preempt_due() == 1
    reservation_meter(reservation_id=running.pk, now=late + timedelta(minutes=1))

    running = _fresh(running)
    assert (running.status, running.released_at) == (S.PREEMPTED, shed_at)
    assert reservation_delivered_seconds(reservation=running, until=late) == 3600
    charged = LedgerEntry.objects.filter(reservation=running, kind=LedgerKind.USAGE)
    assert sum(charged.values_list("gpu_seconds", flat=True)) == 2 * 3600
    assert -sum(charged.values_list("amount_minor", flat=True)) == to_minor_units(
        running.price_per_gpu_hour * 2, running.currency
    )
    preempted = Event.objects.get(object_id=running.public_id, type="reservation.preempted")
    assert preempted.data["released_at"] == shed_at.isoformat().replace("+00:00", "Z")


def test_work_started_after_the_notices_time_is_released_when_it_started(market, org):
    """Started late past its notice's time (the dispatcher's tick came after it): released
    where it activated, so nothing is billed, never a negative span."""
    from billing.services.usage import reservation_delivered_seconds
    from marketplace.models import Reservation
    from marketplace.services.curtailment import reservations_preempt_due

    now = timezone.now()
    running = _book(org, tier="interruptible", start=now, hours=6, active=True)
    Reservation.objects.filter(pk=running.pk).update(
        preempt_at=running.activated_at - timedelta(seconds=30), preempt_reason="grid"
    )

    assert reservations_preempt_due() == 1

    running = _fresh(running)
    assert (running.status, running.released_at) == (S.PREEMPTED, running.activated_at)
    assert reservation_delivered_seconds(reservation=running, until=timezone.now()) == 0


def test_extension_terms_warn_of_a_curtailment_during_the_extra_time(market, org):
    """Priced without a word, an extension into a curtailment's window was then refused when
    made (409 site_curtailed); its terms now say so first, in the API and the portal."""
    site, _ = market
    now = timezone.now()
    r = _book(org, tier="on_demand", start=now, hours=2, active=True)
    shed_at = r.ends_at + timedelta(hours=1)
    curtailment_announce(
        site=site, shed_at=shed_at, until=shed_at + timedelta(hours=2), reason="ERCOT peak"
    )
    client = key_client(org)
    url = f"/api/v1/reservations/{r.public_id}/extension-terms"

    clear = client.get(url, {"ends_at": (r.ends_at + timedelta(minutes=30)).isoformat()})
    into = client.get(url, {"ends_at": (shed_at + timedelta(hours=1)).isoformat()})

    assert clear.status_code == 200 and clear.json()["warnings"] == []
    assert into.status_code == 200, into.content
    (warning,) = into.json()["warnings"]
    assert warning.startswith(f"{site.name} is shedding load for its grid operator from ")
    assert "The extension is refused when it is made unless the site sheds more" in warning
    assert Reservation.objects.get(pk=r.pk).ends_at == r.ends_at  # terms change nothing
    # The portal's preview says the same before the button.
    page = member_client(org, Role.MEMBER).post(
        f"/reservations/{r.public_id}/extend",
        {"ends_at": (shed_at + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")},
    )
    html = unescape(page.content.decode())
    assert page.status_code == 200
    assert '<p class="alert" id="extension-warning" role="note">' in html
    assert f"{site.name} is shedding load for its grid operator" in html
