"""Bad input on every POST (and PATCH) endpoint: a 4xx in the error shape, and nothing written."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import pytest

from config.api.serializers import MAX_UNKNOWN_REPORTED
from marketplace.models import (
    Allocation,
    ApiKey,
    IdempotencyRecord,
    Invitation,
    Membership,
    Quote,
    Reservation,
    ReservationTransition,
    SshKey,
)
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    assert_error,
    fresh_rate_limits,
    make_reservation,
    market,
    org,
    owner,
    owner_client,
    reservation_body,
    tomorrow,
)
from tests.provisioning_support import ssh_key

pytestmark = pytest.mark.django_db

START = "2099-01-01T00:00:00Z"


def counts():
    return {
        model.__name__: model.objects.count()
        for model in (
            Quote,
            Reservation,
            Allocation,
            ReservationTransition,
            ApiKey,
            Membership,
            SshKey,
            Invitation,
        )
    } | {
        "ends": list(Reservation.objects.values_list("ends_at", "status").order_by("pk")),
        "roles": list(Membership.objects.values_list("role", flat=True).order_by("pk")),
        "revoked": list(Invitation.objects.values_list("revoked_at", flat=True).order_by("pk")),
    }


CASES = [
    # (path, body, status, code, field)
    ("/api/v1/quotes", {}, 400, "required", "gpu_model"),
    ("/api/v1/quotes", {**reservation_body(), "gpu_count": 0}, 400, "min_value", "gpu_count"),
    (
        "/api/v1/quotes",
        {**reservation_body(), "gpu_model": "nope"},
        400,
        "unknown_gpu_model",
        "gpu_model",
    ),
    ("/api/v1/quotes", {**reservation_body(), "ends_at": "tomorrow"}, 400, "invalid", "ends_at"),
    ("/api/v1/quotes", {**reservation_body(), "tier": "gold"}, 400, "invalid_choice", "tier"),
    ("/api/v1/quotes", {**reservation_body(), "tier": "reserved"}, 400, "term_required", "term"),
    ("/api/v1/quotes", {**reservation_body(), "gpu_count": 64}, 409, "not_available", None),
    (
        "/api/v1/quotes",
        {**reservation_body(), "region": "atlantis"},
        400,
        "unknown_region",
        "region",
    ),  # fmt: skip
    ("/api/v1/quotes", [1, 2], 400, "invalid", None),
    ("/api/v1/reservations", {}, 400, "required", "gpu_model"),
    (
        "/api/v1/reservations",
        {**reservation_body(), "region": "atlantis"},
        400,
        "unknown_region",
        "region",
    ),  # fmt: skip
    (
        "/api/v1/reservations",
        {**reservation_body(), "region": "atlantis", "site": "{site}"},
        400,
        "unknown_region",
        "region",
    ),  # fmt: skip
    ("/api/v1/reservations", {"quote": "quo_nope"}, 404, "quote_not_found", "quote"),
    (
        "/api/v1/reservations",
        {**reservation_body(), "quote": "quo_x"},
        400,
        "quote_and_parameters",
        "gpu_model",
    ),
    (
        "/api/v1/reservations",
        {**reservation_body(), "starts_at": "2001-01-01T00:00:00Z"},
        400,
        "starts_in_past",
        "starts_at",
    ),
    (
        "/api/v1/reservations",
        {**reservation_body(), "ends_at": START, "starts_at": START},
        400,
        "period_invalid",
        "ends_at",
    ),
    (
        "/api/v1/reservations",
        {**reservation_body(), "workload": {"image": "Not An Image!"}},
        400,
        "invalid_image",
        "workload.image",
    ),
    (
        "/api/v1/reservations",
        {**reservation_body(), "workload": {"ports": [0]}},
        400,
        "min_value",
        "workload.ports.0",
    ),
    ("/api/v1/reservations", {**reservation_body(), "workload": "x"}, 400, "invalid", "workload"),
    ("/api/v1/reservations", {**reservation_body(), "gpu_count": 17}, 409, "not_available", None),
    (
        "/api/v1/reservations",
        {**reservation_body(), "ssh_key_ids": ["ssh_nope"]},
        400,
        "unknown_ssh_key",
        "ssh_key_ids",
    ),
    (
        "/api/v1/reservations",
        {**reservation_body(), "ssh_key_ids": "ssh_nope"},
        400,
        "not_a_list",
        "ssh_key_ids",
    ),
    # Under RESERVATION_MIN_SECONDS (60): under a second was priced over zero seconds (a 500), a few seconds
    # rounded to a total and a hold of nothing.
    (
        "/api/v1/reservations",
        {**reservation_body(), "starts_at": START, "ends_at": "2099-01-01T00:00:00.5Z"},
        400,
        "period_too_short",
        "ends_at",
    ),
    (
        "/api/v1/reservations",
        {**reservation_body(), "starts_at": START, "ends_at": "2099-01-01T00:00:59Z"},
        400,
        "period_too_short",
        "ends_at",
    ),
    (
        "/api/v1/quotes",
        {**reservation_body(), "starts_at": START, "ends_at": "2099-01-01T00:00:00.5Z"},
        400,
        "period_too_short",
        "ends_at",
    ),
    # A key the request does not take is refused, not dropped: a misspelt floor would
    # otherwise book without it, a misspelt image run the default one.
    (
        "/api/v1/reservations",
        {**reservation_body(), "min_reliabilty": "0.99"},
        400,
        "unknown_field",
        "min_reliabilty",
    ),
    (
        "/api/v1/reservations",
        {**reservation_body(), "workload": {"imgae": "ghcr.io/x/y:1"}},
        400,
        "unknown_field",
        "workload.imgae",
    ),
    ("/api/v1/quotes", {**reservation_body(), "gpu_cuont": 4}, 400, "unknown_field", "gpu_cuont"),
    (
        "/api/v1/ssh-keys",
        {"name": "x", "public_key": ssh_key(), "comment": "x"},
        400,
        "unknown_field",
        "comment",
    ),  # fmt: skip
    # Python's int() reads both as numbers (10 and 1); a whole number is ASCII digits.
    ("/api/v1/quotes", {**reservation_body(), "gpu_count": "1_0"}, 400, "invalid", "gpu_count"),
    ("/api/v1/quotes", {**reservation_body(), "gpu_count": "\u0661"}, 400, "invalid", "gpu_count"),
    ("/api/v1/reservations/{res}/cancel", {"reason": "x" * 501}, 400, "max_length", "reason"),
    ("/api/v1/reservations/{res}/extend", {}, 400, "required", "ends_at"),
    (
        "/api/v1/reservations/{res}/extend",
        {"ends_at": "2001-01-01T00:00:00Z"},
        400,
        "not_later",
        "ends_at",
    ),
    ("/api/v1/api-keys", {}, 400, "required", "name"),
    ("/api/v1/api-keys", {"name": "x", "scopes": ["admin"]}, 400, "invalid_choice", "scopes.0"),
    ("/api/v1/api-keys", {"name": "x", "scopes": []}, 400, "min_length", "scopes"),
    ("/api/v1/api-keys/key_999999/revoke", {}, 404, "api_key_not_found", None),
    ("/api/v1/ssh-keys", {}, 400, "required", "name"),
    (
        "/api/v1/ssh-keys",
        {"name": "x", "public_key": "ssh-ed25519 not*base64"},
        400,
        "invalid_ssh_key",
        "public_key",
    ),
    ("/api/v1/ssh-keys", {"name": "x" * 101, "public_key": "x"}, 400, "max_length", "name"),
    # A line break ends the key's line in authorized_keys: what follows would be authorised too.
    (
        "/api/v1/ssh-keys",
        {"name": "x", "public_key": f"{ssh_key()}\nno-pty {ssh_key(body=bytes(32))}"},
        400,
        "invalid_ssh_key",
        "public_key",
    ),
    (
        "/api/v1/reservations",
        {**reservation_body(), "workload": {"ssh_public_keys": [f"{ssh_key()}\r\nx"]}},
        400,
        "invalid_ssh_key",
        "workload.ssh_public_keys.0",
    ),
    ("/api/v1/organization/invitations", {}, 400, "required", "email"),
    ("/api/v1/organization/invitations", {"email": "not-an-email"}, 400, "invalid", "email"),
    (
        "/api/v1/organization/invitations",
        {"email": "x@example.com", "role": "king"},
        400,
        "invalid_choice",
        "role",
    ),
    (
        "/api/v1/organization/invitations",
        {"email": "{owner_email}"},
        409,
        "already_member",
        "email",
    ),
    ("/api/v1/organization/invitations/inv_nope/revoke", {}, 404, "invitation_not_found", None),
]


@pytest.mark.parametrize(
    "path,body,status,code,field", CASES, ids=[f"{c[0]} {c[3]}" for c in CASES]
)
def test_bad_input_is_refused_and_writes_nothing(
    owner_client, owner, market, path, body, status, code, field
):
    reservation = make_reservation(owner_client)
    ids = {"res": reservation["id"], "owner_email": owner.user.email, "site": reservation["site"]}
    path = path.format(**ids)
    if isinstance(body, dict):
        body = {k: v.format(**ids) if isinstance(v, str) else v for k, v in body.items()}
    before = counts()
    records_before = IdempotencyRecord.objects.count()
    response = owner_client.post(path, body, format="json", HTTP_IDEMPOTENCY_KEY="bad-input")
    error = assert_error(response, status, code)
    assert error["field"] == field
    assert counts() == before
    # The refusal itself is remembered for the Idempotency-Key (a retry gets the same answer).
    assert IdempotencyRecord.objects.count() == records_before + 1


@pytest.mark.parametrize(
    "body,status,code,field",
    [
        ({"role": "emperor"}, 400, "invalid_choice", "role"),
        ({}, 400, "required", "role"),
    ],
)
def test_bad_input_on_member_patch_changes_nothing(owner_client, owner, body, status, code, field):
    before = counts()
    response = owner_client.patch(
        f"/api/v1/organization/members/{owner.public_id}", body, format="json"
    )
    assert_error(response, status, code, field)
    assert counts() == before


def test_a_body_that_is_not_json_is_refused(owner_client, market):
    before = counts()
    response = owner_client.post(
        "/api/v1/reservations", "{not json", content_type="application/json"
    )
    assert_error(response, 400, "parse_error")
    assert counts() == before


@pytest.mark.parametrize(
    "path,param",
    [
        # A misspelt filter would list everything instead of what was asked for.
        ("/api/v1/reservations?stauts=active", "stauts"),
        ("/api/v1/reservations?status=active&created_afer=2030-01-01T00:00:00Z", "created_afer"),
        ("/api/v1/events?page=2", "page"),  # another API's paging: this one has cursors
        ("/api/v1/gpu-models?offset=25", "offset"),
        (f"/api/v1/availability?end={START}&start=2098-12-31T00:00:00Z&gpu_modle=x", "gpu_modle"),
        ("/api/v1/billing/usage?from=2030-01-01", "from"),
        ("/api/v1/billing/usage.csv?since=2030-01-01&unitl=2030-02-01", "unitl"),
    ],
)
def test_an_unknown_query_parameter_is_refused(owner_client, market, path, param):
    response = owner_client.get(path)
    error = assert_error(response, 400, "unknown_parameter", param)
    assert "this request takes" in error["message"]


@pytest.mark.parametrize(
    "path", ["/api/v1/reservations?format=xml", "/api/v1/gpu-models?format=jsn"]
)
def test_a_format_the_api_does_not_answer_in_is_bad_input_not_a_missing_endpoint(
    owner_client, market, path
):
    # DRF answers it 404 not_found, as if the endpoint did not exist.
    error = assert_error(owner_client.get(path), 400, "invalid_choice", "format")
    assert "json" in error["message"]


def test_a_query_parameter_on_a_write_is_refused_and_writes_nothing(owner_client, market):
    before = counts()
    records_before = IdempotencyRecord.objects.count()
    response = owner_client.post(
        "/api/v1/reservations?gpu_count=8", reservation_body(), format="json",
        HTTP_IDEMPOTENCY_KEY="query-on-post",
    )  # fmt: skip
    assert_error(response, 400, "unknown_parameter", "gpu_count")
    assert counts() == before and IdempotencyRecord.objects.count() == records_before


def test_the_parameters_an_operation_documents_are_taken(owner_client, market):
    """Filters, paging, a query serializer's fields and format."""
    body = reservation_body()
    window = f"start={body['starts_at']}&end={body['ends_at']}".replace("+", "%2B")
    for path in (
        "/api/v1/reservations?status=active&created_after=2030-01-01T00:00:00Z&limit=5",
        "/api/v1/events?type=reservation.active&limit=1&format=json",
        f"/api/v1/availability?{window}&gpu_count=1",
        "/api/v1/billing/usage?since=2030-01-01&until=2030-02-01",
    ):
        assert owner_client.get(path).status_code == 200, path


