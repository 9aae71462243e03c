"""See marketplace/models/__init__.py."""
