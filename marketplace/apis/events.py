"""GET events (newest first, filtered) and events/{id}: what changed, as the API showed it."""

import django_filters
from drf_spectacular.utils import extend_schema
from rest_framework.response import Response

from config.api.filters import BoundedIsoDateTimeFilter
from config.api.pagination import NewestFirstCursorPagination
from config.api.schema import errors
from config.api.views import FILTERED, ApiView
from config.replica import replica_reads
from marketplace.models import Event, EventType
from marketplace.selectors.events import event_get_for_org, event_list_for_org
from marketplace.serializers import EventOutput

TAGS = ["Events"]


class EventFilter(django_filters.FilterSet):
    type = django_filters.MultipleChoiceFilter(
        choices=EventType.choices, help_text="Repeat for several: ?type=a&type=b."
    )
    created_after = BoundedIsoDateTimeFilter(field_name="created_at", lookup_expr="gt")
    created_before = BoundedIsoDateTimeFilter(field_name="created_at", lookup_expr="lt")
    object_id = django_filters.CharFilter(
        max_length=64, help_text="Only the events of this object (res_…, lst_…, key_…, mem_…)."
    )

    class Meta:
        model = Event
        fields = ["type", "created_after", "created_before", "object_id"]


class EventListApi(ApiView):
    pagination_class = NewestFirstCursorPagination
    filter_backends = FILTERED
    filterset_class = EventFilter

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Event.objects.none()
        return event_list_for_org(organization=self.organization).select_related("organization")

    @replica_reads
    @extend_schema(
        tags=TAGS,
        operation_id="events_list",
        summary="List events, newest first (kept for at least 30 days)",
        responses={200: EventOutput(many=True), **errors(400, 403, 404)},
    )
    def get(self, request):
        return self.paginated_response(self.filter_queryset(self.get_queryset()), EventOutput)


class EventDetailApi(ApiView):
    @extend_schema(
        tags=TAGS,
        operation_id="events_retrieve",
        summary="Retrieve an event",
        responses={200: EventOutput, **errors(403, 404)},
    )
    def get(self, request, event_id: str):
        event = event_get_for_org(organization=self.organization, public_id=event_id)
        return Response(EventOutput(event).data)
