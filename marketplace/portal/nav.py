"""The portal's navigation, and the context every portal page renders with.

Billing adds its pages at start-up (billing.apps) through portal_nav_register, so the
marketplace's base template links to them without importing billing.
"""

from dataclasses import dataclass

from django.http import HttpRequest

__all__ = ["NavItem", "portal_nav_register", "portal_nav", "portal_context"]


@dataclass(frozen=True)
class NavItem:
    label: str
    url_name: str
    order: int


_items: dict[str, NavItem] = {}


def portal_nav_register(*, label: str, url_name: str, order: int) -> None:
    _items[url_name] = NavItem(label=label, url_name=url_name, order=order)


def portal_nav() -> list[NavItem]:
    return sorted(_items.values(), key=lambda item: item.order)


portal_nav_register(label="Overview", url_name="portal:dashboard", order=10)
portal_nav_register(label="Find GPUs", url_name="portal:search", order=20)
portal_nav_register(label="Reservations", url_name="portal:reservations", order=30)
portal_nav_register(label="API keys", url_name="portal:api-keys", order=60)
portal_nav_register(label="Team", url_name="portal:team", order=70)


def portal_context(request: HttpRequest) -> dict:
    """Template context processor: the nav, and the organisation the member acts for."""
    membership = getattr(request, "portal_membership", None)
    return {
        "portal_nav": portal_nav(),
        "portal_membership": membership,
        "portal_organization": membership.organization if membership else None,
    }