@pytest.mark.parametrize(
    "path, param",
    [
        ("/api/v1/reservations?tier=on_demand&tier=reserved", "tier"),
        ("/api/v1/reservations?limit=5&limit=100", "limit"),
        ("/api/v1/events?created_after=2030-01-01T00:00:00Z&created_after=2020-01-01T00:00:00Z",
         "created_after"),
        ("/api/v1/availability?gpu_count=1&gpu_count=8", "gpu_count"),
        ("/api/v1/audit-log?actor=user:a&actor=user:b", "actor"),
    ],
)  # fmt: skip
def test_a_single_valued_query_parameter_given_twice_is_refused(owner_client, market, path, param):
    """Read as its last value, the first would silently not apply: ?tier=on_demand&tier=reserved
    would list reserved reservations only."""
    error = assert_error(owner_client.get(path), 400, "repeated_parameter", param)
    assert "2 times" in error["message"]


def test_a_multi_valued_filter_may_be_repeated(owner_client, market):
    mine = make_reservation(owner_client)
    for path in (
        "/api/v1/reservations?status=pending&status=scheduled",
        "/api/v1/events?type=reservation.created&type=reservation.active",
        "/api/v1/resale/listings?status=open&status=sold",
    ):
        assert owner_client.get(path).status_code == 200, path
    listed = owner_client.get("/api/v1/reservations?status=pending&status=scheduled").json()
    assert [r["id"] for r in listed["results"]] == [mine["id"]]


