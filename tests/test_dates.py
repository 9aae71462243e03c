"""Times written into JSON and exports read as the API's own fields do: UTC with "Z"."""

from datetime import UTC, datetime, timedelta, timezone

from config.dates import iso_utc, iso_utc_within


def test_a_time_is_written_in_utc_with_z():
    two_hours_east = timezone(timedelta(hours=2))
    assert iso_utc(datetime(2026, 12, 1, 2, 0, tzinfo=two_hours_east)) == "2026-12-01T00:00:00Z"
    assert iso_utc(datetime(2026, 12, 1, 0, 0, 0, 500, tzinfo=UTC)) == (
        "2026-12-01T00:00:00.000500Z"
    )


def test_times_kept_with_plus_zero_are_shown_with_z_and_nothing_else_changes():
    kept = {
        "at": "2026-12-06T10:00:00+00:00",
        "extensions": [{"from": "2026-12-06T10:00:00.250000+00:00", "total": "+00:00"}],
        "note": "ends 2026-12-06T10:00:00+00:00",  # prose, not a time
        "count": 3,
        "local": "2026-12-06T12:00:00+02:00",  # not UTC: as kept
    }

    assert iso_utc_within(kept) == {
        "at": "2026-12-06T10:00:00Z",
        "extensions": [{"from": "2026-12-06T10:00:00.250000Z", "total": "+00:00"}],
        "note": "ends 2026-12-06T10:00:00+00:00",
        "count": 3,
        "local": "2026-12-06T12:00:00+02:00",
    }
