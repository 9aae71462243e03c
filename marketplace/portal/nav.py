"""The portal's navigation, the overview's panels, and the context every portal page renders with.

Billing adds its pages at start-up (billing.apps) through portal_nav_register, and its panel
on the overview through portal_overview_panel_register, so the marketplace's pages show them
without importing billing.
"""

from collections.abc import Callable
from dataclasses import dataclass

from django.http import HttpRequest

from marketplace.services.organizations import MANAGER_ROLES

__all__ = [
    "NavItem",
    "portal_nav_register",
    "portal_nav",
    "portal_context",
    "portal_overview_panel_register",
    "portal_overview_panels",
    "portal_funding_register",
    "portal_funding",
]


@dataclass(frozen=True)
class NavItem:
    label: str
    url_name: str
    order: int
    # The item is current on every page whose view name starts with one of these.
    sections: tuple[str, ...] = ()
    # Shown only to members with one of these roles (None: everyone), as its page allows.
    roles: frozenset | None = None

    def is_current(self, view_name: str) -> bool:
        return view_name == self.url_name or view_name.startswith(self.sections)


_items: dict[str, NavItem] = {}


def portal_nav_register(
    *,
    label: str,
    url_name: str,
    order: int,
    sections: tuple[str, ...] = (),
    roles: frozenset | None = None,
) -> None:
    _items[url_name] = NavItem(
        label=label, url_name=url_name, order=order, sections=sections, roles=roles
    )


def portal_nav() -> list[NavItem]:
    return sorted(_items.values(), key=lambda item: item.order)


portal_nav_register(label="Overview", url_name="portal:dashboard", order=10)
portal_nav_register(
    label="Find GPUs", url_name="portal:search", order=20, sections=("portal:quote",)
)
portal_nav_register(label="Sites", url_name="portal:sites", order=25, sections=("portal:site",))
portal_nav_register(
    label="Reservations", url_name="portal:reservations", order=30, sections=("portal:reservation",)
)
portal_nav_register(label="Resale", url_name="portal:resale", order=35, sections=("portal:resale",))
portal_nav_register(
    label="API keys",
    url_name="portal:api-keys",
    order=60,
    sections=("portal:api-key",),
    roles=MANAGER_ROLES,
)
portal_nav_register(
    label="SSH keys", url_name="portal:ssh-keys", order=65, sections=("portal:ssh-key",)
)
portal_nav_register(
    label="Webhooks",
    url_name="portal:webhooks",
    order=68,
    sections=("portal:webhook",),
    roles=MANAGER_ROLES,
)
portal_nav_register(label="Audit log", url_name="portal:audit-log", order=75, roles=MANAGER_ROLES)
portal_nav_register(
    label="Team", url_name="portal:team", order=70, sections=("portal:team", "portal:member")
)


@dataclass(frozen=True)
class _Panel:
    template_name: str
    context: Callable  # (membership) -> dict
    order: int


_panels: dict[str, _Panel] = {}


def portal_overview_panel_register(*, template_name: str, context: Callable, order: int) -> None:
    """A panel on the overview: `template_name` rendered with `panel` = context(membership)."""
    _panels[template_name] = _Panel(template_name=template_name, context=context, order=order)


def portal_overview_panels(membership) -> list[tuple[str, dict]]:
    return [
        (panel.template_name, panel.context(membership))
        for panel in sorted(_panels.values(), key=lambda p: p.order)
    ]


_funding: list[Callable] = []


def portal_funding_register(summary: Callable) -> None:
    """What a commitment asks of the organisation's money (billing registers it):
    summary(membership, tier=, gpu_count=, price_per_gpu_hour=, total_amount=, currency=,
    starts_at=, ends_at=) -> {"due_now", "balance", "covered", "postpaid", ...}."""
    _funding[:] = [summary]


def portal_funding(membership, **commitment) -> dict | None:
    """The registered summary of a commitment, or None in a deployment without billing."""
    return _funding[0](membership, **commitment) if _funding else None


def portal_context(request: HttpRequest) -> dict:
    """Template context processor: the nav, and the organisation the member acts for."""
    membership = getattr(request, "portal_membership", None)
    match = getattr(request, "resolver_match", None)
    view_name = match.view_name if match else ""
    return {
        "portal_nav": [
            (item, item.is_current(view_name))
            for item in portal_nav()
            if membership and (item.roles is None or membership.role in item.roles)
        ],
        "portal_membership": membership,
        "portal_organization": membership.organization if membership else None,
    }
