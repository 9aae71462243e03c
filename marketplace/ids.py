"""Public identifiers in the Stripe style: a short type prefix and a random body (res_8fK2…)."""

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def new_public_id(prefix: str, length: int = 20) -> str:
    return f"{prefix}_" + "".join(secrets.choice(_ALPHABET) for _ in range(length))


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
