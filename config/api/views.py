"""The base view every public API endpoint inherits from.

Per request, in this order: authenticate → count against the rate limit (even when
authentication failed, so guessing keys costs requests) → the method (405) → a suspended
organisation's key (403 organization_suspended) → key scope → organisation and role (a
suspended organisation's members: reads only) → the query string's names → claim the
Idempotency-Key (POST) → the handler, inside one transaction with the stored response →
rate-limit headers on the way out.

A query parameter the operation does not take is refused (400 unknown_parameter), as an
unknown field of a JSON body is: `?stauts=active` would otherwise list every reservation. An
operation takes what it documents: its filters, its paginator's cursor and limit, the fields of
its query_serializer (GET), and `format`.
"""

import functools

from django import forms
from django.db import transaction
from django.http import Http404, HttpResponse
from django.utils.cache import add_never_cache_headers
from django_filters.rest_framework import DjangoFilterBackend
from rest_framework import exceptions, serializers
from rest_framework.generics import GenericAPIView
from rest_framework.permissions import SAFE_METHODS, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings

from config.api import idempotency
from config.api.context import OrgContext, org_context_resolve
from config.api.schema import ApiAutoSchema
from config.api.throttling import ApiRateThrottle, rate_limit_headers
from config.errors import PermissionDenied, ValidationFailed
from marketplace.audit import audit_actor_set
from marketplace.auth import ApiKeyUser
from marketplace.models import RESERVING_ROLES, ApiKeyScope, Role
from marketplace.services.organizations import organization_suspended_error

__all__ = ["ApiView", "FILTERED", "method_allowed_check", "validated_input"]

FILTERED = (DjangoFilterBackend,)


