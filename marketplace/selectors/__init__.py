"""Marketplace read selectors, shared by the portal, the API and the admin."""
