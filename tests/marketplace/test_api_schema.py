"""The OpenAPI schema is served, valid, and documents the key scheme; the docs pages render."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import re

import pytest
from django.urls import include, path
from drf_spectacular.drainage import GENERATOR_STATS
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema

from tests.clients import HttpsAPIClient
from tests.marketplace.api_fixtures import fresh_rate_limits  # noqa: F401

pytestmark = pytest.mark.django_db


def test_the_schema_is_served_and_describes_the_api():
    response = HttpsAPIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["components"]["securitySchemes"]["ApiKeyAuth"]["scheme"] == "bearer"
    paths = schema["paths"]
    for expected in (
        "/api/v1/gpu-models",
        "/api/v1/sites",
        "/api/v1/sites/{slug}/availability",
        "/api/v1/availability",
        "/api/v1/quotes",
        "/api/v1/quotes/{quote_id}",
        "/api/v1/reservations",
        "/api/v1/reservations/{reservation_id}",
        "/api/v1/reservations/{reservation_id}/cancel",
        "/api/v1/reservations/{reservation_id}/cancellation-terms",
        "/api/v1/reservations/{reservation_id}/extend",
        "/api/v1/reservations/{reservation_id}/extension-terms",
        "/api/v1/api-keys",
        "/api/v1/api-keys/{key_id}/revoke",
        "/api/v1/ssh-keys",
        "/api/v1/ssh-keys/{ssh_key_id}",
        "/api/v1/organization",
        "/api/v1/organization/members",
        "/api/v1/organization/members/{member_id}",
        "/api/v1/organization/invitations",
        "/api/v1/organization/invitations/{invitation_id}/revoke",
    ):
        assert expected in paths, expected
    create = paths["/api/v1/reservations"]["post"]
    assert "Idempotency-Key" in [p["name"] for p in create["parameters"]]
    assert set(create["responses"]) >= {"201", "400", "401", "404", "409", "422", "429"}


def _schema(url: str = "/api/schema/") -> dict:
    response = HttpsAPIClient().get(url, HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return response.json()


def _operations():
    """Every operation of both documents: the customers' and the site agents'."""
    for url in ("/api/schema/", "/api/schema/agent/"):
        for path_, item in _schema(url)["paths"].items():
            for method, operation in item.items():
                yield path_, method, operation


def test_the_customers_document_leaves_the_site_agents_endpoints_to_their_own():
    customers = _schema()
    agents = _schema("/api/schema/agent/")

    assert not [p for p in customers["paths"] if p.startswith("/api/v1/agent/")]
    assert "nodeToken" not in customers["components"]["securitySchemes"]  # not in Authorize
    assert all(p.startswith("/api/v1/agent/") for p in agents["paths"])
    assert {
        "/api/v1/agent/heartbeat",
        "/api/v1/agent/jobs/lease",
        "/api/v1/agent/jobs/{job_id}/complete",
        "/api/v1/agent/workloads",
    } <= set(agents["paths"])
    # The grid price feed takes a grid-scope API key too (docs/grid.md).
    assert set(agents["components"]["securitySchemes"]) <= {"nodeToken", "ApiKeyAuth", "cookieAuth"}
    assert "nodeToken" in agents["components"]["securitySchemes"]
    validate_schema(agents)


def test_redoc_is_served_without_outside_fonts_or_images():
    response = HttpsAPIClient().get("/api/redoc/")
    html = response.content.decode()
    assert "fonts.googleapis.com" not in html and "https://" not in html
    # Our own static copy, under its content-hashed name.
    bundle = re.search(
        r'src="(/static/drf_spectacular_sidecar/redoc/bundles/redoc\.standalone\.[0-9a-f]{12}\.js)"',
        html,
    )
    assert bundle, "the page loads Redoc from our static files"
    assert HttpsAPIClient().get(bundle.group(1)).status_code == 200
    policy = response["Content-Security-Policy"]
    assert "img-src 'self' data:" in policy and "font-src 'self' data:" in policy


def test_every_operation_documents_the_errors_the_base_views_can_answer():
    """What an API-wide fuzz (schemathesis) found undocumented: an unknown Sy-Organization
    (404), a malformed Idempotency-Key (400), a node agent without its token (401)."""
    checked = 0
    for url, method, operation in _operations():
        documented = set(operation["responses"])
        parameters = {p["name"] for p in operation.get("parameters", [])}
        where = f"{method.upper()} {url}"
        assert {"400", "401"} <= documented, where
        if method in ("post", "put", "patch"):
            assert "415" in documented, where
        assert "429" in documented, where  # customers' keys and node agents alike
        if url.startswith("/api/v1/agent/") and "{job_id}" in url:
            assert {"404", "409"} <= documented, where
        if "Sy-Organization" in parameters:
            assert {"403", "404"} <= documented, where
            if method == "post":
                assert {"409", "422"} <= documented, where
        checked += 1
    assert checked >= 35


def test_the_marketplace_part_of_the_schema_is_valid_and_has_no_warnings():
    """What `manage.py spectacular --validate --fail-on-warn` checks, for this app's endpoints."""
    GENERATOR_STATS.reset()
    generator = SchemaGenerator(patterns=[path("api/v1/", include("marketplace.urls"))])
    schema = generator.get_schema(request=None, public=True)
    validate_schema(schema)
    assert not GENERATOR_STATS, dict(GENERATOR_STATS._warn_cache)
    assert len(schema["paths"]) == 36


