"""The audit log: who changed what in an organisation, from where. Append-only in the database.

Written by the services that make the changes, in the same transaction, with the actor and
the client taken from the request being served (marketplace.audit); a change made by no
person or key (a task, the funding policy) is not an audit entry (its event and history
record it).
"""

from django.db import models

from marketplace import ids
from marketplace.models.core import Organization

__all__ = ["AuditEntry"]


class AuditEntry(models.Model):
    public_id = models.CharField(
        max_length=32, unique=True, default=ids.audit_entry_id, editable=False
    )
    # PROTECT: the log outlives nothing it is about; rows are never updated or deleted.
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="audit_entries"
    )
    actor = models.CharField(
        max_length=160, help_text="user:<username>, api_key:<prefix> or staff:<username>."
    )
    action = models.CharField(max_length=64, help_text="e.g. api_key.create, reservation.cancel.")
    object_type = models.CharField(max_length=32)
    object_id = models.CharField(max_length=64)
    changes = models.JSONField(
        default=dict, blank=True, help_text="{before, after} of what changed; never secrets."
    )
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=400, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            models.Index(fields=["organization", "-created_at", "-id"], name="audit_org_created"),
            models.Index(fields=["organization", "actor"], name="audit_org_actor"),
            models.Index(fields=["organization", "action"], name="audit_org_action"),
            # The admin's search, across organisations: an object's trail, an actor's acts.
            models.Index(fields=["object_id"], name="audit_object"),
            models.Index(fields=["actor"], name="audit_actor"),
        ]

    def __str__(self) -> str:
        return f"{self.actor} {self.action} {self.object_id}"
