"""Stored results of POST requests made with an Idempotency-Key header.

A retry with the same key and the same request gets the first response again instead of
repeating the action. See config.api.idempotency for the protocol.
"""

from django.db import models

from marketplace.models.core import Organization

__all__ = ["IdempotencyRecord"]


class IdempotencyRecord(models.Model):
    """One (organisation, principal, key): the request's fingerprint and, once done, its response.

    response_status is null while the first request is still running ("in flight").
    """

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="idempotency_records"
    )
    principal = models.CharField(
        max_length=40, help_text="Who sent it: key:<api key id> or user:<user id>."
    )
    key = models.CharField(max_length=255)
    request_hash = models.CharField(max_length=64, help_text="SHA-256 of method, path and body.")
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.TextField(
        null=True,
        blank=True,
        help_text="The response body as it was sent (JSON text), replayed byte for byte.",
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "principal", "key"], name="idempotency_key_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.principal} {self.key}"
