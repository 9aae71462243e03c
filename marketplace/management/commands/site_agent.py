"""Development wrapper around the standalone site agent (agent/switchyard_agent.py).

    python manage.py site_agent --api http://127.0.0.1:8000 --token nt_… [agent flags…]
    python manage.py site_agent --api http://127.0.0.1:8000 --site pecos-tx [agent flags…]

Sites run the agent itself (`switchyard-agent`, see agent/README.md), one per node, which
reads the node token only from a file that nobody else can read. This wrapper takes every flag
of the agent and also the token on the command line or from SWITCHYARD_NODE_TOKEN, for local
runs and tests. With --site (DEBUG only, for `RUN_AGENTS=1 make run`) it plays the agents of
every in-service node of a site on this machine: one thread per node, each with a fresh token
(the previous ones it issued are revoked) and its own state folder.
"""

import dataclasses
import os
import sys
import threading

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from inventory.models import Node, NodeStatus, NodeToken
from inventory.services import node_token_issue, node_token_revoke

sys.path.insert(0, str(settings.BASE_DIR / "agent"))

import switchyard_agent  # noqa: E402

DEMO_TOKEN_LABEL = "site_agent --site (development)"


class Command(BaseCommand):
    help = "Run the standalone site agent with a token given here (development only)."

    def add_arguments(self, parser):
        parser.add_argument("--token", default=os.environ.get("SWITCHYARD_NODE_TOKEN"))
        parser.add_argument(
            "--site", help="play every in-service node of this site (DEBUG only), one thread each"
        )
        switchyard_agent.arguments_add(parser)

    def handle(self, *args, token=None, site=None, **options):
        agent_flags = {a.dest for a in switchyard_agent.arguments_add(_Collector())._actions}
        flags = {k: v for k, v in options.items() if k in agent_flags}
        if site:
            return self._site(site, flags)
        if not token or not token.startswith("nt_"):
            raise CommandError("--token (or SWITCHYARD_NODE_TOKEN) must be a node token, nt_…")
        code = switchyard_agent.main(flags=flags, token=token)
        if code:
            raise CommandError(f"the agent stopped with exit code {code}")

    def _site(self, slug: str, flags: dict) -> None:
        if not settings.DEBUG:
            raise CommandError("--site issues node tokens on the fly: development only (DEBUG).")
        try:
            base = switchyard_agent.settings_load({k: v for k, v in flags.items() if k != "config"})
        except switchyard_agent.SettingsError as exc:
            raise CommandError(str(exc)) from None
        nodes = list(
            Node.objects.filter(
                site__slug=slug, status__in=[NodeStatus.AVAILABLE, NodeStatus.DRAINING]
            ).order_by("hostname")
        )
        if not nodes:
            raise CommandError(f"No in-service nodes at site {slug!r}.")
        agents = []
        for node in nodes:
            for old in NodeToken.objects.filter(
                node=node, label=DEMO_TOKEN_LABEL, revoked_at__isnull=True
            ):
                node_token_revoke(token=old)
            _token, secret = node_token_issue(node=node, label=DEMO_TOKEN_LABEL)
            node_settings = dataclasses.replace(
                base, state_dir=os.path.join(base.state_dir, node.hostname)
            )
            try:
                executor = switchyard_agent.executor_build(node_settings)
            except switchyard_agent.SettingsError as exc:
                raise CommandError(str(exc)) from None
            client = switchyard_agent.AgentClient(api=base.api, token=secret)
            agents.append(
                switchyard_agent.Agent(
                    client=client,
                    executor=executor,
                    lease_seconds=base.lease_seconds,
                    max_parallel_jobs=base.max_parallel_jobs,
                )
            )
        switchyard_agent.logging_setup()
        switchyard_agent.logger.info(
            "site %s: playing the agents of %d nodes (%s)", slug, len(nodes), base.executor
        )
        threads = [
            threading.Thread(
                target=agent.loop,
                kwargs={
                    "poll_seconds": base.poll_seconds,
                    "heartbeat_seconds": base.heartbeat_seconds,
                    "idle_poll_seconds": base.idle_poll_seconds,
                    "heartbeat_pinned": "heartbeat_seconds" in base.given,
                    "once": base.once,
                },
                name=node.hostname,
                daemon=True,
            )
            for agent, node in zip(agents, nodes, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


class _Collector:
    """Collects the agent's flag names (argparse's add_argument, recorded)."""

    def __init__(self):
        self._actions = []

    def add_argument(self, *names, **kwargs):
        dest = kwargs.get("dest") or names[0].lstrip("-").replace("-", "_")
        self._actions.append(type("Action", (), {"dest": dest})())
