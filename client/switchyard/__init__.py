"""Switchyard's Python SDK. See docs/integrators.md."""

__version__ = "0.1.0"
