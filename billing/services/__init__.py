"""Billing services (writes). Each module owns one area; see its docstring."""

__all__: list[str] = []
