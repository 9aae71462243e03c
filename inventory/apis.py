"""The site agent's API."""

import functools
import json
import time

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.exceptions import ErrorDetail
from rest_framework.request import Request
from rest_framework.response import Response

from config.api.errors import agent_errors, error_body
from config.api.serializers import LenientSerializer
from config.api.throttling import agent_rate_count, auth_failures
from config.errors import ApplicationError
from inventory.auth import (
    AGENT_THROTTLED,
    AgentApiView,
    NodeAgent,
    NodeTokenAuthentication,
    agent_instance_claim,
)
from inventory.burn_in import burn_in_lease, burn_in_report
from inventory.heartbeat_input import heartbeat_fast_validate
from inventory.models import GpuHealth, NodeStatus
from inventory.selectors import agent_heartbeat_seconds
from inventory.services import (
    TOKEN_PREFIX,
    node_heartbeat_accept,
    node_heartbeat_read,
    node_token_authenticate_with_gpus,
)


def _gpu_indexes_validate(items: list[dict], *, known: set[int]) -> list[dict]:
    """Each item names one of this node's GPUs, at most once (health reports, telemetry)."""
    seen: set[int] = set()
    for position, item in enumerate(items):
        index = item["index"]
        if index in seen or index not in known:
            why = "is reported twice" if index in seen else "does not exist on this node"
            code = "duplicate" if index in seen else "unknown_gpu"
            raise serializers.ValidationError(
                {position: {"index": [ErrorDetail(f"GPU {index} {why}.", code=code)]}}
            )
        seen.add(index)
    return items


class GpuHealthReportSerializer(LenientSerializer):
    index = serializers.IntegerField(min_value=0, max_value=255)
    health = serializers.ChoiceField(choices=GpuHealth.choices)


def _reading(**kwargs):
    return serializers.FloatField(required=False, allow_null=True, default=None, **kwargs)


def _count():
    return serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=0, max_value=2**31 - 1
    )


def _flag():
    return serializers.BooleanField(required=False, allow_null=True, default=None)


class DriverEventSerializer(LenientSerializer):
    code = serializers.CharField(max_length=40)  # an Xid number or an amdgpu event name
    detail = serializers.CharField(max_length=300, required=False, allow_blank=True, default="")


class GpuTelemetrySerializer(LenientSerializer):
    """One GPU's readings, as agent/gpu_telemetry.py reports them (other keys are ignored)."""

    index = serializers.IntegerField(min_value=0, max_value=255)
    # The board's serial number as the tool reads it: what a reading is matched to a GPU by
    # when every reading has one of the node's (inventory.telemetry.telemetry_matched).
    serial = serializers.CharField(
        max_length=64, required=False, allow_null=True, allow_blank=True, default=None
    )
    readable = serializers.BooleanField(required=False, default=True)
    error = serializers.CharField(
        max_length=300, required=False, allow_null=True, allow_blank=True, default=None
    )
    temperature_c = _reading(min_value=-40, max_value=200)
    power_w = _reading(min_value=0, max_value=5000)
    utilization_pct = _reading(min_value=0, max_value=100)
    memory_used_mib = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=0, max_value=2**31 - 1
    )
    sm_clock_mhz = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=0, max_value=32767
    )
    memory_clock_mhz = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=0, max_value=32767
    )
    throttle_reasons = serializers.ListField(
        child=serializers.CharField(max_length=60), required=False, default=list, max_length=16
    )
    ecc_volatile_corrected = _count()
    ecc_volatile_uncorrected = _count()
    ecc_aggregate_corrected = _count()
    ecc_aggregate_uncorrected = _count()
    rows_remap_pending = _flag()
    rows_remap_failure = _flag()
    events = DriverEventSerializer(many=True, required=False, default=list, max_length=50)


class TelemetrySerializer(LenientSerializer):
    source = serializers.CharField(max_length=40, required=False, allow_blank=True, default="")
    unreadable = serializers.CharField(
        max_length=500, required=False, allow_null=True, allow_blank=True, default=None
    )
    gpus = GpuTelemetrySerializer(many=True, required=False, default=list, max_length=64)

    def validate_gpus(self, readings: list[dict]) -> list[dict]:
        return _gpu_indexes_validate(readings, known=self.context["gpu_indexes"])


