"""One writer of Reservation.status: the transition service, in its single and batched forms.

tests/status_writes.py checks every statement the suite runs; the tests here show that check
can fail, scan the source for writes the suite might not run, and hold the batched form (the
provisioning fast path's) to what reservation_transition does.
"""

import ast
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.utils import timezone

from config.errors import InvalidTransition
from marketplace.models import (
    Allocation,
    Event,
    Reservation,
    ReservationStatus,
    ReservationTransition,
)
from marketplace.provisioning.drivers import SimulatedDriver
from marketplace.provisioning.services import reservation_provision_step
from marketplace.services import transitions
from marketplace.services.transitions import (
    Piggyback,
    reservation_transition,
    reservation_transitions_write,
)
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create, statuses
from tests.status_writes import ROOT, STATUS_WRITE, WRITER, StatusWrittenOutsideTransitions

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus

APP_DIRS = ("billing", "config", "inventory", "marketplace", "scripts", "bench")


@pytest.fixture
def market():
    return market_create(nodes=2, gpus=4)


def _history(reservation) -> list[tuple[str, str, str, str]]:
    return list(
        ReservationTransition.objects.filter(reservation=reservation)
        .order_by("at", "id")
        .values_list("from_status", "to_status", "cause", "actor_label")
    )


# --- the check on every statement can fail ---------------------------------------------------


def _run_as_application_code(source: str, **names) -> None:
    """Run `source` as if it were a module of the marketplace app (its frames say so)."""
    code = compile(source, str(ROOT / "marketplace" / "rogue.py"), "exec")
    exec(code, {"Reservation": Reservation, "connection": connection, **names})


@pytest.mark.parametrize(
    "source",
    [
        "Reservation.objects.filter(pk=pk).update(status='failed')",
        "r = Reservation.objects.get(pk=pk)\nr.status = 'failed'\nr.save()",
        "r = Reservation.objects.get(pk=pk)\nr.status = 'failed'\nr.save(update_fields=['status'])",
        "with connection.cursor() as cur:\n"
        "    cur.execute('UPDATE marketplace_reservation SET status = %s WHERE id = %s',"
        " ['failed', pk])",
    ],
    ids=["queryset update", "full save", "save of the field", "raw SQL"],
)
def test_a_status_written_by_application_code_outside_the_transition_service_fails(market, source):
    r = market.book()

    with pytest.raises(StatusWrittenOutsideTransitions) as exc:
        with transaction.atomic():
            _run_as_application_code(source, pk=r.pk)

    assert "marketplace/rogue.py" in str(exc.value)
    r.refresh_from_db()
    assert r.status == S.SCHEDULED
    assert [h[1] for h in _history(r)] == [S.SCHEDULED]


def test_application_code_may_write_other_reservation_fields(market):
    r = market.book()
    _run_as_application_code(
        "Reservation.objects.filter(pk=pk).update(status_reason='noted')", pk=r.pk
    )
    r.refresh_from_db()
    assert (r.status, r.status_reason) == (S.SCHEDULED, "noted")


# --- the source, for paths no test runs ------------------------------------------------------


def _names_a_reservation(node: ast.AST) -> bool:
    """Whether the expression starts from the Reservation model or a name saying reservation
    (`Reservation.objects.filter(…)`, `reservation`, `self.reservation`, `locked_reservation`)."""
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        if isinstance(node, ast.Attribute) and "reservation" in node.attr.lower():
            return node.attr == "reservation" or node.attr.endswith("_reservation")
        node = node.func if isinstance(node, ast.Call) else node.value
    if not isinstance(node, ast.Name):
        return False
    return node.id == "Reservation" or node.id.lower().endswith("reservation")


