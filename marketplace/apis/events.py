"""GET events (newest first, filtered; or the forward feed a poller follows) and events/{id}."""

import functools
from collections.abc import Iterable

import django_filters
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ErrorDetail
from rest_framework.response import Response
from rest_framework.utils.urls import remove_query_param, replace_query_param

from config.api.context import OrgContext
from config.api.filters import BoundedIsoDateTimeFilter
from config.api.pagination import NewestFirstCursorPagination
from config.api.schema import errors
from config.api.serializers import Serializer
from config.api.views import FILTERED, ApiView
from config.errors import NotFound, PermissionDenied, ValidationFailed
from config.replica import replica_reads
from marketplace.apis.api_keys import ApiKeyListApi
from marketplace.models import Event, EventType
from marketplace.selectors.events import (
    event_feed_for_org,
    event_feed_head,
    event_feed_position,
    event_feed_snapshot,
    event_get_for_org,
    event_list_for_org,
)
from marketplace.serializers import EventOutput

TAGS = ["Events"]

NEWEST, OLDEST = "newest", "oldest"

# An event shows its object as the API does, so it is shown only to a caller that may list
# such objects: event type prefix → that list endpoint, whose read rule (roles, key scopes)
# applies. The families not named here are listed to every role and every reading key, as
# events are (tests/marketplace/test_event_visibility.py holds each family to its endpoint).
EVENT_FAMILY_LISTS: dict[str, type[ApiView]] = {
    "api_key.": ApiKeyListApi,
}


def event_families_hidden(org_context: OrgContext) -> dict[str, PermissionDenied]:
    """The event families (type prefixes) `org_context`'s caller may not see, each with why:
    the refusal of the family's list endpoint."""
    hidden = {}
    for prefix, list_view in EVENT_FAMILY_LISTS.items():
        refusal = list_view().access_refusal(method="GET", org_context=org_context)
        if refusal is not None:
            hidden[prefix] = refusal
    return hidden


def event_types_hidden(org_context: OrgContext) -> dict[str, PermissionDenied]:
    """The event types `org_context`'s caller may not see, each with why."""
    return {
        t: refusal
        for prefix, refusal in event_families_hidden(org_context).items()
        for t in EventType.values
        if t.startswith(prefix)
    }


def event_types_check_asked(
    asked: Iterable[str], *, hidden: dict[str, PermissionDenied], field: str
) -> None:
    """Asking by type for events the caller may not see (a filter, a webhook subscription) is
    refused, as listing their objects is, rather than answered with nothing for ever."""
    for event_type in asked:
        refusal = hidden.get(event_type)
        if refusal is not None:
            raise PermissionDenied(
                f"{event_type} events are shown only to those who may list their objects: "
                f"{refusal.message}",
                code=refusal.code,
                field=field,
            )


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


class EventListInput(Serializer):
    order = serializers.ChoiceField(
        choices=[NEWEST, OLDEST],
        required=False,
        help_text="newest (the default): newest first by `created`, paged with `cursor`, for "
        "browsing. oldest: the forward feed for polling, oldest first by the writing "
        "transaction, holding back events while an older transaction is still open, so an "
        "event that commits late is never skipped; continue from the `next` link (or with "
        "`after` set to the last id you got).",
    )
    after = serializers.RegexField(
        r"^evt_[A-Za-z0-9]{1,28}$",
        required=False,
        help_text="The forward feed (implies order=oldest) from just after this event of yours "
        "(evt_…), which should be one the feed gave you. Unknown: 404 event_not_found.",
        error_messages={"invalid": "after must be an event id (evt_…)."},
    )

    def validate(self, attrs: dict) -> dict:
        # DRF reads an empty optional value as absent: ?after= (a poller's position variable
        # left empty) would answer the newest-first list, not the feed, with a cursor link.
        if "after" not in attrs and self.initial_data.get("after") == "":
            raise serializers.ValidationError(
                {"after": ErrorDetail("after must be an event id (evt_…).", code="invalid")}
            )
        return attrs


