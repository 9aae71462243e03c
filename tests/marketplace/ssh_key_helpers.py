"""Saved-SSH-key test helpers: distinct valid keys, and their fingerprints computed apart."""

import base64
import hashlib

from tests.provisioning_support import ssh_key

__all__ = ["key_bytes", "expected_fingerprint", "ssh_key"]


def key_bytes(n: int) -> bytes:
    """32 bytes of ed25519 key material, distinct for each n below 256."""
    return bytes((n + i) % 256 for i in range(32))


def expected_fingerprint(key_type: str, body: bytes) -> str:
    """OpenSSH's SHA256 fingerprint, from the key's parts (not from the line under test)."""
    blob = b"".join(len(p).to_bytes(4, "big") + p for p in (key_type.encode(), body))
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
