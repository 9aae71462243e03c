"""GET /metrics: Prometheus text format, for a bearer token or an allowed address only."""

import hmac
import ipaddress
import os

from django.conf import settings
from django.http import HttpResponse
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from config.client_ip import client_ip
from config.metrics.business import business_registry

__all__ = ["metrics", "process_registry"]


def process_registry() -> CollectorRegistry:
    """This process's metrics, or under PROMETHEUS_MULTIPROC_DIR every process's, summed."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


# What a reverse proxy adds to a request it forwards for a client.
_FORWARDED = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")


def _allowed(request) -> bool:
    token = settings.METRICS_TOKEN
    sent = request.META.get("HTTP_AUTHORIZATION", "")
    if token and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return True
    if not settings.TRUSTED_PROXIES and any(header in request.META for header in _FORWARDED):
        # A proxy forwarded it and none is trusted to say for whom: the connection's address
        # is the proxy's (inside the allowed network, as often as not), not the client's.
        return False
    # Through TRUSTED_PROXIES if any: a forwarded address from an untrusted peer is ignored.
    try:
        address = ipaddress.ip_address(client_ip(request))
    except ValueError:
        return False
    return any(
        address in ipaddress.ip_network(allowed, strict=False)
        for allowed in settings.METRICS_ALLOWED_IPS
    )


def metrics(request) -> HttpResponse:
    if not _allowed(request):
        response = HttpResponse(
            "Forbidden: a metrics token or an allowed address is needed.\n",
            status=403,
            content_type="text/plain",
        )
        response["WWW-Authenticate"] = "Bearer"
        return response
    body = generate_latest(process_registry()) + generate_latest(business_registry)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
