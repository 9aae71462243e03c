"""Verify that a webhook delivery came from Switchyard.

    from switchyard.webhooks import verify_signature, SignatureError

    event = verify_signature(payload=request.body, header=request.headers["Switchyard-Signature"],
                             secret="whsec_…")

`secret` may also be a list of secrets (the one you use and the one you are rotating to), so a
receiver can be deployed with both while a rotation is under way and switch at its leisure.

The header is `t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`; after a secret
rotation it carries one v1 per secret that signs (the new one and each replaced one still in
its overlap).
A signature is accepted if any v1 matches and t is within `tolerance` seconds of now, so a
captured delivery cannot be replayed later.
"""

import hashlib
import hmac
import json
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["SignatureError", "DEFAULT_TOLERANCE", "sign", "verify_signature"]

DEFAULT_TOLERANCE = 300  # seconds


class SignatureError(Exception):
    """The delivery is not signed with your secret, or is too old (a replay)."""


def sign(*, payload: bytes, secret: str, timestamp: int) -> str:
    """The signature header Switchyard sends for `payload` (useful in your own tests)."""
    mac = hmac.new(secret.encode(), b"%d." % timestamp + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    *,
    payload: bytes,
    header: str,
    secret: str | Iterable[str],
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> dict[str, Any]:
    """Check the signature and the time; return the event (the parsed body) or raise."""
    timestamp, signatures = None, []
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        # ASCII digits only: int() would also read "١٢٣", and refuse "²" with a ValueError.
        if name == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif name == "v1" and value:
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError("No t=… and v1=… in the Switchyard-Signature header.")
    secrets_ = [secret] if isinstance(secret, str) else list(secret)
    # An empty secret (an unset variable) would accept what anyone signs with the empty key.
    if not secrets_ or not all(isinstance(s, str) and s for s in secrets_):
        raise ValueError("secret: the endpoint's signing secret (whsec_…), or a list of them.")
    signed = b"%d." % timestamp + payload
    expected = [hmac.new(s.encode(), signed, hashlib.sha256).hexdigest().encode() for s in secrets_]
    # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a "no").
    if not any(
        hmac.compare_digest(mac, candidate.encode("ascii", "replace"))
        for mac in expected
        for candidate in signatures
    ):
        raise SignatureError("No signature matches this secret and body.")
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        raise SignatureError(
            f"The signature is {int(abs(now - timestamp))} s from now (tolerance {tolerance} s): "
            "a replay, or a clock far off."
        )
    return json.loads(payload)
