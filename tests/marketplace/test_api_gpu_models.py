"""GET /api/v1/gpu-models: the first page comes from the per-process reference cache, the
same answer the paginator gives from the database."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from marketplace.selectors.reference import reference_cache_clear
from tests.factories import GpuModelFactory
from tests.marketplace.api_fixtures import (  # noqa: F401 (fixtures)
    client_key,
    fresh_rate_limits,
    org,
)

pytestmark = pytest.mark.django_db
URL = "/api/v1/gpu-models"


@pytest.fixture(autouse=True)
def _fresh_reference_cache():
    reference_cache_clear()
    yield
    reference_cache_clear()


def test_the_first_page_is_the_paginators_answer_without_reading_the_catalogue(client_key):  # noqa: F811
    for slug in ("h100-sxm-80gb", "a100-sxm-80gb", "l40s-48gb"):
        GpuModelFactory(slug=slug)
    through_paginator = client_key.get(URL, {"limit": 25}).json()
    client_key.get(URL)  # loads the cache and the key

    with CaptureQueriesContext(connection) as queries:
        cached = client_key.get(URL)

    assert cached.status_code == 200
    assert cached.json() == through_paginator
    slugs = [m["id"] for m in cached.json()["results"]]
    assert slugs == sorted(slugs)
    assert {"h100-sxm-80gb", "a100-sxm-80gb", "l40s-48gb"} <= set(slugs)
    assert [q["sql"] for q in queries.captured_queries if "inventory_gpumodel" in q["sql"]] == []


def test_a_model_added_in_this_process_is_listed_at_once(client_key):  # noqa: F811
    GpuModelFactory(slug="a-first")
    assert [m["id"] for m in client_key.get(URL).json()["results"]] == ["a-first"]

    GpuModelFactory(slug="b-second")

    assert [m["id"] for m in client_key.get(URL).json()["results"]] == ["a-first", "b-second"]


def test_a_catalogue_longer_than_a_page_is_paged_by_the_paginator(client_key):  # noqa: F811
    for n in range(26):
        GpuModelFactory(slug=f"model-{n:02d}")

    body = client_key.get(URL).json()

    assert len(body["results"]) == 25
    assert body["next"] is not None
