"""Switchyard's Python SDK. See docs/integrators.md."""

__version__ = "0.1.0"

from switchyard.client import OPERATIONS, Client  # noqa: E402
from switchyard.errors import *  # noqa: E402, F403
from switchyard.webhooks import SignatureError, verify_signature  # noqa: E402

__all__ = ["Client", "OPERATIONS", "SignatureError", "verify_signature"]
