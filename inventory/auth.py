"""Authentication for site agents: `Authorization: Bearer nt_…` carrying a per-node token.

Tokens are read from the header only, never from the query string (URLs end up in logs). A
refused token counts against its client's failed authentications (AUTH_FAILURE_RATE); a
client over them is answered 429 before its token is looked up, unless the token is one this
process accepted lately (config.api.throttling.AuthFailureLimit): one agent with a revoked
token must not silence the other agents of its site, which share its address.
"""

from dataclasses import dataclass

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request
from rest_framework.views import APIView

from config.api.throttling import AgentRateThrottle, auth_failures
from inventory.models import Node, NodeToken
from inventory.services import TOKEN_PREFIX, node_token_authenticate


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


class AgentApiView(APIView):
    """A site-agent endpoint: a node token, acting for its node only, within the node's rate
    limit (AGENT_THROTTLE_RATE; past it 429 with Retry-After, which the agent obeys)."""

    authentication_classes = [NodeTokenAuthentication]
    permission_classes = [IsNodeAgent]
    throttle_classes = [AgentRateThrottle]

    def throttled(self, request: Request, wait: float | None) -> None:
        raise exceptions.Throttled(wait=wait, detail=AGENT_THROTTLED, code="rate_limited")


class NodeTokenScheme(OpenApiAuthenticationExtension):
    """Describes the node token in the OpenAPI schema."""

    target_class = NodeTokenAuthentication
    name = "nodeToken"

    def get_security_definition(self, auto_schema) -> dict:
        return {"type": "http", "scheme": "bearer", "description": "A node token, nt_…"}
