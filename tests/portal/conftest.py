"""Browser tests: Playwright driving the system's Chromium against pytest-django's live server.

`playwright install` cannot download a browser here; scripts/ensure_chromium.sh installs
Debian's chromium, which these tests launch by path. Every test in this folder is marked
`browser`.
"""

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]
# Playwright's sync API runs an event loop in the test's thread; the tests' own ORM calls
# (fixtures, assertions on what the page wrote) are synchronous and safe there.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Browser tests need Chromium at {CHROMIUM} (scripts/ensure_chromium.sh).")
    args = {k: v for k, v in browser_type_launch_args.items() if k != "channel"}
    return {**args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture(autouse=True)
def fresh_sign_in_limits(settings):
    """Sign-in attempts are counted in Redis per hour; each test starts with none counted."""
    import redis

    client = redis.Redis.from_url(settings.CACHES["default"]["LOCATION"])
    try:
        keys = list(client.scan_iter(match="*ratelimit:signin:*", count=1000))
        if keys:
            client.delete(*keys)
        yield
    finally:
        client.close()


@pytest.fixture
def portal(page, live_server, settings):
    """The page, with its timeouts short enough that a broken page fails fast.

    Every page runs under the portal's Content-Security-Policy; anything it blocks (an inline
    script without the nonce, a script from an origin not allowed) fails the test.
    """
    # The live server plays the TLS proxy (tests/clients.py), but Chromium itself speaks plain
    # HTTP to it, so its forms post with an http:// Origin that production's CSRF check refuses.
    settings.CSRF_TRUSTED_ORIGINS = [live_server.url]
    page.set_default_timeout(10_000)
    page.base = live_server.url
    blocked = []
    page.on(
        "console",
        lambda message: (
            blocked.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    yield page
    assert blocked == [], "the Content-Security-Policy blocked something"


@pytest.fixture
def signed_in(portal, live_server, django_user_model, client):
    """A page signed in as a new owner of a new organisation: (page, user, organization).

    Signs in through the session cookie (the login form has its own test) to keep tests short.
    """
    from marketplace.services.organizations import organization_create

    user = django_user_model.objects.create_user(
        username="ada", email="ada@example.com", password="a-long-passphrase-1"
    )
    organization = organization_create(name="Ada Labs", owner=user)
    client.force_login(user)
    cookie = client.cookies["sessionid"]
    portal.context.add_cookies(
        [{"name": "sessionid", "value": cookie.value, "url": live_server.url}]
    )
    return portal, user, organization
