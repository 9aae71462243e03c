"""The Content-Security-Policy of the portal's pages (django-csp), and Stripe.js's place in it.

Every page allows only its own origin: scripts from our static files or an inline script
carrying the request's nonce, no plugins, no framing, forms posting back to us. The one page
that loads Stripe.js (saving a card) adds Stripe's origins, from STRIPE_JS_URL at request time:
the real Stripe.js in production, localstripe's stand-in on a loopback origin in development
and tests.
"""

from urllib.parse import urlparse

from csp.constants import NONCE, NONE, SELF
from csp.middleware import CSPMiddleware as _CSPMiddleware
from django.conf import settings

__all__ = ["POLICY", "CSPMiddleware", "stripe_js_allow"]

POLICY = {
    # The JSON API needs no policy; its docs pages (Swagger UI, Redoc) run inline scripts.
    "EXCLUDE_URL_PREFIXES": ["/api/"],
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "frame-src": [NONE],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

# What Stripe documents for Stripe.js and its Elements, beyond its script's own origin.
_REAL_STRIPE = {
    "script-src": ["https://js.stripe.com", "https://*.js.stripe.com"],
    "frame-src": ["https://js.stripe.com", "https://*.js.stripe.com", "https://hooks.stripe.com"],
    "connect-src": ["https://api.stripe.com"],
}


def stripe_js_allow(response):
    """Let this response's page load Stripe.js from STRIPE_JS_URL and talk to Stripe."""
    url = urlparse(settings.STRIPE_JS_URL)
    origin = f"{url.scheme}://{url.netloc}"
    sources = {"script-src": [origin], "frame-src": [origin], "connect-src": [origin]}
    if url.netloc == "js.stripe.com":
        sources = _REAL_STRIPE
    # frame-src replaces 'none' (which cannot stand beside a source); the others add to 'self'.
    response._csp_replace = {"frame-src": sources["frame-src"]}
    response._csp_update = {k: v for k, v in sources.items() if k != "frame-src"}
    return response


class CSPMiddleware(_CSPMiddleware):
    """django-csp's middleware, which builds the policy for every response before it looks
    at EXCLUDE_URL_PREFIXES: excluded paths (the JSON API) skip that work."""

    def process_response(self, request, response):
        excluded = settings.CONTENT_SECURITY_POLICY.get("EXCLUDE_URL_PREFIXES") or ()
        if request.path_info.startswith(tuple(excluded)):
            return response
        return super().process_response(request, response)