class EventPagination(NewestFirstCursorPagination):
    def get_paginated_response_schema(self, schema):
        response = super().get_paginated_response_schema(schema)
        response["properties"]["has_more"] = {
            "type": "boolean",
            "description": "The forward feed (order=oldest or after) only: true when more "
            "events are ready now (fetch `next` at once); false when you are caught up (poll "
            "`next` again later). There, `next` is always set.",
        }
        return response


class EventListApi(ApiView):
    pagination_class = EventPagination
    filter_backends = FILTERED
    filterset_class = EventFilter
    query_serializer = EventListInput

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Event.objects.none()
        return event_list_for_org(
            organization=self.organization, hidden_types=self.hidden_types
        ).select_related("organization")

    @functools.cached_property
    def hidden_types(self) -> dict[str, PermissionDenied]:
        return event_types_hidden(self.org_context)

    @replica_reads
    @extend_schema(
        tags=TAGS,
        operation_id="events_list",
        summary="List events: newest first (kept for at least 30 days), or the forward feed",
        description="To follow along, poll the forward feed, not `created_after`: an event "
        "commits with its change, and can become visible after a later-stamped one. "
        "`?order=oldest` starts the feed at the oldest event kept (add `created_after` to "
        "start later); each response's `next` link carries `after=<the last event returned>` "
        "(or the same position when nothing was new) and `has_more`. The filters apply to "
        "both orders; `cursor` belongs to newest-first only.",
        responses={200: EventOutput(many=True), **errors(400, 403, 404)},
    )
    def get(self, request):
        params = self.query_input()
        asked = request.query_params.getlist("type")
        event_types_check_asked(asked, hidden=self.hidden_types, field="type")
        forward = params.get("order") == OLDEST or "after" in params
        if not forward:
            return self.paginated_response(self.filter_queryset(self.get_queryset()), EventOutput)
        if params.get("order") == NEWEST:
            raise ValidationFailed(
                "after reads the forward feed, oldest first: drop order=newest.",
                code="invalid_parameter_combination",
                field="order",
            )
        if self.paginator.cursor_query_param in request.query_params:
            raise ValidationFailed(
                "The forward feed continues with after=<event id> (its next link), not cursor.",
                code="invalid_parameter_combination",
                field="cursor",
            )
        return self._feed_response(request, params.get("after"))

    def _feed_response(self, request, after_id: str | None) -> Response:
        limit = self.paginator.get_page_size(request)
        after = None
        if after_id is not None:
            try:
                after = event_feed_position(organization=self.organization, public_id=after_id)
            except NotFound as exc:
                exc.field = "after"
                raise
        with event_feed_snapshot() as alias:
            head = event_feed_head(organization=self.organization, using=alias)
            # Nothing settled (no head): the page reads nothing either, in the same snapshot.
            feed = event_feed_for_org(
                organization=self.organization,
                after=after,
                upto=head,
                hidden_types=self.hidden_types,
            )
            # The filters narrow the page; the position is (txid, id), whatever they match.
            feed = self.filter_queryset(feed.using(alias)).select_related("organization")
            page = list(feed[: limit + 1])
        has_more = len(page) > limit
        page = page[:limit]
        # Caught up: on to the head, past events the filters skipped (a filtered poller would
        # otherwise stand on its last match, which retention deletes in time).
        position = page[-1] if has_more else head
        next_url = request.build_absolute_uri()
        if position is not None and (after is None or _key(position) > _key(after)):
            next_url = replace_query_param(next_url, "after", position.public_id)
            next_url = remove_query_param(next_url, "order")  # after implies it
        return Response(
            {
                "next": next_url,
                "previous": None,
                "has_more": has_more,
                "results": EventOutput(page, many=True).data,
            }
        )


def _key(event: Event) -> tuple[int, int]:
    return (int(event.txid), event.pk)


class EventDetailApi(ApiView):
    @extend_schema(
        tags=TAGS,
        operation_id="events_retrieve",
        summary="Retrieve an event",
        responses={200: EventOutput, **errors(403, 404)},
    )
    def get(self, request, event_id: str):
        # One the caller may not see is not found, as another organisation's is.
        event = event_get_for_org(
            organization=self.organization,
            public_id=event_id,
            hidden_types=event_types_hidden(self.org_context),
        )
        return Response(EventOutput(event).data)
