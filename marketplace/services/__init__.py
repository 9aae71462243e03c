"""Marketplace write services, one module per area (see STYLE.md: services do the writes)."""
