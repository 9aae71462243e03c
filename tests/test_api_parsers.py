"""config.api.parsers: a key given twice in one JSON object is refused (400 duplicate_field,
named with its path), never read as its last value; nothing is written."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import io

import pytest
from rest_framework.exceptions import ParseError

from config.api.parsers import JSONParser
from config.errors import ValidationFailed
from marketplace.models import Quote, Reservation
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    assert_error,
    client_key,
    fresh_rate_limits,
    market,
    org,
    reservation_body,
)


def _parse(text: str):
    return JSONParser().parse(io.BytesIO(text.encode()), "application/json", {})


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"a": 1, "a": 1}', "a"),
        ('{"a": 1, "b": {"c": 1, "c": 2}}', "b.c"),
        ('{"a": [{"b": 1}, {"c": 1, "d": 2, "c": 3}]}', "a.1.c"),
        ('[{"x": {"y": 1, "y": 2}}]', "0.x.y"),
        # With several, the outermost is named, then the first in the document.
        ('{"a": {"b": 1, "b": 2}, "c": 1, "c": 2}', "c"),
        ('{"a": {"b": 1, "b": 2}, "c": {"d": 1, "d": 2}}', "a.b"),
    ],
)
def test_a_key_given_twice_is_refused_and_named_by_its_path(text, field):
    with pytest.raises(ValidationFailed) as refused:
        _parse(text)
    assert (refused.value.code, refused.value.field) == ("duplicate_field", field)


def test_json_without_repeated_keys_parses_as_before():
    text = '{"a": [1, 2.5, "x", null, true], "b": {"c": {}}, "d": []}'
    assert _parse(text) == {"a": [1, 2.5, "x", None, True], "b": {"c": {}}, "d": []}
    assert _parse('"text"') == "text"


@pytest.mark.parametrize("text", ["{", '{"a": NaN}', '{"a": Infinity}', "\ufeff{}"])
def test_what_is_not_json_is_still_a_parse_error(text):
    with pytest.raises(ParseError):
        _parse(text)


@pytest.mark.django_db
def test_a_quote_with_a_field_given_twice_is_refused_and_nothing_is_quoted(market, client_key):
    body = (
        '{"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "gpu_count": 8, '
        f'"starts_at": "{reservation_body()["starts_at"]}", '
        f'"ends_at": "{reservation_body()["ends_at"]}"}}'
    )
    response = client_key.post("/api/v1/quotes", body, content_type="application/json")
    assert_error(response, 400, "duplicate_field", field="gpu_count")
    assert Quote.objects.count() == 0


@pytest.mark.django_db
def test_a_booking_with_a_nested_field_given_twice_is_refused_and_nothing_is_booked(
    market, client_key
):
    body = reservation_body(workload={"image": "ghcr.io/acme/a:1"})
    text = (
        '{"gpu_model": "h100-sxm-80gb", "gpu_count": 2, "tier": "on_demand", '
        f'"starts_at": "{body["starts_at"]}", "ends_at": "{body["ends_at"]}", '
        '"workload": {"image": "ghcr.io/acme/a:1", "image": "ghcr.io/acme/b:1"}}'
    )
    response = client_key.post("/api/v1/reservations", text, content_type="application/json")
    assert_error(response, 400, "duplicate_field", field="workload.image")
    assert Reservation.objects.count() == 0
    # The same body without the repeat books: the refusal was for the repeat alone.
    good = text.replace(', "image": "ghcr.io/acme/b:1"', "")
    assert (
        client_key.post("/api/v1/reservations", good, content_type="application/json").status_code
        == 201
    )
