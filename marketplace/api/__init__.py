"""Plumbing for the public API: the base view, org context, throttling, idempotency, paging."""
