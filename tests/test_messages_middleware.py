"""config.messages.LazyMessageMiddleware: storage built and saved only for a request using it."""

from django.contrib import messages
from django.contrib.messages.storage.fallback import FallbackStorage
from django.contrib.sessions.middleware import SessionMiddleware
from django.http import HttpResponse
from django.test import RequestFactory
from django.utils.functional import empty

from config.messages import LazyMessageMiddleware


def _through_middleware(view, cookies: dict | None = None):
    request = RequestFactory().get("/")
    request.COOKIES.update(cookies or {})
    handler = SessionMiddleware(LazyMessageMiddleware(view))
    return request, handler(request)


def test_a_request_that_never_uses_messages_builds_and_stores_nothing():
    request, response = _through_middleware(lambda request: HttpResponse("ok"))

    assert request._messages._wrapped is empty
    assert "messages" not in response.cookies


def test_a_message_added_is_stored_and_read_back_on_the_next_request():
    def add(request):
        messages.success(request, "Key created.")
        return HttpResponse("ok")

    request, response = _through_middleware(add)
    assert isinstance(request._messages._wrapped, FallbackStorage)
    stored = response.cookies["messages"].value
    assert stored

    seen = []

    def show(request):
        seen.extend(str(m) for m in messages.get_messages(request))
        return HttpResponse("ok")

    _, second = _through_middleware(show, cookies={"messages": stored})
    assert seen == ["Key created."]
    # Read once: the cookie is cleared on the response that showed it.
    assert second.cookies["messages"].value == ""
