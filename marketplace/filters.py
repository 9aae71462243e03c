"""django-filter filter sets that the API and the portal share, so a list filters the same way
whichever way a customer comes in."""

import django_filters

from config.api.filters import BoundedIsoDateTimeFilter
from marketplace.models import Reservation, ReservationStatus, Tier

__all__ = ["ReservationFilter"]


class ReservationFilter(django_filters.FilterSet):
    status = django_filters.MultipleChoiceFilter(
        choices=ReservationStatus.choices, help_text="Repeat for several: ?status=a&status=b."
    )
    tier = django_filters.ChoiceFilter(choices=Tier.choices)
    site = django_filters.CharFilter(field_name="site__slug")
    gpu_model = django_filters.CharFilter(field_name="gpu_model__slug")
    created_after = BoundedIsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = BoundedIsoDateTimeFilter(field_name="created_at", lookup_expr="lt")
    updated_after = BoundedIsoDateTimeFilter(
        field_name="updated_at",
        lookup_expr="gte",
        help_text="Changed at or after this time (status, end, interruption notice): to sync, "
        "ask with the time of your last sync.",
    )

    class Meta:
        model = Reservation
        fields = [
            "status",
            "tier",
            "site",
            "gpu_model",
            "created_after",
            "created_before",
            "updated_after",
        ]