class HeartbeatApi(AgentApiView):
    """A node agent says it is alive and how its GPUs are."""

    class InputSerializer(LenientSerializer):
        class Meta:
            ref_name = "HeartbeatInput"

        agent_version = serializers.CharField(max_length=40, required=False)
        gpus = GpuHealthReportSerializer(many=True, required=False, max_length=64)
        # Per-GPU readings (agent/gpu_telemetry.py); stored and judged by the health rules.
        telemetry = TelemetrySerializer(required=False)
        # Accepted so older agents can send them; not stored.
        metrics = serializers.DictField(required=False)

        def validate_gpus(self, reports: list[dict]) -> list[dict]:
            return _gpu_indexes_validate(reports, known=self.context["gpu_indexes"])

    class OutputSerializer(LenientSerializer):
        class Meta:
            ref_name = "Heartbeat"

        node = serializers.CharField(source="hostname")
        status = serializers.ChoiceField(choices=NodeStatus.choices)
        last_heartbeat_at = serializers.DateTimeField()
        next_heartbeat_within_seconds = serializers.SerializerMethodField()
        # A job or a burn-in waits for this node's agent: an idle agent leases only when told
        # (agent/README.md), so it need not poll; it comes from the heartbeat's one read.
        work_waiting = serializers.SerializerMethodField()
        # How long the agent waits before its next heartbeat (AGENT_HEARTBEAT_SECONDS, longer
        # for a fleet past AGENT_HEARTBEATS_PER_SECOND): the fleet's pace is set on the
        # server, not in every node's config (agent/README.md).
        heartbeat_seconds = serializers.SerializerMethodField()

        def get_next_heartbeat_within_seconds(self, node) -> int:
            return int(settings.NODE_OFFLINE_AFTER.total_seconds())

        def get_heartbeat_seconds(self, node) -> int:
            return agent_heartbeat_seconds()

        def get_work_waiting(self, node) -> bool:
            return self.context["work_waiting"]

    @classmethod
    def as_view(cls, **initkwargs):
        """DRF's view behind a plain one that answers the agent's routine heartbeat (a valid
        token, a well-formed JSON body) without DRF's request, negotiation and serializers;
        anything else, every error included, goes to DRF as before."""
        drf_view = super().as_view(**initkwargs)

        @functools.wraps(drf_view)  # keeps cls, initkwargs and csrf_exempt for the schema
        def view(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            return _heartbeat_plain(request) or drf_view(request, *args, **kwargs)

        return view

    @extend_schema(
        request=InputSerializer,
        responses={200: OutputSerializer, **agent_errors()},
        operation_id="agent_heartbeat",
    )
    def post(self, request: Request) -> Response:
        node = request.user.node
        gpus, work_waiting = node_heartbeat_read(node)
        # The agent's well-formed body is checked without DRF's fields (same result, a tenth
        # of the time); anything else goes through the serializer and its errors.
        data = heartbeat_fast_validate(request.data, gpu_indexes=set(gpus))
        if data is None:
            serializer = self.InputSerializer(data=request.data, context={"gpu_indexes": set(gpus)})
            serializer.is_valid(raise_exception=True)
            data = serializer.validated_data
        node = node_heartbeat_accept(
            node=node,
            gpus=gpus,
            gpu_reports=data.get("gpus"),
            agent_version=data.get("agent_version"),
            actor_label=f"node agent ({request.auth.prefix})",
            telemetry=data.get("telemetry"),
        )
        return Response(self.OutputSerializer(node, context={"work_waiting": work_waiting}).data)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: DRF's strict parser refuses them


def _heartbeat_plain(request: HttpRequest) -> HttpResponse | None:
    """The heartbeat answered as HeartbeatApi.post would answer it, or None when the request
    is not the plain case (not JSON, no node token, a body the fast checks do not take) and
    DRF must answer it, with its own errors."""
    if request.method != "POST" or request.content_type != "application/json":
        return None
    if request.content_params.get("charset", "utf-8").lower() not in ("utf-8", "utf8"):
        return None
    scheme, _, secret = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    secret = secret.strip()
    if scheme != NodeTokenAuthentication.keyword or not secret.startswith(TOKEN_PREFIX):
        return None
    try:
        body = json.loads(request.body.decode(), parse_constant=_no_constant)
    except (ValueError, RequestDataTooBig):  # UnicodeDecodeError is a ValueError too
        return None
    if auth_failures.wait(request, secret) is not None:
        return None  # its address is over AUTH_FAILURE_RATE: DRF's 429, and no lookup
    found = node_token_authenticate_with_gpus(secret)
    if found is None:
        return None
    auth_failures.vouch(secret)
    token, (gpus, work_waiting) = found
    data = heartbeat_fast_validate(body, gpu_indexes=set(gpus))
    if data is None:
        return None
    # Counted here, once the plain path answers it (a request DRF answers is counted there).
    now = time.time()
    counted = agent_rate_count(token.node.pk, now=now)
    if counted is not None and not counted[1]:
        return _throttled_response(counted[0].retry_after(now))
    request.user = NodeAgent(node=token.node, token=token)
    try:
        agent_instance_claim(node=token.node, meta=request.META)
        node = node_heartbeat_accept(
            node=token.node,
            gpus=gpus,
            agent_version=data.get("agent_version"),
            actor_label=f"node agent ({token.prefix})",
            telemetry=data.get("telemetry"),
        )
    except ApplicationError as exc:  # as config.api.errors.exception_handler answers it
        return _json_response({"error": exc.as_dict()}, status=exc.status_code)
    return _json_response(
        {
            "node": node.hostname,
            "status": node.status,
            "last_heartbeat_at": _AT.to_representation(node.last_heartbeat_at),
            "next_heartbeat_within_seconds": int(settings.NODE_OFFLINE_AFTER.total_seconds()),
            "work_waiting": work_waiting,
            "heartbeat_seconds": agent_heartbeat_seconds(),
        }
    )  # HeartbeatApi.OutputSerializer's fields (its .data costs as much as the rest here)


_AT = serializers.DateTimeField()


def _throttled_response(wait: int) -> HttpResponse:
    """The 429 DRF's view gives a node over its rate limit (AgentApiView.throttled)."""
    message = str(exceptions.Throttled(wait=wait, detail=AGENT_THROTTLED).detail)
    body = error_body(type="rate_limit_error", code="rate_limited", message=message)
    body["error"]["retry_after"] = wait
    response = _json_response(body, status=429)
    response["Retry-After"] = str(wait)
    return response


def _json_response(data: dict, status: int = 200) -> HttpResponse:
    """The bytes and headers DRF's JSONRenderer and Response give the same data."""
    content = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    response = HttpResponse(content.encode(), status=status, content_type="application/json")
    if len(HeartbeatApi.renderer_classes) > 1:  # as APIView.default_response_headers
        response["Vary"] = "Accept"
    response["Allow"] = "POST, OPTIONS"
    return response


class BurnInLeaseApi(AgentApiView):
    """The node's next burn-in to run (204 when there is none); it is running from now."""

    class OutputSerializer(LenientSerializer):
        class Meta:
            ref_name = "BurnInJob"

        id = serializers.IntegerField()
        command = serializers.CharField()
        time_limit_seconds = serializers.IntegerField()
        gpu_indexes = serializers.ListField(child=serializers.IntegerField())

    @extend_schema(
        request=None,
        responses={200: OutputSerializer, 204: None, **agent_errors()},
        operation_id="agent_burn_in_lease",
    )
    def post(self, request: Request) -> Response:
        burn_in = burn_in_lease(node=request.user.node)
        if burn_in is None:
            return Response(status=204)
        return Response(self.OutputSerializer(burn_in).data)


class BurnInResultApi(AgentApiView):
    """The result of a burn-in this node ran: exit 0 within the limit passes."""

    class InputSerializer(LenientSerializer):
        class Meta:
            ref_name = "BurnInResultInput"

        exit_code = serializers.IntegerField(allow_null=True, min_value=-255, max_value=255)
        timed_out = serializers.BooleanField(default=False)
        output = serializers.CharField(
            allow_blank=True, max_length=1_000_000, trim_whitespace=False, default=""
        )

    class OutputSerializer(LenientSerializer):
        class Meta:
            ref_name = "BurnInResult"

        id = serializers.IntegerField()
        status = serializers.CharField()

    @extend_schema(
        request=InputSerializer,
        responses={200: OutputSerializer, **agent_errors(404, 409)},
        operation_id="agent_burn_in_result",
    )
    def post(self, request: Request, burn_in_id: int) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        burn_in = burn_in_report(
            node=request.user.node, burn_in_id=burn_in_id, **serializer.validated_data
        )
        return Response(self.OutputSerializer(burn_in).data)
