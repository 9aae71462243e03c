"""Plumbing every app's public API endpoints (`<app>/apis.py`, `marketplace/apis/`) share: the
error shape (errors), the base view (views), organisation context, idempotency, throttling,
paging and schema. It reads marketplace's identity models (organisations, members, keys,
idempotency records); the endpoints import it, never the reverse."""
