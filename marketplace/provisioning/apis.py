"""The site agent's job API: lease, progress, complete, fail (under /api/v1/agent/jobs/).

Authenticated by the node token (inventory.auth); an agent sees only its own node's jobs.
Reports carry the lease id the lease handed out, so a presumed-dead agent whose job went to
another cannot report on it (409 lease_lost), and a job done once stays done.
"""

import ipaddress
import re

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from config.api.errors import agent_errors
from config.api.serializers import LenientSerializer
from inventory.auth import AgentApiView
from marketplace.models import AgentJob, AgentJobKind, AgentJobStatus
from marketplace.provisioning.agent_jobs import (
    agent_job_complete,
    agent_job_fail,
    agent_job_lease,
    agent_job_progress,
)
from marketplace.provisioning.agent_reports import STOPPED_FROM_OUTSIDE, agent_workloads_report


class _AgentApi(AgentApiView):
    pass


# A DNS name as RFC 1123 spells it, ASCII only (an internationalised name in its xn-- form).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.ASCII)


def _connect_host(value: str) -> str:
    """The host customers are told to connect to: a DNS name or an IP address, nothing else.
    The portal quotes it into the `ssh -p PORT root@HOST` they paste into a shell, so an
    agent's `;`, `$(…)`, space or look-alike Unicode letter must never reach it."""
    if not (_is_ip_address(value) or (len(value) <= 253 and _DNS_NAME.fullmatch(value))):
        raise serializers.ValidationError(
            "Enter a DNS name (ASCII letters, digits, hyphens and dots; an internationalised "
            "name in its xn-- form) or an IP address.",
            code="invalid_host",
        )
    return value


def _is_ip_address(value: str) -> bool:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    # Not with an IPv6 zone ("fe80::1%eth0"): any text may follow its "%".
    return getattr(ip, "scope_id", None) is None


def _container_ports(ports: dict) -> dict:
    """The workload's ports (keys) as published on the host (values): both are port numbers."""
    for port in ports:
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise serializers.ValidationError(
                f"{port!r} is not a port number (1 to 65535).", code="invalid_port"
            )
    return ports


class JobStateSerializer(LenientSerializer):
    id = serializers.IntegerField()
    kind = serializers.ChoiceField(choices=AgentJobKind.choices)
    status = serializers.ChoiceField(choices=AgentJobStatus.choices)
    lease_expires_at = serializers.DateTimeField(allow_null=True)


class AgentJobLeaseApi(_AgentApi):
    """Lease this node's next job. 204 when there is none."""

    class AgentJobLeaseInputSerializer(LenientSerializer):
        lease_seconds = serializers.IntegerField(min_value=5, max_value=3600, required=False)

    class OutputSerializer(LenientSerializer):
        id = serializers.IntegerField()
        kind = serializers.ChoiceField(choices=AgentJobKind.choices)
        reservation = serializers.CharField(source="reservation.public_id")
        payload = serializers.DictField()
        lease_id = serializers.CharField(source="lease_owner")
        lease_expires_at = serializers.DateTimeField()
        attempts = serializers.IntegerField()
        request_id = serializers.CharField(
            help_text="The request that led to this job; send it back as X-Request-Id."
        )

    @extend_schema(
        request=AgentJobLeaseInputSerializer,
        responses={200: OutputSerializer, 204: None, **agent_errors()},
        operation_id="agent_job_lease",
    )
    def post(self, request: Request) -> Response:
        serializer = self.AgentJobLeaseInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        job = agent_job_lease(
            node=request.user.node, lease_seconds=serializer.validated_data.get("lease_seconds")
        )
        if job is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        job = AgentJob.objects.select_related("reservation").get(pk=job.pk)
        return Response(self.OutputSerializer(job).data)


class AgentJobProgressApi(_AgentApi):
    """Report progress on a leased job; extends the lease."""

    class AgentJobProgressInputSerializer(LenientSerializer):
        lease_id = serializers.CharField(max_length=64)
        progress = serializers.DictField(required=False, default=dict)
        lease_seconds = serializers.IntegerField(min_value=5, max_value=3600, required=False)

    @extend_schema(
        request=AgentJobProgressInputSerializer,
        responses={200: JobStateSerializer, **agent_errors(404, 409)},
        operation_id="agent_job_progress",
    )
    def post(self, request: Request, job_id: int) -> Response:
        serializer = self.AgentJobProgressInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        job = agent_job_progress(
            node=request.user.node,
            job_id=job_id,
            lease_id=data["lease_id"],
            progress=data["progress"],
            lease_seconds=data.get("lease_seconds"),
        )
        return Response(JobStateSerializer(job).data)


