"""Public identifiers in the Stripe style: a short type prefix and a random body (res_8fK2…)."""

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def new_public_id(prefix: str, length: int = 20) -> str:
    # Random bytes below 248 (4 × 62) taken modulo 62: every character equally likely, and
    # cheaper than a secrets.choice per character (several of these are made per booking).
    body: list[str] = []
    while len(body) < length:
        body += [_ALPHABET[b % 62] for b in secrets.token_bytes(length + 4) if b < 248]
    return f"{prefix}_{''.join(body[:length])}"


def org_id() -> str:
    return new_public_id("org")


def quote_id() -> str:
    return new_public_id("quo")


def reservation_id() -> str:
    return new_public_id("res")


def ssh_key_id() -> str:
    return new_public_id("ssh")


def invitation_id() -> str:
    return new_public_id("inv")


def event_id() -> str:
    return new_public_id("evt")


def webhook_endpoint_id() -> str:
    return new_public_id("we")


def webhook_delivery_id() -> str:
    return new_public_id("whd")


def audit_entry_id() -> str:
    return new_public_id("aud")


def member_id() -> str:
    return new_public_id("mem")


def api_key_id() -> str:
    return new_public_id("key")


def listing_id() -> str:
    return new_public_id("lst")
