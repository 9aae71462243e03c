"""Usage and ledger CSV downloads for a period, streamed: the API's (billing/usage.csv,
billing/ledger.csv) and the portal's (Billing → Usage → Download)."""

from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema

from billing.apis import UsageInput
from billing.exports import ledger_csv_lines, usage_csv_lines
from billing.portal import BillingPage, UsageFilterForm
from config.api.schema import errors
from config.api.views import ApiView
from config.replica import replica_reads, stale_iter

TAGS = ["Billing"]


def _csv(lines, filename: str) -> StreamingHttpResponse:
    # The lines are read while the response streams, after the view returned: they keep the
    # view's choice of database (the replica, for these downloads).
    response = StreamingHttpResponse(stale_iter(lines), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _filename(kind: str, organization, data) -> str:
    since, until = data.get("since"), data.get("until")
    period = f"-{since or 'start'}-{until or 'now'}" if since or until else ""
    return f"switchyard-{kind}-{organization.slug}{period}.csv"


class UsageCsvApi(ApiView):
    query_serializer = UsageInput

    @replica_reads
    @extend_schema(
        tags=TAGS,
        operation_id="billing_usage_csv",
        summary="Usage as CSV: one row per reservation and UTC day (GPU model, site, "
        "GPU-seconds, amount, currency, kWh, kg CO2e), streamed",
        responses={
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="The CSV file."),
            **errors(400, 403),
        },
    )
    def get(self, request):
        data = self.query_input()
        lines = usage_csv_lines(
            organization=self.organization, since=data.get("since"), until=data.get("until")
        )
        return _csv(lines, _filename("usage", self.organization, data))


class LedgerCsvApi(ApiView):
    query_serializer = UsageInput

    @replica_reads
    @extend_schema(
        tags=TAGS,
        operation_id="billing_ledger_csv",
        summary="The ledger as CSV (every money movement, signed), streamed",
        responses={
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="The CSV file."),
            **errors(400, 403),
        },
    )
    def get(self, request):
        data = self.query_input()
        lines = ledger_csv_lines(
            organization=self.organization, since=data.get("since"), until=data.get("until")
        )
        return _csv(lines, _filename("ledger", self.organization, data))


class _CsvPortalView(BillingPage):
    lines = None
    kind = ""

    @replica_reads
    def get(self, request):
        form = UsageFilterForm(request.GET)
        if not form.is_valid():
            errors = "; ".join(f"{name}: {', '.join(e)}" for name, e in form.errors.items())
            return HttpResponse(errors, status=400, content_type="text/plain; charset=utf-8")
        data = {k: v for k, v in form.cleaned_data.items() if v}
        lines = type(self).lines(
            organization=self.organization, since=data.get("since"), until=data.get("until")
        )
        return _csv(lines, _filename(self.kind, self.organization, data))


class UsageCsvPortalView(_CsvPortalView):
    lines = staticmethod(usage_csv_lines)
    kind = "usage"


class LedgerCsvPortalView(_CsvPortalView):
    lines = staticmethod(ledger_csv_lines)
    kind = "ledger"