@pytest.mark.parametrize("url", ["/api/docs/", "/api/redoc/"])
def test_the_docs_pages_render(url):
    client = HttpsAPIClient()
    response = client.get(url)
    assert response.status_code == 200
    assert "script-src 'self'" in response["Content-Security-Policy"]
    if url == "/api/docs/":  # Swagger UI's start-up script is served apart, not inline
        assert b'<script src="/api/docs/?script="></script>' in response.content
        response = client.get(url, {"script": ""})
    assert b"/api/schema/" in response.content


# Every amount of money the marketplace's API writes (AmountField), by component.
AMOUNTS = {
    "ReservationOutput": ["total", "charged"],
    "ReservationDetailOutput": ["total", "charged"],
    "QuoteOutput": ["total"],
    "OfferOutput": ["total"],
    "CancellationTermsOutput": ["unused_amount", "refund_amount", "fee_amount"],
    "ExtensionTermsOutput": ["extra_amount", "new_total", "charged_now"],
    "SaleOutput": ["total", "proceeds", "fees", "net"],
}


def test_amounts_are_read_only_decimal_strings_and_rates_keep_four_places():
    """The type integrators generate clients from is unchanged (a decimal string of at most
    two places, which a currency without a minor unit writes with none); amounts are output."""
    components = _schema()["components"]["schemas"]
    for component, names in AMOUNTS.items():
        for name in names:
            prop = components[component]["properties"][name]
            where = f"{component}.{name}"
            assert (prop["type"], prop["format"]) == ("string", "decimal"), where
            assert prop["pattern"] == r"^-?\d{0,12}(?:\.\d{0,2})?$", where
            assert prop.get("readOnly") is True, where
            assert name in components[component]["required"], where
    for component in ("ReservationOutput", "QuoteOutput", "OfferOutput", "ExtensionTermsOutput"):
        rate = components[component]["properties"]["price_per_gpu_hour"]
        assert (rate["type"], rate["format"]) == ("string", "decimal")
        assert rate["pattern"] == r"^-?\d{0,8}(?:\.\d{0,4})?$"


def test_every_paged_list_documents_the_limits_it_enforces():
    """A fuzz read `limit` as any integer and sent 0, which is refused (400 invalid_limit)."""
    paged = 0
    for url, method, operation in _operations():
        for parameter in operation.get("parameters", []):
            if parameter["name"] == "limit" and parameter["in"] == "query":
                schema = parameter["schema"]
                assert (schema["minimum"], schema["maximum"], schema["default"]) == (1, 100, 25)
                paged += 1
    assert paged >= 10
