"""With DEBUG off, whitenoise serves collectstatic's output itself: content-hashed names that
pages link to, cached for a year, compressed for clients that accept it."""

import re

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import Client, override_settings

pytestmark = pytest.mark.django_db

HOST = "switchyard.example.com"


@pytest.fixture
def collected(tmp_path):
    # The portal's own files only: compressing every app's (Swagger UI, Redoc) takes minutes.
    with override_settings(
        DEBUG=False,
        STATIC_ROOT=tmp_path,
        STATICFILES_FINDERS=["django.contrib.staticfiles.finders.FileSystemFinder"],
        STATICFILES_DIRS=[settings.BASE_DIR / "marketplace" / "static"],
        STORAGES={
            **settings.STORAGES,
            "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
        },
        WHITENOISE_USE_FINDERS=False,
        WHITENOISE_AUTOREFRESH=False,
        ALLOWED_HOSTS=[HOST],
        SECURE_SSL_REDIRECT=False,
    ):
        call_command("collectstatic", "--noinput", verbosity=0)
        yield tmp_path


def test_pages_link_the_hashed_name_and_whitenoise_serves_it_cached_for_a_year(collected):
    client = Client(HTTP_HOST=HOST)
    page = client.get("/login")
    assert page.status_code == 200
    css = re.search(r'href="(/static/portal/portal\.[0-9a-f]{12}\.css)"', page.content.decode())
    assert css, "the login page links the content-hashed stylesheet"

    response = client.get(css.group(1))

    assert response.status_code == 200
    assert response["Cache-Control"] == "max-age=315360000, public, immutable"
    body = b"".join(response.streaming_content)
    assert body == (settings.BASE_DIR / "marketplace/static/portal/portal.css").read_bytes()


def test_a_client_that_accepts_gzip_gets_the_compressed_file(collected):
    client = Client(HTTP_HOST=HOST)
    hashed = next(collected.glob("portal/portal.*.css.gz")).name.removesuffix(".gz")

    response = client.get(f"/static/portal/{hashed}", HTTP_ACCEPT_ENCODING="gzip")

    assert response.status_code == 200
    assert response["Content-Encoding"] == "gzip"
    assert response["Vary"] == "Accept-Encoding"


def test_the_unhashed_name_is_served_too_but_not_cached_for_long(collected):
    response = Client(HTTP_HOST=HOST).get("/static/portal/portal.css")

    assert response.status_code == 200
    assert "immutable" not in response["Cache-Control"]
