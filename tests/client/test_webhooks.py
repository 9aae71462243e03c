"""switchyard.webhooks.verify_signature against the headers the server's own signer writes."""

import json

import pytest
from switchyard.webhooks import SignatureError, verify_signature

from marketplace.services.webhooks import webhook_signature

BODY = json.dumps({"id": "evt_1", "type": "reservation.active"}).encode()
NOW = 1_765_016_467


def test_during_a_rotation_either_secret_or_both_verify():
    header = webhook_signature(payload=BODY, secrets_=["whsec_new", "whsec_old"], timestamp=NOW)
    for secret in (
        "whsec_new",
        "whsec_old",
        ["whsec_old", "whsec_new"],
        ("whsec_other", "whsec_new"),
    ):
        assert (
            verify_signature(payload=BODY, header=header, secret=secret, now=NOW)["id"] == "evt_1"
        )
    with pytest.raises(SignatureError):
        verify_signature(payload=BODY, header=header, secret=["whsec_other", "whsec_x"], now=NOW)


@pytest.mark.parametrize(
    "header",
    [
        "t=²,v1=00",  # a digit int() refuses: was a ValueError
        "t=1765016467,v1=é",  # compare_digest refuses non-ASCII str: was a TypeError
        "",
    ],
)
def test_a_malformed_header_is_a_signature_error_not_a_crash(header):
    with pytest.raises(SignatureError):
        verify_signature(payload=BODY, header=header, secret="whsec_x", now=NOW)


def test_an_empty_secret_is_refused_not_a_key_anyone_can_sign_with():
    header = webhook_signature(payload=BODY, secrets_=[""], timestamp=NOW)
    for secret in ("", [], ["whsec_x", ""]):
        with pytest.raises(ValueError, match="signing secret"):
            verify_signature(payload=BODY, header=header, secret=secret, now=NOW)


def test_an_old_signature_is_a_replay():
    header = webhook_signature(payload=BODY, secrets_=["whsec_x"], timestamp=NOW)
    with pytest.raises(SignatureError, match="301 s from now"):
        verify_signature(payload=BODY, header=header, secret="whsec_x", now=NOW + 301)
    assert verify_signature(payload=BODY, header=header, secret="whsec_x", now=NOW + 300)
