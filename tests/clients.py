"""Production sits behind a TLS proxy that sets X-Forwarded-Proto (SECURE_PROXY_SSL_HEADER), so
the tests talk to the app as through it: the HTTPS redirect, secure cookies and HSTS are those
of production. tests/test_production_settings.py shows what a plain-HTTP request gets."""

from django.test import Client
from rest_framework.test import APIClient

THROUGH_TLS_PROXY = {"HTTP_X_FORWARDED_PROTO": "https"}


class HttpsClient(Client):
    """Django's test client, its requests forwarded by the TLS proxy."""

    def __init__(self, *args, **defaults):
        super().__init__(*args, **{**THROUGH_TLS_PROXY, **defaults})


class HttpsAPIClient(APIClient):
    """DRF's test client, its requests forwarded by the TLS proxy."""

    def __init__(self, *args, **defaults):
        super().__init__(*args, **{**THROUGH_TLS_PROXY, **defaults})


class BehindTlsProxy:
    """WSGI: what the TLS proxy adds to every request it forwards, for the live server (the
    browser, the SDK, localstripe's webhooks and the site agent reach it over plain HTTP)."""

    def __init__(self, application):
        self.application = application

    def __call__(self, environ, start_response):
        environ["HTTP_X_FORWARDED_PROTO"] = "https"
        return self.application(environ, start_response)
