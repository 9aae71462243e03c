"""`manage.py site_agent --site` (RUN_AGENTS=1 make run): the agents of every in-service node
of a site, each with a fresh token; and what make run says it provisions with."""

import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from inventory.models import NodeStatus, NodeToken
from marketplace.management.commands.site_agent import DEMO_TOKEN_LABEL
from tests.provisioning_support import market_create

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import run  # noqa: E402
from podman_image import ImageError  # noqa: E402


@pytest.mark.django_db(transaction=True)
def test_site_plays_each_in_service_node_with_a_fresh_token(live_server, settings):
    settings.DEBUG = True  # --site plays a whole site's agents for `make run` (DEBUG) only
    market = market_create(nodes=3, gpus=2)
    first, second, down = market.nodes
    type(down).objects.filter(pk=down.pk).update(status=NodeStatus.MAINTENANCE)
    flags = {"api": live_server.url, "executor": "dry-run", "once": True, "host": "h"}

    call_command("site_agent", site=market.site.slug, **flags)
    call_command("site_agent", site=market.site.slug, **flags)

    for node in (first, second):
        node.refresh_from_db()
        assert node.last_heartbeat_at is not None
        tokens = NodeToken.objects.filter(node=node, label=DEMO_TOKEN_LABEL)
        assert (tokens.count(), tokens.filter(revoked_at__isnull=True).count()) == (2, 1)
    down.refresh_from_db()
    assert down.last_heartbeat_at is None
    assert not NodeToken.objects.filter(node=down).exists()


@pytest.mark.django_db
def test_site_is_for_development_only(settings):
    settings.DEBUG = False
    market = market_create(nodes=1, gpus=2)
    with pytest.raises(CommandError, match="development only"):
        call_command("site_agent", site=market.site.slug, api="http://x", executor="dry-run")
    assert not NodeToken.objects.exists()


def test_make_run_simulates_when_told_to(monkeypatch):
    monkeypatch.setenv("RUN_AGENTS", "0")
    monkeypatch.setattr(run, "workload_image_build", _not_called)
    assert run.provisioning_plan() == (
        {},
        "simulated: no workload runs (RUN_AGENTS=0; unset, podman runs them)",
    )


def _not_called():
    raise AssertionError("podman was asked for")


@pytest.mark.parametrize(
    ("asked", "said"),
    [
        ("", "simulated: no workload runs, as podman does not work here"),
        ("1", "simulated: RUN_AGENTS=1 asked for real containers, but podman does not work here"),
    ],
)
def test_make_run_simulates_where_podman_does_not_work_saying_why(monkeypatch, asked, said):
    def broken():
        raise ImageError("podman does not work here")

    monkeypatch.setenv("RUN_AGENTS", asked)
    monkeypatch.setattr(run, "workload_image_build", broken)
    assert run.provisioning_plan() == ({}, said)


@pytest.mark.container
@pytest.mark.parametrize("asked", ["", "1"])  # by default wherever podman works
def test_make_run_with_agents_uses_the_site_agent_driver_and_the_local_image(monkeypatch, asked):
    monkeypatch.setenv("RUN_AGENTS", asked)
    env, said = run.provisioning_plan()
    image = env["PROVISIONING_DEFAULT_IMAGE"]
    assert image.startswith("localhost/switchyard-workload:")
    assert env["PROVISIONING_DRIVER"] == "site_agent"
    assert env["CONTAINERS_CONF"].endswith("scripts/podman/containers.conf")
    assert said == f"site agents, real containers with podman ({image})"
