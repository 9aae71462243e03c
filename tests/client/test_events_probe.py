"""Probes of the SDK against the events feed and the failed-authentication limit, as an
integrator meets them: repeated filters on every page, the 429 for failed authentications.
The server is played by httpx.MockTransport (what the SDK sends is the subject here)."""

import httpx
import pytest
from switchyard import Client
from switchyard.errors import AuthenticationError, RateLimitError


def _recording(pages: dict):
    """A transport answering by the request's `after`/`cursor`, recording each query."""
    seen: list[list[tuple[str, str]]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        items = list(request.url.params.multi_items())
        seen.append(items)
        position = request.url.params.get("after") or request.url.params.get("cursor")
        return httpx.Response(200, json=pages[position])

    return answer, seen


def test_every_page_of_a_list_keeps_all_values_of_a_repeated_filter():
    pages = {
        None: {
            "results": [{"id": "evt_2"}],
            "next": "https://h/api/v1/events?cursor=c1&type=a.b&type=c.d",
            "previous": None,
        },
        "c1": {"results": [{"id": "evt_1"}], "next": None, "previous": None},
    }
    answer, seen = _recording(pages)
    sy = Client(api_key="k", transport=httpx.MockTransport(answer))

    assert [e.id for e in sy.events.list(type=["a.b", "c.d"])] == ["evt_2", "evt_1"]

    assert seen[0] == [("type", "a.b"), ("type", "c.d")]
    # The second page asks for both types too, not for the first one only.
    assert sorted(seen[1]) == [("cursor", "c1"), ("type", "a.b"), ("type", "c.d")]


def test_every_page_of_the_feed_keeps_all_values_of_a_repeated_filter():
    pages = {
        None: {
            "results": [{"id": "evt_1"}],
            "next": "https://h/api/v1/events?order=oldest&type=a.b&type=c.d&limit=1&after=evt_1",
            "has_more": True,
        },
        "evt_1": {
            "results": [{"id": "evt_2"}],
            "next": "https://h/api/v1/events?type=a.b&type=c.d&limit=1&after=evt_2",
            "has_more": False,
        },
    }
    answer, seen = _recording(pages)
    sy = Client(api_key="k", transport=httpx.MockTransport(answer))

    assert [e.id for e in sy.events.poll(type=["a.b", "c.d"], limit=1)] == ["evt_1", "evt_2"]

    second = sorted(seen[1])
    assert second == sorted(
        [("order", "oldest"), ("after", "evt_1"), ("limit", "1"), ("type", "a.b"), ("type", "c.d")]
    )


def _failures_429(wait: int) -> httpx.Response:
    return httpx.Response(
        429,
        headers={"Retry-After": str(wait)},
        json={
            "error": {
                "type": "rate_limit_error",
                "code": "too_many_failed_authentications",
                "field": None,
                "message": "Too many failed authentications from your address; retry after "
                "the time in Retry-After.",
                "retry_after": wait,
            }
        },
    )


def test_a_429_for_failed_authentications_is_waited_out_then_retried(monkeypatch):
    slept = []
    monkeypatch.setattr("switchyard.client.time.sleep", slept.append)
    answers = [_failures_429(7), httpx.Response(200, json={"id": "org_1"})]
    sy = Client(api_key="k", transport=httpx.MockTransport(lambda request: answers.pop(0)))

    assert sy.organization.retrieve().id == "org_1"
    assert slept == [7.0]


def test_a_429_for_failed_authentications_past_the_retries_is_a_rate_limit_error(monkeypatch):
    monkeypatch.setattr("switchyard.client.time.sleep", lambda seconds: None)
    sy = Client(api_key="k", max_retries=2,
                transport=httpx.MockTransport(lambda request: _failures_429(40)))  # fmt: skip

    with pytest.raises(RateLimitError) as raised:
        sy.organization.retrieve()

    error = raised.value
    assert (error.status, error.code, error.retry_after) == (
        429,
        "too_many_failed_authentications",
        40,
    )


def test_a_wrong_key_is_not_retried(monkeypatch):
    calls = []

    def refuse(request):
        calls.append(request)
        return httpx.Response(401, json={"error": {"type": "authentication_error",
                              "code": "invalid_api_key", "field": None, "message": "Invalid."}})  # fmt: skip

    monkeypatch.setattr("switchyard.client.time.sleep", lambda seconds: None)
    sy = Client(api_key="k", transport=httpx.MockTransport(refuse))
    with pytest.raises(AuthenticationError):
        sy.organization.retrieve()
    assert len(calls) == 1  # a retry would only spend the address's failure budget
