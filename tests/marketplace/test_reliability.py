"""30-day reliability per GPU, node and site, and the min_reliability search filter."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from inventory.models import Gpu, Node, Outage, OutageCause, Site
from marketplace.models import (
    Allocation,
    AttemptOutcome,
    ProvisioningAttempt,
    ProvisioningKind,
    Quote,
    Reservation,
)
from marketplace.services.reliability import reliability_compute
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    assert_error,
    client_key,
    fresh_rate_limits,
    market,
    org,
    tomorrow,
)
from tests.provisioning_support import market_create

pytestmark = pytest.mark.django_db
H = timedelta(hours=1)


def outage(node, start, end, gpu=None, cause=OutageCause.HARDWARE_FAILURE):
    return Outage.objects.create(node=node, gpu=gpu, started_at=start, ended_at=end, cause=cause)


def test_gpu_node_and_site_figures(allow_all_funding):
    now = timezone.now()
    m = market_create(nodes=2, gpus=4)
    a, b = m.nodes
    Node.objects.filter(pk=a.pk).update(created_at=now - timedelta(days=40))
    Node.objects.filter(pk=b.pk).update(created_at=now - timedelta(days=10))
    gpu1 = Gpu.objects.get(node=a, index=1)
    outage(a, now - timedelta(days=35), now - timedelta(days=34))  # before the window
    outage(a, now - 100 * H, now - 85 * H)  # 15 h, the whole node
    outage(a, now - 90 * H, now - 50 * H, gpu=gpu1)  # 40 h on GPU 1, 5 h of it overlapping
    outage(b, now - 2 * H, None, cause=OutageCause.HEARTBEAT_MISSED)  # open: runs to now
    r = m.book(gpu_count=1)
    r.allocations.update(node=a, gpu=Gpu.objects.get(node=a, index=3))
    for number, outcome in enumerate(
        [AttemptOutcome.NODE_FAILURE, AttemptOutcome.SUCCEEDED, AttemptOutcome.ERROR,
         AttemptOutcome.SUCCEEDED], start=1,
    ):  # fmt: skip
        ProvisioningAttempt.objects.create(
            reservation=r, kind=ProvisioningKind.PROVISION, number=number, outcome=outcome,
            started_at=now - 3 * H,
        )  # fmt: skip

    assert reliability_compute(now=now) == {"gpus": 8, "nodes": 2, "sites": 1}

    window_a = Decimal(30 * 24)  # hours
    others = (1 - Decimal(15) / window_a).quantize(Decimal("0.0001"))  # 0.9792
    gpu1_figure = (1 - Decimal(15 + 35) / window_a).quantize(Decimal("0.0001"))  # 0.9306
    figures = dict(Gpu.objects.filter(node=a).values_list("index", "reliability_30d"))
    assert figures == {0: others, 1: gpu1_figure, 2: others, 3: others}
    node_a = ((3 * others + gpu1_figure) / 4 * Decimal("0.75")).quantize(Decimal("0.0001"))
    assert Node.objects.get(pk=a.pk).reliability_30d == node_a
    # B is 10 days old and has been silent for the last 2 hours.
    gpu_b = (1 - Decimal(2) / Decimal(10 * 24)).quantize(Decimal("0.0001"))
    assert set(Gpu.objects.filter(node=b).values_list("reliability_30d", flat=True)) == {gpu_b}
    assert Node.objects.get(pk=b.pk).reliability_30d == gpu_b
    site = (node_a * 4 + gpu_b * 4) / 8
    assert Site.objects.get(pk=m.site.pk).reliability_30d == site.quantize(Decimal("0.0001"))
    # Running it again gives the same figures.
    reliability_compute(now=now)
    assert Node.objects.get(pk=a.pk).reliability_30d == node_a


def test_min_reliability_filters_offers_and_offers_show_the_figure(client_key, market):
    site, _model = market
    nodes = list(Node.objects.filter(site=site).order_by("pk"))
    Node.objects.filter(pk=nodes[0].pk).update(reliability_30d=Decimal("0.9990"))
    Node.objects.filter(pk=nodes[1].pk).update(reliability_30d=Decimal("0.9500"))
    start = tomorrow()
    window = {"gpu_model": "h100-sxm-80gb", "gpu_count": 8,
              "start": start.isoformat(), "end": (start + 4 * H).isoformat()}  # fmt: skip

    (any_offer,) = client_key.get("/api/v1/availability", window).json()["results"]
    (strict,) = client_key.get(
        "/api/v1/availability", {**window, "min_reliability": "0.99"}
    ).json()["results"]
    none = client_key.get("/api/v1/availability", {**window, "min_reliability": "0.9995"}).json()[
        "results"
    ]

    assert any_offer["fitting_node_count"] == 2
    assert (strict["fitting_node_count"], strict["reliability"]) == (1, "0.9990")
    assert none == []
    assert_error(
        client_key.get("/api/v1/availability", {**window, "min_reliability": "1.5"}),
        400,
        field="min_reliability",
    )


def test_a_node_without_a_figure_does_not_qualify(client_key, market):
    start = tomorrow()
    window = {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "min_reliability": "0",
              "start": start.isoformat(), "end": (start + H).isoformat()}  # fmt: skip
    assert client_key.get("/api/v1/availability", window).json()["results"] == []


def test_sites_show_their_figure(client_key, market):
    site, _model = market
    Site.objects.filter(pk=site.pk).update(reliability_30d=Decimal("0.9975"))
    (listed,) = client_key.get("/api/v1/sites").json()["results"]
    assert listed["reliability_30d"] == "0.9975"


def test_the_portal_search_filters_by_reliability_in_percent(market, org):
    from tests.marketplace.market_helpers import member_client

    site, _model = market
    nodes = list(Node.objects.filter(site=site).order_by("pk"))
    Node.objects.filter(pk=nodes[0].pk).update(reliability_30d=Decimal("0.9990"))
    Node.objects.filter(pk=nodes[1].pk).update(reliability_30d=Decimal("0.9500"))
    client = member_client(org, "member")
    query = {"gpu_model": "h100-sxm-80gb", "gpu_count": 8, "plan": "on_demand", "hours": 2}

    strict = client.get("/gpus", {**query, "min_reliability": "99.5"})
    too_strict = client.get("/gpus", {**query, "min_reliability": "99.95"})
    bad = client.get("/gpus", {**query, "min_reliability": "150"})

    assert [o.reliability for o, *_ in strict.context["offers"]] == [Decimal("0.9990")]
    assert '<td class="num">99.9 %</td>' in strict.content.decode()
    assert too_strict.context["offers"] == []
    assert bad.context["form"].errors["min_reliability"]


def test_the_portal_site_pages_show_the_figure(market, org):
    from tests.marketplace.market_helpers import member_client

    site, _model = market
    Site.objects.filter(pk=site.pk).update(reliability_30d=Decimal("0.9975"))
    client = member_client(org, "member")
    listing = client.get("/sites").content.decode()
    page = client.get(f"/sites/{site.slug}").content.decode()
    assert '<td class="num">99.8 %</td>' in listing  # 99.75 rounded half-even to 99.8
    assert "99.8 % over the last 30 days" in page


def _reliable_and_not(site) -> tuple[Node, Node]:
    reliable, flaky = Node.objects.filter(site=site).order_by("pk")
    Node.objects.filter(pk=reliable.pk).update(reliability_30d=Decimal("0.9990"))
    Node.objects.filter(pk=flaky.pk).update(reliability_30d=Decimal("0.9500"))
    return reliable, flaky


def _booking(start, **extra) -> dict:
    return {"gpu_model": "h100-sxm-80gb", "starts_at": start.isoformat(),
            "ends_at": (start + 4 * H).isoformat(), **extra}  # fmt: skip


def _nodes_of(reservation_id: str) -> set[int]:
    return set(
        Allocation.objects.filter(reservation__public_id=reservation_id).values_list(
            "node_id", flat=True
        )
    )


def test_a_quote_asked_with_a_reliability_floor_is_booked_only_on_nodes_above_it(
    client_key, market
):
    site, _model = market
    reliable, flaky = _reliable_and_not(site)
    start = tomorrow()
    quote = client_key.post(
        "/api/v1/quotes", _booking(start, gpu_count=4, min_reliability="0.99"), format="json"
    ).json()
    assert quote["min_reliability"] == "0.9900"
    # Meanwhile someone takes most of the reliable node: the 4 GPUs no longer fit on it.
    blocker = client_key.post(
        "/api/v1/reservations", _booking(start, gpu_count=6, min_reliability="0.99"), format="json"
    )
    assert blocker.status_code == 201, blocker.content
    assert _nodes_of(blocker.json()["id"]) == {reliable.pk}
    before = Reservation.objects.count()

    refused = client_key.post("/api/v1/reservations", {"quote": quote["id"]}, format="json")

    assert_error(refused, 409, "not_available")
    assert Reservation.objects.count() == before  # nothing placed on the flaky node
    assert not Allocation.objects.filter(node=flaky).exists()

    # The same booking without the floor is free to use the other node.
    loose = client_key.post("/api/v1/quotes", _booking(start, gpu_count=4), format="json").json()
    assert loose["min_reliability"] is None
    booked = client_key.post("/api/v1/reservations", {"quote": loose["id"]}, format="json")
    assert booked.status_code == 201, booked.content
    assert _nodes_of(booked.json()["id"]) == {flaky.pk}


def test_a_direct_booking_honours_its_reliability_floor(client_key, market):
    site, _model = market
    reliable, _flaky = _reliable_and_not(site)
    start = tomorrow()
    for _ in range(2):  # the second cannot fit on the reliable node any more
        response = client_key.post(
            "/api/v1/reservations",
            _booking(start, gpu_count=5, min_reliability="0.99", site="abilene-1"),
            format="json",
        )
    assert_error(response, 409, "not_available")
    (booked,) = Reservation.objects.all()
    assert _nodes_of(booked.public_id) == {reliable.pk}
    assert_error(
        client_key.post(
            "/api/v1/reservations", _booking(start, gpu_count=1, min_reliability="2"), format="json"
        ),
        400,
        field="min_reliability",
    )
    assert Reservation.objects.count() == 1


def test_the_portal_carries_the_floor_from_the_search_to_the_held_price(market, org):
    from tests.marketplace.market_helpers import member_client

    site, _model = market
    _reliable_and_not(site)
    client = member_client(org, "member")
    query = {"gpu_model": "h100-sxm-80gb", "gpu_count": 2, "plan": "on_demand", "hours": 2,
             "min_reliability": "99.5"}  # fmt: skip
    page = client.get("/gpus", query).content.decode()
    assert '<input type="hidden" name="min_reliability" value="99.5">' in page

    held = client.post("/quotes", {**query, "site": "abilene-1"})

    quote = Quote.objects.get(organization=org)
    assert held.status_code == 302 and held["Location"].endswith(quote.public_id)
    assert quote.min_reliability == Decimal("0.9950")
    assert "min_reliability=99.5" in client.get(held["Location"]).content.decode()


def test_a_refusal_names_the_reliability_floor_that_left_nothing(client_key, market):
    """With no node old enough to have a figure, a quote or booking with a floor was refused
    "No site has 1 … GPU(s) free for that period": the caller could not tell why."""
    start = tomorrow()
    for path in ("/api/v1/quotes", "/api/v1/reservations"):
        refused = client_key.post(path, _booking(start, gpu_count=1, min_reliability="0.9"),
                                  format="json")  # fmt: skip
        error = assert_error(refused, 409, "not_available")
        assert error["message"] == (
            "No site has 1 h100-sxm-80gb GPU(s) free for that period on nodes with a 30-day "
            "reliability of at least 0.9000 (a node too new to have one does not qualify)."
        ), path
    assert not Reservation.objects.exists()