class AgentJobCompleteApi(_AgentApi):
    """The job is done; a start job reports how to connect. Repeating it is harmless."""

    class ResultSerializer(LenientSerializer):
        host = serializers.CharField(max_length=253, required=False, validators=[_connect_host])
        ssh_port = serializers.IntegerField(min_value=1, max_value=65535, required=False)
        ports = serializers.DictField(
            child=serializers.IntegerField(min_value=1, max_value=65535), required=False
        )
        container_id = serializers.CharField(max_length=128, required=False)
        detail = serializers.CharField(max_length=2000, required=False)

        def validate_ports(self, ports: dict) -> dict:
            return _container_ports(ports)

    class AgentJobCompleteInputSerializer(LenientSerializer):
        lease_id = serializers.CharField(max_length=64)
        result = serializers.DictField(required=False, default=dict)

    @extend_schema(
        request=AgentJobCompleteInputSerializer,
        responses={200: JobStateSerializer, **agent_errors(404, 409)},
        operation_id="agent_job_complete",
    )
    def post(self, request: Request, job_id: int) -> Response:
        serializer = self.AgentJobCompleteInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        result = self.ResultSerializer(data=serializer.validated_data["result"])
        result.is_valid(raise_exception=True)
        job = agent_job_complete(
            node=request.user.node,
            job_id=job_id,
            lease_id=serializer.validated_data["lease_id"],
            result=result.validated_data,
        )
        return Response(JobStateSerializer(job).data)


class AgentJobFailApi(_AgentApi):
    """The job failed; node_failure says the node itself is bad (it is taken out of sale),
    stopped_by that the site stopped the container from outside while it started (the start
    is retried)."""

    class AgentJobFailInputSerializer(LenientSerializer):
        lease_id = serializers.CharField(max_length=64)
        error = serializers.CharField(max_length=2000)
        node_failure = serializers.BooleanField(default=False)
        # "runtime", "reboot" (the heartbeat's `stopped_by`); absent or null (an older agent's
        # failure too): the workload's own failure.
        stopped_by = serializers.CharField(
            max_length=32, allow_null=True, allow_blank=True, required=False, default=None
        )

        # A cause a newer agent names that this server does not know is still the site's.
        def validate_stopped_by(self, value: str | None) -> str | None:
            if not value:
                return None
            return value if value in STOPPED_FROM_OUTSIDE else "site"

    @extend_schema(
        request=AgentJobFailInputSerializer,
        responses={200: JobStateSerializer, **agent_errors(404, 409)},
        operation_id="agent_job_fail",
    )
    def post(self, request: Request, job_id: int) -> Response:
        serializer = self.AgentJobFailInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        job = agent_job_fail(
            node=request.user.node,
            job_id=job_id,
            lease_id=data["lease_id"],
            error=data["error"],
            node_failure=data["node_failure"],
            stopped_by=data["stopped_by"],
        )
        return Response(JobStateSerializer(job).data)


# A container's state as podman and docker name it ("exited", "running", "created").
_CONTAINER_STATE = re.compile(r"[a-z][a-z_-]{0,31}")
# An RFC 3339 time as the runtimes print it ("2026-12-06T10:31:02.123456789Z"), or podman's Go
# form ("2026-12-06 10:31:02.123 +0000 UTC").
_CONTAINER_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?( ?(Z|[+-]\d{2}:?\d{2})( UTC)?)?"
)


class AgentWorkloadsApi(_AgentApi):
    """Every container the agent runs and its state (sent with each heartbeat). A workload
    that exited while its reservation was active ends the reservation; the answer holds the
    preemption notices to write into the node's containers."""

    class ContainerReportSerializer(LenientSerializer):
        name = serializers.CharField(max_length=128)
        reservation = serializers.CharField(max_length=64, allow_blank=True)
        state = serializers.CharField(max_length=32)
        exit_code = serializers.IntegerField(allow_null=True, required=False)
        finished_at = serializers.CharField(max_length=64, allow_null=True, required=False)
        oom_killed = serializers.BooleanField(required=False, default=False)
        # What stopped it from outside its workload ("runtime", "reboot"); absent or null (an
        # older agent's report too): its own exit.
        stopped_by = serializers.CharField(
            max_length=32, allow_null=True, allow_blank=True, required=False, default=None
        )
        log_tail = serializers.CharField(max_length=4000, allow_blank=True, required=False)

        # The state and the exit time are quoted into the reason the customer reads: only
        # what a container runtime reports gets there (a state word, an RFC 3339 time, as
        # podman and docker print them); anything else reads as unknown, and the report still
        # counts (refusing it would blind us to the node's other containers).
        def validate_state(self, value: str) -> str:
            return value if _CONTAINER_STATE.fullmatch(value) else "unknown"

        def validate_finished_at(self, value: str | None) -> str | None:
            return value if value and _CONTAINER_TIME.fullmatch(value) else None

        # A cause a newer agent names that this server does not know is still a stop from
        # outside: said as such, not quoted.
        def validate_stopped_by(self, value: str | None) -> str | None:
            if not value:
                return None
            return value if value in STOPPED_FROM_OUTSIDE else "site"

    class AgentWorkloadsInputSerializer(LenientSerializer):
        containers = serializers.ListField(child=serializers.DictField(), max_length=512)

        def validate_containers(self, items: list[dict]) -> list[dict]:
            reports = AgentWorkloadsApi.ContainerReportSerializer(data=items, many=True)
            reports.is_valid(raise_exception=True)
            return reports.validated_data

    class OutputSerializer(LenientSerializer):
        notices = serializers.ListField(child=serializers.DictField())

        class Meta:
            ref_name = "AgentWorkloads"

    @extend_schema(
        request=AgentWorkloadsInputSerializer,
        responses={200: OutputSerializer, **agent_errors()},
        operation_id="agent_workloads_report",
    )
    def post(self, request: Request) -> Response:
        serializer = self.AgentWorkloadsInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        notices = agent_workloads_report(
            node=request.user.node, containers=serializer.validated_data["containers"]
        )
        return Response({"notices": notices})
