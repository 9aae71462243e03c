"""Authentication for site agents: `Authorization: Bearer nt_…` carrying a per-node token.

Tokens are read from the header only, never from the query string (URLs end up in logs). A
refused token counts against its client's failed authentications (AUTH_FAILURE_RATE); a
client over them is answered 429 before its token is looked up, unless the token is one this
process accepted lately (config.api.throttling.AuthFailureLimit): one agent with a revoked
token must not silence the other agents of its site, which share its address.
"""

import logging
import re
from dataclasses import dataclass

import redis
from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request
from rest_framework.views import APIView

from config.api.throttling import AgentRateThrottle, auth_failures
from config.errors import Conflict, ValidationFailed
from inventory.models import Node, NodeToken
from inventory.services import TOKEN_PREFIX, node_token_authenticate
from inventory.telemetry import buffer_client

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeAgent:
    """The request's user when a node agent calls: it acts for one node and nothing else."""

    node: Node
    token: NodeToken
    is_authenticated: bool = True
    is_anonymous: bool = False
    is_staff: bool = False

    def __str__(self) -> str:
        return f"node agent {self.node.hostname} ({self.token.prefix})"


class NodeTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme != self.keyword or not secret.startswith(TOKEN_PREFIX):
            return None  # not ours: another authentication class may know it
        auth_failures.check(request, secret)
        token = node_token_authenticate(secret)
        if token is None:
            auth_failures.failed(request)
            raise exceptions.AuthenticationFailed("Invalid or revoked node token.")
        auth_failures.vouch(secret)
        return NodeAgent(node=token.node, token=token), token

    def authenticate_header(self, request) -> str:
        # Makes DRF answer 401 (not 403) when the token is missing or wrong.
        return f'{self.keyword} realm="switchyard-agent"'


class IsNodeAgent(permissions.BasePermission):
    def has_permission(self, request, view) -> bool:
        return isinstance(request.auth, NodeToken)


AGENT_THROTTLED = (
    "This node's agent is over its rate limit; slow down and retry after the time in Retry-After."
)


# One agent per node token. An agent sends its id (kept in its state directory, so a restart
# keeps it) in this header; while one agent is heard, another id with the same token (a token
# copied to a second machine, a cloned node) is refused, 409 agent_conflict: its report would
# list none of the node's containers (Switchyard would restart or end their workloads) and it
# would run the node's jobs on the wrong machine. The id is held for AGENT_INSTANCE_HOLD
# (NODE_OFFLINE_AFTER / 2, longer than the agents' heartbeat interval) after its agent's last
# request: an agent with a new id (a rebuilt node) takes over once the old one is that silent.
# Requests without the header (an older agent) are not checked; with Redis unreachable nothing
# is (as the rate limit: agents must get through).
AGENT_INSTANCE_HEADER = "HTTP_X_SWITCHYARD_AGENT"
_AGENT_INSTANCE = re.compile(r"[A-Za-z0-9_-]{8,64}")
AGENT_INSTANCE_KEY = "switchyard:agent_instance:{node_id}"
# The id held for the node now and the seconds left of its hold, or nil once this one holds it.
_CLAIM_SCRIPT = """
local held = redis.call('GET', KEYS[1])
if (not held) or held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return nil
end
return {held, redis.call('TTL', KEYS[1])}
"""
_claim_script = None


def agent_instance_hold_seconds() -> int:
    return max(1, int(settings.NODE_OFFLINE_AFTER.total_seconds() // 2))


def agent_instance_claim(*, node: Node, meta: dict) -> None:
    """Hold the node for the calling agent's id (its X-Switchyard-Agent header), or raise
    Conflict agent_conflict while another id holds it (see AGENT_INSTANCE_HEADER above)."""
    global _claim_script
    instance = meta.get(AGENT_INSTANCE_HEADER)
    if instance is None:
        return
    if not _AGENT_INSTANCE.fullmatch(instance):
        raise ValidationFailed(
            "X-Switchyard-Agent must be the agent's id: 8-64 letters, digits, - or _.",
            code="invalid_agent_instance",
        )
    hold = agent_instance_hold_seconds()
    try:
        if _claim_script is None:
            _claim_script = buffer_client().register_script(_CLAIM_SCRIPT)
        held = _claim_script(
            keys=[AGENT_INSTANCE_KEY.format(node_id=node.pk)], args=[instance, hold]
        )
    except (redis.RedisError, OSError) as exc:
        logger.warning("agent ids not checked (Redis: %s)", exc)
        return
    if held is None:
        return
    other, left = held[0].decode(errors="replace"), max(int(held[1]), 0)
    logger.warning(
        "node %s: an agent with id %s… was refused, another (%s…) uses the node's token",
        node.hostname, instance[:8], other[:8],
    )  # fmt: skip
    raise Conflict(
        f"Another site agent (id {other[:8]}…) is using node {node.hostname}'s token and was "
        f"heard within the last {hold - left} s: one agent per node. This one is refused until "
        f"that one has been silent for {hold} s (in {left} s at the earliest). Stop the agent "
        "that should not run, or issue this node its own token.",
        code="agent_conflict",
    )


class AgentApiView(APIView):
    """A site-agent endpoint: a node token, acting for its node only, within the node's rate
    limit (AGENT_THROTTLE_RATE; past it 429 with Retry-After, which the agent obeys), and for
    one agent at a time (agent_instance_claim)."""

    authentication_classes = [NodeTokenAuthentication]
    permission_classes = [IsNodeAgent]
    throttle_classes = [AgentRateThrottle]

    def initial(self, request: Request, *args, **kwargs) -> None:
        super().initial(request, *args, **kwargs)
        agent_instance_claim(node=request.user.node, meta=request.META)

    def throttled(self, request: Request, wait: float | None) -> None:
        raise exceptions.Throttled(wait=wait, detail=AGENT_THROTTLED, code="rate_limited")


class NodeTokenScheme(OpenApiAuthenticationExtension):
    """Describes the node token in the OpenAPI schema."""

    target_class = NodeTokenAuthentication
    name = "nodeToken"

    def get_security_definition(self, auto_schema) -> dict:
        return {"type": "http", "scheme": "bearer", "description": "A node token, nt_…"}
