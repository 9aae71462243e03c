"""The audit log's one writer. Services call audit_record in their own transaction."""

from django.db.models import Model

from config.db import model_insert
from marketplace.audit import audit_context
from marketplace.models import AuditEntry

__all__ = ["audit_record", "audit_changes"]


def audit_record(
    *,
    organization_id: int,
    action: str,
    object_type: str,
    object_id: str,
    changes: dict | None = None,
    actor: str | None = None,
) -> AuditEntry | None:
    """Record `action` by whoever acts in this request (or `actor`, named by a service that
    knows who asked, e.g. staff forcing a curtailment); None when nobody is known."""
    context = audit_context()
    actor = (context.actor if context is not None else None) or actor
    if not actor:
        return None
    return model_insert(
        AuditEntry(
            organization_id=organization_id,
            actor=actor,
            action=action,
            object_type=object_type,
            object_id=object_id,
            changes=changes or {},
            ip_address=context.ip_address if context is not None else None,
            user_agent=context.user_agent if context is not None else "",
        )
    )


def audit_changes(before: dict, after: dict) -> dict:
    """{"before": …, "after": …} of the fields whose value changed (JSON-ready values)."""
    changed = sorted(k for k in after if before.get(k) != after.get(k))
    return {
        "before": {k: _plain(before.get(k)) for k in changed},
        "after": {k: _plain(after.get(k)) for k in changed},
    }


def _plain(value):
    if isinstance(value, Model):
        return str(value.pk)
    if value is None or isinstance(value, bool | int | str | list | dict):
        return value
    return str(value)  # Decimal, datetime: as text, exactly
