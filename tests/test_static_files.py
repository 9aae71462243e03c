"""Static files as in production: scripts/test.py runs collectstatic into STATIC_ROOT, pages
link the content-hashed names from its manifest, and whitenoise serves them itself, cached
for a year and compressed for clients that accept it."""

import importlib.util
import re
import sys

import pytest
from django.conf import settings
from django.contrib.staticfiles.storage import staticfiles_storage
from django.template import Context, Template

from tests.clients import HttpsClient

pytestmark = pytest.mark.django_db

SCRIPTS = settings.BASE_DIR / "scripts"
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


def test_every_portal_page_names_its_icon_which_is_served():
    # Browsers ask for /favicon.ico otherwise: a 404 in every page's console.
    page = HttpsClient().get("/login").content.decode()
    href = re.search(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', page).group(1)

    response = HttpsClient().get(href)

    assert href == staticfiles_storage.url("portal/favicon.svg")
    assert (response.status_code, response["Content-Type"]) == (200, "image/svg+xml")


def _test_script():
    """scripts/test.py as a module (its name would clash with the standard library's `test`)."""
    sys.path.insert(0, str(SCRIPTS))  # for its `import devservices`
    try:
        spec = importlib.util.spec_from_file_location("make_test", SCRIPTS / "test.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


def test_make_test_collects_again_only_when_a_static_source_changed(tmp_path, monkeypatch):
    script = _test_script()
    (tmp_path / "requirements.txt").write_text("Django==5.2\n")
    css = tmp_path / "portal" / "static" / "portal.css"
    css.parent.mkdir(parents=True)
    css.write_text("a {}")
    static_root = tmp_path / ".run" / "test-static"
    monkeypatch.setattr(script, "ROOT", tmp_path)
    monkeypatch.setattr(script, "STATIC_ROOT", static_root)
    monkeypatch.setattr(script, "STATIC_FINGERPRINT", tmp_path / ".run" / "fingerprint")
    runs = []

    def collectstatic(command, **kwargs):
        runs.append(command)
        static_root.mkdir(parents=True, exist_ok=True)
        (static_root / "staticfiles.json").write_text("{}")

    monkeypatch.setattr(script.subprocess, "run", collectstatic)

    script.collect_static({})
    script.collect_static({})
    assert len(runs) == 1
    assert "--clear" in runs[0]  # a file gone from the sources is gone from STATIC_ROOT too
    css.write_text("a { color: red }")
    script.collect_static({})
    (tmp_path / "requirements.txt").write_text("Django==5.2.1\n")
    script.collect_static({})
    (static_root / "staticfiles.json").unlink()
    script.collect_static({})
    assert len(runs) == 4
