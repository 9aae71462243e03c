"""Two API documents: the customers' (what the docs pages show) and the site agents'.

The node-agent endpoints and their nodeToken scheme are for Switchyard's own site agents: in
the customers' reference they came first (alphabetically "agent") and offered a node token in
Authorize. They get a schema of their own at /api/schema/agent/.
"""

from django.views.decorators.cache import never_cache
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import (
    SpectacularAPIView,
    SpectacularRedocView,
    SpectacularSwaggerSplitView,
)

__all__ = [
    "AGENT_PREFIX",
    "customer_endpoints",
    "agent_endpoints",
    "AgentSchemaView",
    "LocalRedocView",
    "LocalSwaggerView",
]

AGENT_PREFIX = "/api/v1/agent/"


def customer_endpoints(endpoints):
    """Preprocessing hook (SPECTACULAR_SETTINGS): every endpoint but the site agents'."""
    return [e for e in endpoints if not e[0].startswith(AGENT_PREFIX)]


def agent_endpoints(endpoints):
    return [e for e in endpoints if e[0].startswith(AGENT_PREFIX)]


class AgentSchemaView(SpectacularAPIView):
    custom_settings = {
        "TITLE": "Switchyard site agent API",
        "DESCRIPTION": "Heartbeats and provisioning jobs of a site's agent, authenticated with "
        "its node token (nt_…), and the grid price feed (a node token for its own site's zone, "
        "or an API key with the grid scope). Not for customers: see /api/schema/.",
        "PREPROCESSING_HOOKS": ["config.api_docs.agent_endpoints"],
    }


class _PageHeaders:
    """A docs page's own headers (its Content-Security-Policy first): the portal's policy is
    not applied under /api/, so each page states the one it runs under."""

    HEADERS: dict[str, str] = {}

    @extend_schema(exclude=True)
    def get(self, request, *args, **kwargs):
        response = super().get(request, *args, **kwargs)
        for name, value in self.HEADERS.items():
            response[name] = value
        return response


class LocalRedocView(_PageHeaders, SpectacularRedocView):
    """Redoc from our own static files (the sidecar), with nothing fetched from elsewhere.

    The template leaves out drf-spectacular's Google Fonts links; the policy below stops
    Redoc's "API docs by Redocly" logo (an image on cdn.redoc.ly, hidden when it cannot load)
    and any other outside fetch, so the page works offline and tells no one of a visit.
    """

    template_name = "api/redoc.html"
    HEADERS = {
        "Content-Security-Policy": (
            "default-src 'self'; img-src 'self' data:; font-src 'self' data:; "
            "style-src 'self' 'unsafe-inline'; script-src 'self'; worker-src 'self' blob:; "
            "connect-src 'self'"
        )
    }


agent_schema = never_cache(AgentSchemaView.as_view())


class LocalSwaggerView(_PageHeaders, SpectacularSwaggerSplitView):
    """Swagger UI from our own static files, its start-up script served by the view itself
    (the "split" view) rather than inline, so the page runs under a policy that allows no
    inline script and no outside fetch: people paste API keys into its Authorize box.
    Cross-Origin-Opener-Policy same-origin, as every other page (drf-spectacular's default
    opens it for OAuth pop-ups, which this API has none of)."""

    HEADERS = {
        "Content-Security-Policy": (
            "default-src 'self'; img-src 'self' data:; font-src 'self' data:; "
            "style-src 'self' 'unsafe-inline'; script-src 'self'; connect-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
        ),
        "Cross-Origin-Opener-Policy": "same-origin",
    }
