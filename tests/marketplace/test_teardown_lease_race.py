"""Agents of one node leasing at once while jobs of an ended reservation lie in the queue
(threads, each on its own connection to real PostgreSQL): none of the dead jobs is handed out,
each live job goes to one agent only, and the dead ones end cancelled."""

import threading

import pytest
from django.db import connection

from marketplace.models import AgentJob, AgentJobStatus, ReservationStatus
from marketplace.provisioning.agent_jobs import agent_job_lease
from marketplace.provisioning.drivers import NodeTarget, SiteAgentDriver, Target
from marketplace.services.reservations import reservation_cancel
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("allow_all_funding")]


def _queue_prepare_and_start(market, index: int):
    node = market.nodes[0]
    r = market.book()
    target = Target(r.pk, r.public_id, r.workload, (NodeTarget(node.pk, node.hostname, (index,)),))
    SiteAgentDriver().prepare(target)
    SiteAgentDriver().start_workload(target)
    return r


def test_agents_leasing_at_once_never_get_a_dead_job_and_never_the_same_job():
    market = market_create(nodes=1, gpus=4)
    node = market.nodes[0]
    dead = [_queue_prepare_and_start(market, i) for i in range(2)]
    for r in dead:
        reservation_cancel(reservation=r, actor_label="user:test")
    live = [_queue_prepare_and_start(market, i) for i in range(2, 4)]
    agents = 4
    start, leased, errors = threading.Barrier(agents), [], []

    def agent():
        try:
            start.wait(10)
            while (job := agent_job_lease(node=node)) is not None:
                leased.append(job.pk)
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=agent) for _ in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert errors == []
    live_prepares = AgentJob.objects.filter(reservation__in=live, kind="prepare")
    # Each live prepare once (their starts wait for them); nothing of the dead reservations.
    assert sorted(leased) == sorted(live_prepares.values_list("pk", flat=True))
    assert set(AgentJob.objects.filter(reservation__in=dead).values_list("status", flat=True)) == {
        AgentJobStatus.CANCELLED
    }
    assert {r.status for r in type(dead[0]).objects.filter(pk__in=[r.pk for r in dead])} == {
        ReservationStatus.CANCELLED
    }
