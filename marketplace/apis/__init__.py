"""DRF views of the public API (/api/v1/), one module per resource."""
