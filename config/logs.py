"""Log formats for every process (web, Celery workers, beat): JSON lines in production, the
plain format under `make run` (LOG_FORMAT), and the same redaction for both.

Each JSON line has time, level, logger, message and request_id (the HTTP request being served,
or the one that enqueued the running task; "-" otherwise), plus task and task_id in workers.
Redaction runs on the finished line, so a secret cannot slip through a message argument, an
`extra` field or an exception's text: API keys, node tokens, Stripe keys and client secrets,
webhook and demand-response signing secrets, bearer credentials, password and token fields,
one-use links and card numbers.
"""

import logging
import re
from datetime import UTC, datetime

from pythonjsonlogger.json import JsonFormatter

__all__ = ["JsonLogFormatter", "PlainLogFormatter", "redact"]

_REDACTED = "[redacted]"

_PATTERNS = [
    # Authorization: Bearer <anything>, Basic <anything>
    (re.compile(r"\b(Bearer|Basic)\s+[^\s\"',]+", re.I), r"\1 " + _REDACTED),
    # Our secrets: API keys (sy_live_<prefix>_<secret>), node tokens (nt_<prefix>_<secret>)
    (re.compile(r"\b(sy_live|nt)_([A-Za-z0-9]+)_[A-Za-z0-9_\-]{8,}"), r"\1_\2_" + _REDACTED),
    # Stripe: secret and restricted keys, webhook secrets, PaymentIntent/SetupIntent secrets
    (re.compile(r"\b(sk|rk)_(live|test)_[A-Za-z0-9]+"), r"\1_\2_" + _REDACTED),
    # Webhook signing secrets: Stripe's, and ours (customers' endpoints, grid operators' demand-
    # response calls: token_urlsafe, so "-" and "_" inside).
    (re.compile(r"\b(whsec|drs)_[A-Za-z0-9_\-]+"), r"\1_" + _REDACTED),
    (re.compile(r"\b((?:pi|seti)_[A-Za-z0-9]+)_secret_[A-Za-z0-9]+"), r"\1_secret_" + _REDACTED),
    # key=value and "key": "value" pairs whose name says they are secret
    (
        re.compile(
            r"""(["']?\b(?:password|passwd|secret|token|api_key|authorization|cvc|card_number)\b"""
            r"""["']?\s*[:=]\s*)(\\?["']?)(?!\[redacted\]|Bearer\b|Basic\b)[^\s"'&,}\\]+""",
            re.I,
        ),
        r"\1\2" + _REDACTED,
    ),
    # One-use links: invitations and password resets
    (re.compile(r"(/invitations/)[^/\s\"'?]+"), r"\1" + _REDACTED),
    (re.compile(r"(/password-reset/[^/\s\"'?]+/)[^/\s\"'?]+"), r"\1" + _REDACTED),
]
# 13 to 19 digits, optionally in groups separated by single spaces or hyphens.
_CARD = re.compile(r"(?<![\d.])\d(?:[ -]?\d){12,18}(?![\d.])")


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _redact_card(match: re.Match) -> str:
    digits = re.sub(r"[ -]", "", match.group())
    return _REDACTED if _luhn_valid(digits) else match.group()


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return _CARD.sub(_redact_card, text)


class JsonLogFormatter(JsonFormatter):
    def __init__(self, *args, **kwargs):
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            **kwargs,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class PlainLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
