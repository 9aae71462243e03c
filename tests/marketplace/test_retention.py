"""Retention jobs delete exactly what is past its window, in batches, idempotently; live work
and money are never touched (docs/retention.md)."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from psycopg.types.range import Range

from billing.models import LedgerEntry, LedgerKind
from config.celery import app as celery_app
from config.retention import delete_in_batches
from inventory.models import Gpu
from marketplace.models import (
    AgentJob,
    Allocation,
    Event,
    ProvisioningAttempt,
    ProvisioningDispatch,
    Reservation,
    ReservationStatus,
    ReservationTransition,
    UserSession,
)
from marketplace.services.events import events_prune
from marketplace.services.retention import history_prune
from marketplace.sessions import SessionStore
from marketplace.tasks import sessions_clear_expired
from tests.factories import NodeFactory, OrganizationFactory
from tests.marketplace.market_helpers import make_reservation_rows

pytestmark = pytest.mark.django_db
S = ReservationStatus


@pytest.fixture
def org():
    return OrganizationFactory()


@pytest.fixture
def node():
    return NodeFactory(gpus=2)


def reservation(org, node, *, status: str, ended_days_ago: float) -> Reservation:
    """A reservation that ended (and was last touched) `ended_days_ago`, with the history a
    run leaves: two attempts, a start job, a dispatch marker, an allocation, two transitions."""
    now = timezone.now()
    ended = now - timedelta(days=ended_days_ago)
    (r,) = make_reservation_rows(
        org, 1, site=node.site, gpu_model=node.gpu_model, status=status,
        starts_at=ended - timedelta(hours=2), ends_at=ended,
    )  # fmt: skip
    gpu = Gpu.objects.filter(node=node).first()
    started = ended - timedelta(hours=2)
    Allocation.objects.create(
        reservation=r, gpu=gpu, node=node, period=Range(started, ended, "[)"), is_live=False
    )
    for number in (1, 2):
        ProvisioningAttempt.objects.create(
            reservation=r, kind="provision", number=number, started_at=started
        )
    AgentJob.objects.create(node=node, reservation=r, kind="start", status="done")
    ProvisioningDispatch.objects.create(reservation=r, kind="provision", enqueued_at=started)
    for to in (S.SCHEDULED, status):
        ReservationTransition.objects.create(
            reservation=r, from_status="pending", to_status=to, cause="test", actor_label="t"
        )
    AgentJob.objects.filter(reservation=r).update(created_at=started)
    ReservationTransition.objects.filter(reservation=r).update(at=ended)
    Reservation.objects.filter(pk=r.pk).update(updated_at=ended)
    return r


def history(r: Reservation) -> dict[str, int]:
    return {
        "attempts": ProvisioningAttempt.objects.filter(reservation=r).count(),
        "jobs": AgentJob.objects.filter(reservation=r).count(),
        "markers": ProvisioningDispatch.objects.filter(reservation=r).count(),
        "allocations": Allocation.objects.filter(reservation=r).count(),
        "transitions": ReservationTransition.objects.filter(reservation=r).count(),
    }


FULL = {"attempts": 2, "jobs": 1, "markers": 1, "allocations": 1, "transitions": 2}


def test_history_goes_exactly_past_each_window_and_never_for_live_work(org, node, settings):
    settings.PROVISIONING_HISTORY_RETENTION_DAYS = 90
    settings.RESERVATION_HISTORY_RETENTION_DAYS = 400
    recent = reservation(org, node, status=S.COMPLETED, ended_days_ago=89)
    finished = reservation(org, node, status=S.COMPLETED, ended_days_ago=91)
    failed = reservation(org, node, status=S.FAILED, ended_days_ago=91)
    ancient = reservation(org, node, status=S.CANCELLED, ended_days_ago=401)
    # A reservation still active whose period is long past (stuck work): never touched.
    live = reservation(org, node, status=S.ACTIVE, ended_days_ago=500)

    pruned = history_prune()

    assert pruned.as_dict() == {
        "provisioning_attempts": 6,
        "agent_jobs": 3,
        "dispatch_markers": 3,
        "allocations": 1,
        "transitions": 2,
        "quotes": 0,
        "pending_signups": 0,
        "demand_response_signatures": 0,
        "sent_mail": 0,
        "failed_mail": 0,
    }
    assert history(recent) == FULL
    assert history(live) == FULL
    work_gone = {**FULL, "attempts": 0, "jobs": 0, "markers": 0}
    assert history(finished) == work_gone
    assert history(failed) == work_gone
    assert history(ancient) == {k: 0 for k in FULL}
    assert Reservation.objects.filter(pk=ancient.pk).exists()  # the row itself stays
    assert history_prune().as_dict() == dict.fromkeys(pruned.as_dict(), 0)  # idempotent


def test_a_reservation_touched_recently_keeps_its_history(org, node):
    r = reservation(org, node, status=S.COMPLETED, ended_days_ago=500)
    Reservation.objects.filter(pk=r.pk).update(updated_at=timezone.now() - timedelta(days=10))

    history_prune()

    assert history(r) == FULL


def test_quotes_never_booked_go_a_day_after_they_expired(org, node):
    from marketplace.models import Quote

    now = timezone.now()

    def quote(expired_ago: timedelta) -> Quote:
        return Quote.objects.create(
            organization=org, gpu_model=node.gpu_model, site=node.site, gpu_count=1,
            tier="on_demand", starts_at=now, ends_at=now + timedelta(hours=1), currency="usd",
            price_per_gpu_hour="2.0000", total_amount="2.00", breakdown={},
            expires_at=now - expired_ago,
        )  # fmt: skip

    stale = quote(timedelta(days=1, seconds=1))
    fresh = quote(timedelta(hours=23))
    booked = quote(timedelta(days=3))
    r = reservation(org, node, status=S.COMPLETED, ended_days_ago=1)
    Reservation.objects.filter(pk=r.pk).update(quote=booked)

    assert history_prune(now=now).quotes == 1

    assert set(Quote.objects.values_list("pk", flat=True)) == {fresh.pk, booked.pk}
    assert not Quote.objects.filter(pk=stale.pk).exists()
    assert history_prune(now=now).quotes == 0


def test_a_grid_operators_stale_signatures_go_whichever_source_sent_them(settings):
    from marketplace.models import DemandResponseNonce, DemandResponseSource

    now = timezone.now()
    stale_at = now - 2 * settings.DEMAND_RESPONSE_SIGNATURE_TOLERANCE - timedelta(seconds=1)
    quiet = DemandResponseSource.objects.create(name="stopped-calling", secret="s1")
    busy = DemandResponseSource.objects.create(name="still-calling", secret="s2")
    for n, (source, seen_at) in enumerate(
        [(quiet, stale_at), (busy, stale_at), (busy, now - timedelta(seconds=30))]
    ):
        DemandResponseNonce.objects.create(source=source, signature=f"{n:064d}", seen_at=seen_at)

    assert history_prune(now=now).demand_response_signatures == 2

    # The recent one still refuses its replay.
    assert list(DemandResponseNonce.objects.values_list("signature", flat=True)) == [f"{2:064d}"]
    assert history_prune(now=now).demand_response_signatures == 0


def test_pending_sign_ups_go_a_day_after_their_link_expired_used_or_not():
    from marketplace.models import PendingSignup

    now = timezone.now()

    def pending(n: int, expired_ago: timedelta, used: bool = False) -> PendingSignup:
        return PendingSignup.objects.create(
            email=f"u{n}@example.com", username=f"u{n}", organization_name="Lab",
            password="md5$x$y", token_hash=f"{n:064d}", expires_at=now - expired_ago,
            used_at=now - timedelta(days=2) if used else None,
        )  # fmt: skip

    stale = pending(1, timedelta(days=1, seconds=1))
    stale_used = pending(2, timedelta(days=1, seconds=1), used=True)
    recent = pending(3, timedelta(hours=23))
    recent_used = pending(4, timedelta(hours=23), used=True)
    open_one = pending(5, -timedelta(hours=5))

    assert history_prune(now=now).pending_signups == 2

    assert set(PendingSignup.objects.values_list("pk", flat=True)) == {
        recent.pk,
        recent_used.pk,
        open_one.pk,
    }
    assert not PendingSignup.objects.filter(pk__in=[stale.pk, stale_used.pk]).exists()
    assert history_prune(now=now).pending_signups == 0


def test_sent_mail_goes_after_its_retention_and_mail_not_sent_stays(settings):
    from marketplace.models import MailMessage, MailStatus

    settings.MAIL_RETENTION_DAYS = 14
    now = timezone.now()

    def message(status: str, sent_days_ago: float | None, created_days_ago: float = 30):
        sent_at = None if sent_days_ago is None else now - timedelta(days=sent_days_ago)
        row = MailMessage.objects.create(
            task="marketplace.mail.mail_send", args=["S", "B", ["a@example.com"], None],
            status=status, next_attempt_at=now, sent_at=sent_at,
        )  # fmt: skip
        MailMessage.objects.filter(pk=row.pk).update(
            created_at=now - timedelta(days=created_days_ago)
        )
        return row

    old_sent = message(MailStatus.SENT, 14 + 1 / 86400)  # a second past the window
    kept_sent = message(MailStatus.SENT, 14 - 1 / 86400)
    failed = message(MailStatus.FAILED, None, created_days_ago=400)
    pending = message(MailStatus.PENDING, None, created_days_ago=400)

    assert history_prune(now=now).sent_mail == 1
    assert set(MailMessage.objects.values_list("pk", flat=True)) == {
        kept_sent.pk, failed.pk, pending.pk,
    }  # fmt: skip
    assert not MailMessage.objects.filter(pk=old_sent.pk).exists()
    assert history_prune(now=now).sent_mail == 0


def test_failed_mail_goes_a_while_after_its_last_attempt_and_stays_until_then(settings):
    """Staff may send a failed message again for MAIL_FAILED_RETENTION_DAYS after its last
    attempt; then it goes (it was kept for ever, the outbox growing with every failure)."""
    from marketplace.models import MailMessage, MailStatus

    settings.MAIL_FAILED_RETENTION_DAYS = 90
    now = timezone.now()

    def failed(last_attempt_days_ago: float) -> MailMessage:
        return MailMessage.objects.create(
            task="marketplace.mail.mail_send", args=["S", "B", ["a@example.com"], None],
            status=MailStatus.FAILED, attempts=9,
            next_attempt_at=now - timedelta(days=last_attempt_days_ago),
        )  # fmt: skip

    old = failed(90 + 1 / 86400)
    recent = failed(90 - 1 / 86400)

    pruned = history_prune(now=now)

    assert (pruned.failed_mail, pruned.sent_mail) == (1, 0)
    assert list(MailMessage.objects.values_list("pk", flat=True)) == [recent.pk]
    assert not MailMessage.objects.filter(pk=old.pk).exists()


def test_deletes_go_in_batches_each_its_own_statement(org, node):
    rows = [reservation(org, node, status=S.COMPLETED, ended_days_ago=100) for _ in range(5)]
    attempts = ProvisioningAttempt.objects.filter(reservation__in=rows)

    with CaptureQueriesContext(connection) as queries:
        assert delete_in_batches(attempts, batch_size=3) == 10

    deletes = [q["sql"] for q in queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 4  # 3 + 3 + 3 + 1
    assert delete_in_batches(attempts, batch_size=3) == 0


def test_events_go_with_their_deliveries_in_batches(org, settings):
    from marketplace.models import WebhookDelivery, WebhookEndpoint

    settings.EVENT_RETENTION_DAYS = 30
    settings.RETENTION_BATCH_SIZE = 2
    now = timezone.now()
    endpoint = WebhookEndpoint.objects.create(
        organization=org, url="https://hooks.example.com/x", secret="whsec_x"
    )
    events = [
        Event.objects.create(organization=org, type="reservation.active", object_type="r",
                             object_id=f"r{i}", data={})
        for i in range(5)
    ]  # fmt: skip
    for i, event in enumerate(events):
        age = timedelta(days=30, seconds=1) if i < 3 else timedelta(days=29, hours=23)
        Event.objects.filter(pk=event.pk).update(created_at=now - age)
        WebhookDelivery.objects.create(
            endpoint=endpoint, event=event, event_created_at=now - age, retry_from=now - age
        )

    assert events_prune(now=now) == 3

    assert sorted(Event.objects.values_list("object_id", flat=True)) == ["r3", "r4"]
    assert WebhookDelivery.objects.count() == 2
    assert events_prune(now=now) == 0


def test_money_is_never_deleted(org, node):
    r = reservation(org, node, status=S.COMPLETED, ended_days_ago=800)
    LedgerEntry.objects.create(
        organization=org, kind=LedgerKind.USAGE, amount_minor=-1250, currency="usd",
        reservation=r, idempotency_key=f"usage-{r.pk}", description="usage",
    )  # fmt: skip
    ledger = list(LedgerEntry.objects.values_list("pk", "amount_minor"))

    history_prune()
    events_prune()

    assert list(LedgerEntry.objects.values_list("pk", "amount_minor")) == ledger
    assert Reservation.objects.filter(pk=r.pk).exists()


def test_beat_prunes_history_daily():
    from config.celery import app

    app.loader.import_default_modules()
    entry = app.conf.beat_schedule["marketplace-prune-history"]

    assert (entry["task"], entry["schedule"]) == ("marketplace.tasks.history_prune", 86400.0)
    assert app.tasks[entry["task"]]() == dict.fromkeys(
        [
            "provisioning_attempts",
            "agent_jobs",
            "dispatch_markers",
            "allocations",
            "transitions",
            "quotes",
            "pending_signups",
            "demand_response_signatures",
            "sent_mail",
            "failed_mail",
        ],
        0,
    )


def test_the_session_sweep_removes_expired_sessions_only():
    expired, live = SessionStore(), SessionStore()
    for store, expiry in ((expired, -60), (live, 3600)):
        store["who"] = "ada"
        store.set_expiry(expiry)
        store.create()

    sessions_clear_expired.apply().get()

    assert list(UserSession.objects.values_list("session_key", flat=True)) == [live.session_key]
    beat = {entry["task"]: entry["schedule"] for entry in celery_app.conf.beat_schedule.values()}
    assert beat["marketplace.tasks.sessions_clear_expired"] == 86400.0  # daily