@pytest.mark.parametrize(
    "workload_or_count, field",
    [
        ({"workload": {"ports": ["2_2"]}}, "workload.ports"),
        ({"workload": {"ports": ["\uff12\uff12"]}}, "workload.ports"),  # full-width digits
        ({"workload": {"ports": ["\u0662\u0662"]}}, "workload.ports"),  # Arabic-Indic digits
        ({"gpu_count": 2.0}, "gpu_count"),  # a JSON fraction is not a whole number
    ],
)
def test_numbers_inside_lists_and_fractions_are_read_strictly(
    owner_client, market, workload_or_count, field
):
    before = counts()
    response = owner_client.post(
        "/api/v1/reservations", {**reservation_body(), **workload_or_count}, format="json"
    )
    assert_error(response, 400, "invalid", field)
    assert counts() == before


@pytest.mark.parametrize("reason", [5, True, 1.5, ["late"]])
def test_text_sent_as_anything_but_text_is_refused_and_changes_nothing(
    owner_client, market, reason
):
    # DRF alone kept {"reason": 5} as "5" and true as "True".
    made = owner_client.post("/api/v1/reservations", reservation_body(), format="json").json()
    before = counts()

    response = owner_client.post(
        f"/api/v1/reservations/{made['id']}/cancel", {"reason": reason}, format="json"
    )

    assert_error(response, 400, "invalid", "reason")
    assert counts() == before
    assert owner_client.get(f"/api/v1/reservations/{made['id']}").json()["status"] == "pending"


