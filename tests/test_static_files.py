"""Static files as in production: scripts/test.py runs collectstatic into STATIC_ROOT, pages
link the content-hashed names from its manifest, and whitenoise serves them itself, cached
for a year and compressed for clients that accept it."""

import re

import pytest
from django.conf import settings
from django.contrib.staticfiles.storage import staticfiles_storage
from django.template import Context, Template

from tests.clients import HttpsClient

pytestmark = pytest.mark.django_db

STATIC_TAG = re.compile(r"""{%\s*static\s+["']([^"']+)["']""")


def _templates():
    folders = [settings.BASE_DIR / "templates", *settings.BASE_DIR.glob("*/templates")]
    return [path for folder in folders for path in sorted(folder.rglob("*.html"))]


def test_the_suite_serves_collectstatic_output_with_hashed_names():
    assert settings.STORAGES["staticfiles"]["BACKEND"] == (
        "whitenoise.storage.CompressedManifestStaticFilesStorage"
    )
    assert settings.WHITENOISE_USE_FINDERS is False
    assert settings.WHITENOISE_AUTOREFRESH is False


def test_every_static_file_a_template_names_was_collected():
    named = {
        (str(path.relative_to(settings.BASE_DIR)), name)
        for path in _templates()
        for name in STATIC_TAG.findall(path.read_text())
    }
    assert len(named) >= 6, "the templates' {% static %} names were found"

    missing = [pair for pair in sorted(named) if pair[1] not in staticfiles_storage.hashed_files]

    assert missing == [], "collectstatic did not produce these (template, file)"


def test_a_page_naming_a_file_collectstatic_did_not_produce_fails_to_render():
    page = Template("{% load static %}<link href=\"{% static 'portal/gone.css' %}\">")

    with pytest.raises(ValueError, match="Missing staticfiles manifest entry"):
        page.render(Context())


def test_pages_link_the_hashed_name_and_whitenoise_serves_it_cached_for_a_year():
    client = HttpsClient()
    page = client.get("/login")
    assert page.status_code == 200
    css = re.search(r'href="(/static/portal/portal\.[0-9a-f]{12}\.css)"', page.content.decode())
    assert css, "the login page links the content-hashed stylesheet"

    response = client.get(css.group(1))

    assert response.status_code == 200
    assert response["Cache-Control"] == "max-age=315360000, public, immutable"
    body = b"".join(response.streaming_content)
    assert body == (settings.BASE_DIR / "marketplace/static/portal/portal.css").read_bytes()


def test_a_client_that_accepts_gzip_gets_the_compressed_file():
    hashed = staticfiles_storage.stored_name("portal/portal.css")

    response = HttpsClient().get(f"/static/{hashed}", HTTP_ACCEPT_ENCODING="gzip")

    assert response.status_code == 200
    assert response["Content-Encoding"] == "gzip"
    assert response["Vary"] == "Accept-Encoding"


def test_the_unhashed_name_is_served_too_but_not_cached_for_long():
    response = HttpsClient().get("/static/portal/portal.css")

    assert response.status_code == 200
    assert "immutable" not in response["Cache-Control"]