def status_writes_in(source: str) -> list[int]:
    """Lines of `source` that write a reservation's status (SQL or the ORM), as far as the text
    shows: SQL that sets marketplace_reservation's status; `.status = …` on a name that says
    reservation; update(status=…), save/bulk_update naming "status" on a reservation."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if STATUS_WRITE.search(node.value):
                lines.append(node.lineno)
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr == "status"
                    and _names_a_reservation(target.value)
                ):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr not in {"update", "update_or_create", "bulk_update", "save"}:
                continue
            if not _names_a_reservation(node.func.value):
                continue
            keywords = {k.arg for k in node.keywords}
            named = "'status'" in ast.unparse(node) or '"status"' in ast.unparse(node)
            if "status" in keywords or named:
                lines.append(node.lineno)
    return sorted(lines)


def test_the_scan_finds_each_kind_of_status_write():
    rogue = (
        "Reservation.objects.filter(pk=1).update(status='failed')\n"
        "reservation.status = 'failed'\n"
        "locked_reservation.save(update_fields=['status'])\n"
        "Reservation.objects.bulk_update(rows, ['status'])\n"
        "SQL = 'UPDATE marketplace_reservation SET connection = %s, status = %s WHERE id = 1'\n"
        # Not writes of a reservation's status:
        "node.status = 'maintenance'\n"
        "AgentJob.objects.filter(reservation_id=1).update(status='cancelled')\n"
        "Reservation.objects.filter(pk=1).update(status_reason='x')\n"
        "ReservationTransition.objects.create(to_status='failed')\n"
        "Q = 'UPDATE marketplace_reservation SET status_reason = %s WHERE status = %s'\n"
    )
    assert status_writes_in(rogue) == [1, 2, 3, 4, 5]


def test_no_module_but_the_transition_service_writes_a_reservations_status():
    found = {}
    for directory in APP_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            if "migrations" in path.parts or str(path) == WRITER:
                continue
            lines = status_writes_in(path.read_text(encoding="utf-8"))
            if lines:
                found[str(path.relative_to(ROOT))] = lines
    assert found == {}
    assert status_writes_in(Path(WRITER).read_text(encoding="utf-8")) != []


# --- the batched form ------------------------------------------------------------------------


def _locked(reservation) -> Reservation:
    return (
        Reservation.objects.select_for_update(of=("self",))
        .select_related("gpu_model", "site", "quote")
        .get(pk=reservation.pk)
    )


def _events(reservation) -> list[tuple[str, str, str, str | None]]:
    return [
        (e.type, e.data["status"], e.data["status_reason"], e.data["activated_at"])
        for e in Event.objects.filter(object_id=reservation.public_id).order_by("id")
    ]


def test_the_batched_form_takes_several_moves_in_one_statement_recorded_in_order(
    market, django_assert_num_queries
):
    r = market.book()
    now = timezone.now()
    with transaction.atomic():
        locked = _locked(r)
        # The statement, and the read of the organisation's webhook endpoints for its events.
        with django_assert_num_queries(2):
            written, extra = reservation_transitions_write(
                reservation=locked,
                moves=[(S.PROVISIONING, "starting"), (S.ACTIVE, "running")],
                actor_label="worker",
                now=now,
                fields={"connection": {"host": "h"}},
                piggyback=Piggyback(select="%(answer)s::int", params={"answer": 42}),
            )

    assert (written, extra) == (True, (42,))
    assert (locked.status, locked.status_reason, locked.activated_at) == (S.ACTIVE, "running", now)
    r.refresh_from_db()
    assert (r.status, r.status_reason, r.activated_at, r.updated_at) == (
        S.ACTIVE,
        "running",
        now,
        now,
    )
    assert r.connection == {"host": "h"} and r.released_at is None
    assert _history(r) == [
        ("", S.SCHEDULED, "created", "api"),
        (S.SCHEDULED, S.PROVISIONING, "starting", "worker"),
        (S.PROVISIONING, S.ACTIVE, "running", "worker"),
    ]
    # Each move's event shows the reservation as it was after that move.
    activated = now.isoformat().replace("+00:00", "Z")
    assert _events(r)[-2:] == [
        ("reservation.provisioning", S.PROVISIONING, "starting", None),
        ("reservation.active", S.ACTIVE, "running", activated),
    ]


def test_the_batched_form_refuses_a_sequence_with_a_disallowed_move_and_writes_nothing(market):
    r = market.book()
    with pytest.raises(InvalidTransition) as exc:
        with transaction.atomic():
            reservation_transitions_write(
                reservation=_locked(r),
                moves=[(S.PROVISIONING, "starting"), (S.COMPLETED, "skipping ahead")],
                actor_label="worker",
            )

    assert exc.value.message == "A reservation cannot go from provisioning to completed."
    assert not Event.objects.filter(type="reservation.provisioning").exists()
    r.refresh_from_db()
    assert (r.status, r.activated_at) == (S.SCHEDULED, None)
    assert len(_history(r)) == 1


def test_the_batched_form_leaves_a_reservation_moved_meanwhile_alone_but_runs_the_piggyback(
    market,
):
    r = market.book()
    stale = Reservation.objects.get(pk=r.pk)  # read without the lock, still scheduled
    reservation_transition(reservation=r, to_status=S.CANCELLED, cause="customer", actor_label="u")

    written, extra = reservation_transitions_write(
        reservation=stale,
        moves=[(S.PROVISIONING, "starting")],
        actor_label="worker",
        piggyback=Piggyback(select="(SELECT count(*) FROM moved) = 0"),
    )

    assert (written, extra) == (False, (True,))
    assert stale.status == S.SCHEDULED  # not updated in memory either
    assert [e[0] for e in _events(r)] == ["reservation.created", "reservation.cancelled"]
    r.refresh_from_db()
    assert (r.status, r.status_reason) == (S.CANCELLED, "customer")
    assert [h[1] for h in _history(r)] == [S.SCHEDULED, S.CANCELLED]


def test_the_batched_form_frees_the_gpus_as_the_single_form_does(market):
    # Two active reservations ending early; one through each form.
    ended = []
    for form in ("single", "batched"):
        r = market.book(gpu_count=2, seconds=4 * 3600)
        r = reservation_transition(
            reservation=r, to_status=S.PROVISIONING, cause="s", actor_label="w"
        )
        r = reservation_transition(reservation=r, to_status=S.ACTIVE, cause="a", actor_label="w")
        now = timezone.now()
        if form == "single":
            r = reservation_transition(
                reservation=r, to_status=S.FAILED, cause="f", actor_label="w"
            )
        else:
            with transaction.atomic():
                locked = _locked(r)
                reservation_transitions_write(
                    reservation=locked, moves=[(S.FAILED, "f")], actor_label="w", now=now
                )
        r.refresh_from_db()
        ended.append(r)

    for r in ended:
        assert r.status == S.FAILED and r.starts_at < r.released_at < r.ends_at
        periods = set(Allocation.objects.filter(reservation=r).values_list("period", "is_live"))
        assert {(p.lower, p.upper, live) for p, live in periods} == {
            (r.starts_at, r.released_at, False)
        }


def test_every_move_of_the_provision_step_goes_through_the_transition_service(market, monkeypatch):
    # The transition service checks each move it writes against the state machine; whatever
    # it does per move (events, audit) it does for exactly these.
    checked = []
    check = transitions.reservation_transition_check

    def spy(*, from_status, to_status, tier, force_preemption=False):
        checked.append((from_status, to_status))
        return check(
            from_status=from_status,
            to_status=to_status,
            tier=tier,
            force_preemption=force_preemption,
        )

    monkeypatch.setattr(transitions, "reservation_transition_check", spy)
    r = market.book(starts_at=timezone.now() + timedelta(hours=1))
    Reservation.objects.filter(pk=r.pk).update(starts_at=timezone.now() - timedelta(seconds=1))

    result = reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())

    assert result.outcome == "active"
    assert statuses(r) == [S.PENDING, S.SCHEDULED, S.PROVISIONING, S.ACTIVE]
    assert checked == [
        (S.PENDING, S.SCHEDULED),
        (S.SCHEDULED, S.PROVISIONING),
        (S.PROVISIONING, S.ACTIVE),
    ]
    # ... and records the events of each move as the single form does.
    assert [(e[0], e[1]) for e in _events(r)] == [
        ("reservation.created", S.PENDING),
        ("reservation.scheduled", S.SCHEDULED),
        ("reservation.provisioning", S.PROVISIONING),
        ("reservation.active", S.ACTIVE),
    ]
    active = Event.objects.get(object_id=r.public_id, type="reservation.active").data
    r.refresh_from_db()
    assert (active["site"], active["gpu_model"], active["quote"]) == (
        r.site.slug,
        r.gpu_model.slug,
        None,
    )
    assert active["activated_at"] == r.activated_at.isoformat().replace("+00:00", "Z")