def test_one_answer_names_every_field_that_is_wrong(owner_client, market):
    body = {**reservation_body(), "gpu_count": "1e3", "ends_at": "nope", "tier": "bad"}
    response = owner_client.post("/api/v1/reservations", body, format="json")
    error = assert_error(response, 400)
    assert {e["field"] for e in error["errors"]} == {"gpu_count", "ends_at", "tier"}


@pytest.mark.parametrize(
    "query",
    [
        "/api/v1/reservations?created_after=0001-01-01T00:00:00Z",
        "/api/v1/reservations?updated_after=2150-01-01T00:00:00Z",
        "/api/v1/events?created_before=1900-01-01T00:00:00Z",
        "/api/v1/audit-log?created_after=9999-12-31T23:59:59-05:00",
    ],
)
def test_filter_times_are_read_from_2000_to_2099(owner_client, market, query):
    field = query.split("?")[1].split("=")[0]
    assert_error(owner_client.get(query), 400, "out_of_range", field)


def test_a_list_far_over_its_limit_is_refused_unread_and_writes_nothing(owner_client, market):
    # 400,000 ports in a 2 MB body: DRF read (and refused) each one before counting them,
    # 17 s of a web worker's CPU for one request.
    before = counts()
    body = {**reservation_body(), "workload": {"image": "x", "ports": ["a"] * 400_000}}
    response = owner_client.post("/api/v1/reservations", body, format="json")
    error = assert_error(response, 400, "max_length", "workload.ports")
    assert error["message"] == "Ensure this field has no more than 16 elements."
    assert "errors" not in error
    assert counts() == before


def test_an_answer_names_at_most_max_unknown_reported_unknown_fields(owner_client, market):
    # Each of 150,000 unknown keys was named, with the fields the request takes: 17 MB back.
    before = counts()
    body = {"name": "x", "public_key": ssh_key(), **{f"k{i:06d}": 1 for i in range(150_000)}}
    response = owner_client.post("/api/v1/ssh-keys", body, format="json")
    error = assert_error(response, 400, "unknown_field", "k000000")
    assert [e["field"] for e in error["errors"]] == [
        f"k{i:06d}" for i in range(MAX_UNKNOWN_REPORTED)
    ]
    assert len(response.content) < 20_000
    assert counts() == before
