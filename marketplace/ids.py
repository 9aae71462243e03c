"""Public identifiers in the Stripe style: a short type prefix and a random body (res_8fK2…)."""

import secrets
import string
from datetime import UTC, datetime

from django.utils.crypto import constant_time_compare, salted_hmac

_ALPHABET = string.ascii_letters + string.digits


def new_public_id(prefix: str, length: int = 20) -> str:
    return f"{prefix}_{_random_text(length)}"


def _random_text(length: int) -> str:
    # Random bytes below 248 (4 × 62) taken modulo 62: every character equally likely, and
    # cheaper than a secrets.choice per character (several of these are made per booking).
    body: list[str] = []
    while len(body) < length:
        body += [_ALPHABET[b % 62] for b in secrets.token_bytes(length + 4) if b < 248]
    return "".join(body[:length])


def org_id() -> str:
    return new_public_id("org")


def quote_id(*, expires_at: datetime | None = None) -> str:
    """With `expires_at`: quo_ + its expiry (6 base-62 digits, in seconds) + 12 random + an
    8-digit MAC of the rest under SECRET_KEY, so once retention has deleted the quote an id of
    ours is still known to be expired (quote_id_expires_at), without a record of it."""
    if expires_at is None:
        return new_public_id("quo")
    stamp = _base62(int(expires_at.timestamp()), 6) + _random_text(12)
    return f"quo_{stamp}{_quote_mac(stamp)}"


def quote_id_expires_at(public_id: str) -> datetime | None:
    """The expiry a quote id of ours carries; None for any other string (a forged one too)."""
    body = public_id.removeprefix("quo_")
    if len(body) != 26 or body == public_id or not set(body) <= _ALPHABET_SET:
        return None
    stamp, mac = body[:18], body[18:]
    if not constant_time_compare(mac, _quote_mac(stamp)):
        return None
    return datetime.fromtimestamp(_base62_value(stamp[:6]), UTC)


_ALPHABET_SET = frozenset(_ALPHABET)


def _quote_mac(stamp: str) -> str:
    digest = salted_hmac("marketplace.quote_id", stamp, algorithm="sha256").digest()
    return _base62(int.from_bytes(digest[:8]), 11)[-8:]


def _base62(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def _base62_value(digits: str) -> int:
    value = 0
    for digit in digits:
        value = value * 62 + _ALPHABET.index(digit)
    return value


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


def ledger_entry_id() -> str:
    return new_public_id("led")


def top_up_id() -> str:
    return new_public_id("tu")