class ApiView(GenericAPIView):
    # Adds the Idempotency-Key (POST) and Sy-Organization headers to every operation's docs.
    schema = ApiAutoSchema()
    permission_classes = [IsAuthenticated]
    throttle_classes = [ApiRateThrottle]
    pagination_class = None
    # Filtering is opt-in: a list view with a filterset_class sets FILTERED.
    filter_backends: tuple = ()
    # False for public catalogue endpoints, which act for nobody in particular.
    requires_organization = True
    # Roles a signed-in member needs: for safe methods, and for the others.
    read_roles: frozenset = frozenset(Role.values)
    write_roles: frozenset = RESERVING_ROLES
    # False where writes must come from a signed-in member (managing keys and members): a
    # leaked key must not be able to mint more keys or let someone in.
    keys_may_write = True
    # False where even reading needs a signed-in member (the organisation's keys, invitations).
    keys_allowed = True
    # A write that only stops spending (cancel, stop early), open to a suspended organisation's
    # members (its keys stay refused).
    allowed_while_suspended = False
    # The scope a key needs to read here: write where only owners and admins may read (what
    # a read-only key is given for, dashboards and exports, never needs the configuration).
    key_read_scope = ApiKeyScope.READ
    # True where a write moves money (cards, top-ups, billing settings): API keys need the
    # billing scope for it, which write does not include.
    moves_money = False
    # The serializer that reads a GET's query string (validated by query_input(); documented
    # as the operation's parameters).
    query_serializer: type[serializers.Serializer] | None = None
    # True where the handler calls Stripe while the request runs (cards): with an
    # Idempotency-Key its response is stored after it, not in one transaction around it, so
    # no Stripe call waits inside an open transaction (the services keep their own short ones).
    calls_stripe = False
    # Response fields never stored for an idempotent replay (an API key's secret).
    idempotency_redacted_fields: tuple[str, ...] = ()
    # Responses carry a secret (any view with redacted fields does too): Cache-Control:
    # no-store, so no browser, proxy or CDN keeps a copy.
    sends_secrets = False

    org_context: OrgContext | None = None
    _claim: idempotency.Claim | None = None
    _claim_done = False

    def initial(self, request: Request, *args, **kwargs) -> None:
        self.format_kwarg = self.get_format_suffix(**kwargs)
        request.accepted_renderer, request.accepted_media_type = self.perform_content_negotiation(
            request
        )
        request.version, request.versioning_scheme = self.determine_version(
            request, *args, **kwargs
        )
        try:
            self.perform_authentication(request)
        finally:
            self.check_throttles(request)
        method_allowed_check(self, request)
        self.check_permissions(request)
        self._check_key_organization_active(request)
        self._check_key_scope(request)
        if self.requires_organization:
            self.org_context = org_context_resolve(request)
            audit_actor_set(self.org_context.actor_label)
            self._check_member_role(request)
            self._check_member_may_change(request)
        self._check_query_params(request)
        if request.method == "POST" and hasattr(self, "post") and self.org_context:
            self._claim = idempotency.idempotency_claim(
                request=request,
                organization=self.org_context.organization,
                principal=self.org_context.principal,
                redacted_fields=self.idempotency_redacted_fields,
            )
            if self._claim is not None:
                # DRF looks the handler up on the instance after initial(); the view object
                # lives for this one request, so wrapping it here touches nothing else.
                self.post = self._idempotent(self.post)

    def perform_content_negotiation(self, request: Request, force: bool = False):
        try:
            return super().perform_content_negotiation(request, force)
        except Http404:
            # DRF's answer to ?format= naming no renderer; the endpoint exists, the value is bad.
            formats = ", ".join(sorted(renderer.format for renderer in self.get_renderers()))
            asked = request.query_params.get(api_settings.URL_FORMAT_OVERRIDE, "")[:100]
            raise ValidationFailed(
                f"Unknown format {asked!r}; this API answers in: {formats}.",
                code="invalid_choice",
                field=api_settings.URL_FORMAT_OVERRIDE,
            ) from None

    def required_key_scope(self, method: str) -> str | None:
        """The scope an API key needs for this method here; None: keys cannot call it."""
        if not self.keys_allowed:
            return None
        if method in SAFE_METHODS:
            return self.key_read_scope
        if not self.keys_may_write:
            return None
        return ApiKeyScope.BILLING if self.moves_money else ApiKeyScope.WRITE

    def access_refusal(self, *, method: str, org_context: OrgContext) -> PermissionDenied | None:
        """What initial() would refuse `org_context`'s caller for `method` here (its key's
        scope, its member's role), or None: for asking about a view not being called (the
        events feed shows an object's events to those who may list such objects)."""
        try:
            if org_context.api_key is not None:
                self._check_scopes(method, set(org_context.api_key.scopes))
            elif org_context.membership is not None:
                self._check_role(method, org_context.membership.role)
        except PermissionDenied as refusal:
            return refusal
        return None

    def _check_key_organization_active(self, request: Request) -> None:
        # A suspended organisation's keys do nothing at all (the cached key is dropped when its
        # organisation is suspended or lifted, as when the key itself changes).
        if isinstance(request.user, ApiKeyUser):
            organization = request.user.api_key.organization
            if organization.suspended_at is not None:
                raise organization_suspended_error(organization)

    def _check_member_may_change(self, request: Request) -> None:
        # Its members still read (what ran, what was billed), but change nothing.
        # Only what stops spending stays open (allowed_while_suspended: cancel and stop).
        organization = self.org_context.organization
        if (
            organization.suspended_at is not None
            and request.method not in SAFE_METHODS
            and not self.allowed_while_suspended
        ):
            raise organization_suspended_error(organization)

    def _check_key_scope(self, request: Request) -> None:
        if isinstance(request.user, ApiKeyUser):
            self._check_scopes(request.method, set(request.user.api_key.scopes))

    def _check_scopes(self, method: str, scopes: set[str]) -> None:
        needed = self.required_key_scope(method)
        if needed is None:
            raise PermissionDenied(
                "This needs a signed-in owner or admin; API keys cannot do it.",
                code="session_required",
            )
        # The write scope includes reading; nothing includes billing.
        if needed == ApiKeyScope.READ and not scopes & {ApiKeyScope.READ, ApiKeyScope.WRITE}:
            raise PermissionDenied("This API key cannot read.", code="insufficient_scope")
        if needed == ApiKeyScope.WRITE and ApiKeyScope.WRITE not in scopes:
            raise PermissionDenied(
                "This API key is read-only; writing needs a key with the write scope.",
                code="insufficient_scope",
            )
        if needed == ApiKeyScope.GRID and ApiKeyScope.GRID not in scopes:
            raise PermissionDenied(
                "Pushing power prices needs an API key with the grid scope (granted by staff).",
                code="insufficient_scope",
            )
        if needed == ApiKeyScope.BILLING and ApiKeyScope.BILLING not in scopes:
            raise PermissionDenied(
                "Cards, top-ups and billing settings need a signed-in owner or admin, or an "
                "API key with the billing scope (which only an owner can grant).",
                code="insufficient_scope",
            )

    def _check_member_role(self, request: Request) -> None:
        if self.org_context.membership is not None:
            self._check_role(request.method, self.org_context.membership.role)

    def _check_role(self, method: str, role: str) -> None:
        allowed = self.read_roles if method in SAFE_METHODS else self.write_roles
        if role not in allowed:
            raise PermissionDenied(
                f"Your role ({role}) does not allow this; it needs one of: "
                f"{', '.join(sorted(allowed))}.",
                code="insufficient_role",
            )

    def _idempotent(self, handler):
        def complete(response) -> None:
            idempotency.idempotency_complete(
                claim=self._claim, status=response.status_code, data=response.data
            )
            self._claim_done = True

        def run(request, *args, **kwargs):
            if self.calls_stripe:
                # No Stripe call waits inside an open transaction: the response is stored
                # right after the action (should the process die between the two, the key
                # stays in flight until IN_FLIGHT_TIMEOUT, then a retry runs again).
                response = handler(request, *args, **kwargs)
                complete(response)
                return response
            # The stored response commits with the action's own writes, or neither does.
            with transaction.atomic():
                response = handler(request, *args, **kwargs)
                complete(response)
            return response

        return run

    def _check_query_params(self, request: Request) -> None:
        if not request.query_params:
            return
        known = _query_params_taken(type(self), request.method)
        repeatable = _query_params_repeatable(type(self), request.method)
        for name, values in request.query_params.lists():
            if name not in known:
                takes = ", ".join(sorted(known - {api_settings.URL_FORMAT_OVERRIDE})) or "none"
                raise ValidationFailed(
                    f"Unknown query parameter {name[:100]!r}; this request takes {takes}.",
                    code="unknown_parameter",
                    field=name[:100],
                )
            if len(values) > 1 and name not in repeatable:
                # Read as its last value, ?tier=on_demand&tier=reserved would list reserved
                # only, as if the first had never been asked for.
                raise ValidationFailed(
                    f"The query parameter {name!r} is given {len(values)} times; it takes one "
                    "value.",
                    code="repeated_parameter",
                    field=name,
                )

    def throttled(self, request: Request, wait: float | None) -> None:
        raise exceptions.Throttled(
            wait=wait,
            detail="Rate limit exceeded; slow down and retry after the time in Retry-After.",
            code="rate_limited",
        )

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, idempotency.IdempotentReplay):
            # The stored bytes as they were sent, not re-rendered from parsed JSON.
            record = exc.record
            response = HttpResponse(status=record.response_status)
            if record.response_body is not None:
                response.content = record.response_body.encode()
                response["Content-Type"] = "application/json"
            response[idempotency.REPLAYED_HEADER] = "true"
            return response
        try:
            return super().handle_exception(exc)
        except Exception:
            # An unexpected error becomes a 500: free the key so a retry runs again.
            self._release_claim()
            raise

    def _release_claim(self) -> None:
        if self._claim is not None and not self._claim_done:
            idempotency.idempotency_release(claim=self._claim)
            self._claim_done = True

    def finalize_response(self, request: Request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        if self._claim is not None and not self._claim_done:
            # A refusal (4xx) is part of the record too: a retry gets the same answer.
            if response.status_code < 500:
                idempotency.idempotency_complete(
                    claim=self._claim, status=response.status_code, data=response.data
                )
                self._claim_done = True
            else:
                self._release_claim()
        if self.sends_secrets or self.idempotency_redacted_fields:
            add_never_cache_headers(response)
        rate_limit = getattr(request, "rate_limit", None)
        if rate_limit is not None:
            for name, value in rate_limit_headers(rate_limit).items():
                response[name] = value
        return response

    def get_serializer_class(self):
        # Views use one input and one output serializer per method, named in extend_schema;
        # OPTIONS and the browsable API ask for a single class, and get an empty one.
        return self.serializer_class or serializers.Serializer

    # --- helpers for handlers ----------------------------------------------------------------

    @property
    def organization(self):
        return self.org_context.organization

    def query_input(self) -> dict:
        """The query string, validated by the view's query_serializer."""
        return validated_input(self.query_serializer, self.request.query_params)

    def paginated_response(self, queryset, serializer_class) -> Response:
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response(serializer_class(page, many=True).data)


_PAGINATION_PARAMS = (
    "cursor_query_param",
    "page_size_query_param",
    "page_query_param",
    "limit_query_param",
    "offset_query_param",
)


@functools.cache
def _query_params_taken(view_class: type[ApiView], method: str) -> frozenset[str]:
    """The query parameter names an operation takes (worked out once per view and method)."""
    names = {api_settings.URL_FORMAT_OVERRIDE} - {None}
    if method not in ("GET", "HEAD"):
        return frozenset(names)
    if view_class.query_serializer is not None:
        names |= set(view_class.query_serializer().fields)
    paginator = view_class.pagination_class
    if paginator is not None:
        names |= {getattr(paginator, a) for a in _PAGINATION_PARAMS if getattr(paginator, a, None)}
    filterset = getattr(view_class, "filterset_class", None)
    if filterset is not None and DjangoFilterBackend in view_class.filter_backends:
        for name, declared in filterset.base_filters.items():
            # A range filter reads name_after and name_before (its widget's suffixes).
            widget = declared.extra.get("widget") or declared.field_class.widget
            suffixes = getattr(widget, "suffixes", None) or [""]
            names |= {f"{name}_{suffix}" if suffix else name for suffix in suffixes}
    return frozenset(names)


@functools.cache
def _query_params_repeatable(view_class: type[ApiView], method: str) -> frozenset[str]:
    """The query parameters an operation reads several values of (?status=a&status=b)."""
    names: set[str] = set()
    if method not in ("GET", "HEAD"):
        return frozenset(names)
    if view_class.query_serializer is not None:
        for name, field in view_class.query_serializer().fields.items():
            if isinstance(field, serializers.ListField | serializers.MultipleChoiceField):
                names.add(name)
    filterset = getattr(view_class, "filterset_class", None)
    if filterset is not None and DjangoFilterBackend in view_class.filter_backends:
        for name, declared in filterset.base_filters.items():
            if issubclass(declared.field_class, forms.MultipleChoiceField):
                names.add(name)
    return frozenset(names)


def method_allowed_check(view, request: Request) -> None:
    """405 (with Allow) for a method the endpoint has no handler for, before any scope or role
    check: DRF dispatches on the method only after those, so a PUT with a read-only key was
    told to get another scope, and one with a key where a session is needed to sign in."""
    method = request.method.lower()
    if method not in view.http_method_names or not hasattr(view, method):
        raise exceptions.MethodNotAllowed(request.method)


def validated_input(serializer_class, data, **kwargs) -> dict:
    """Validate request input with an input serializer; a failure is a 400 in the error shape."""
    serializer = serializer_class(data=data, **kwargs)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data
