"""Development wrapper around the standalone site agent (agent/switchyard_agent.py).

    python manage.py site_agent --api http://127.0.0.1:8000 --token nt_… [agent flags…]

Sites run the agent itself (`switchyard-agent`, see agent/README.md), which reads the node
token only from a file that nobody else can read. This wrapper takes every flag of the agent
and also the token on the command line or from SWITCHYARD_NODE_TOKEN, for local runs and tests.
"""

import os
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

sys.path.insert(0, str(settings.BASE_DIR / "agent"))

import switchyard_agent  # noqa: E402


class Command(BaseCommand):
    help = "Run the standalone site agent with a token given here (development only)."

    def add_arguments(self, parser):
        parser.add_argument("--token", default=os.environ.get("SWITCHYARD_NODE_TOKEN"))
        switchyard_agent.arguments_add(parser)

    def handle(self, *args, token=None, **options):
        if not token or not token.startswith("nt_"):
            raise CommandError("--token (or SWITCHYARD_NODE_TOKEN) must be a node token, nt_…")
        agent_flags = {a.dest for a in switchyard_agent.arguments_add(_Collector())._actions}
        flags = {k: v for k, v in options.items() if k in agent_flags}
        code = switchyard_agent.main(flags=flags, token=token)
        if code:
            raise CommandError(f"the agent stopped with exit code {code}")


class _Collector:
    """Collects the agent's flag names (argparse's add_argument, recorded)."""

    def __init__(self):
        self._actions = []

    def add_argument(self, *names, **kwargs):
        dest = kwargs.get("dest") or names[0].lstrip("-").replace("-", "_")
        self._actions.append(type("Action", (), {"dest": dest})())
