"""What exists physically: repurposed sites, GPU models, nodes, GPUs, and their health."""

from datetime import timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.contrib.postgres.constraints import ExclusionConstraint
from django.contrib.postgres.fields import DateTimeRangeField, RangeOperators
from django.contrib.postgres.indexes import BrinIndex
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from config.dates import OUT_OF_RANGE, within_bounds


class SiteStatus(models.TextChoices):
    COMMISSIONING = "commissioning"
    ACTIVE = "active"
    CURTAILED = "curtailed"
    MAINTENANCE = "maintenance"
    RETIRED = "retired"


class CoolingType(models.TextChoices):
    AIR = "air"
    HYDRO = "hydro"
    IMMERSION = "immersion"
    DIRECT_LIQUID = "direct_liquid"


class TsTzRange(models.Func):
    """tstzrange(start, end, '[)') in SQL: a half-open period from two columns (constraints)."""

    function = "TSTZRANGE"
    output_field = DateTimeRangeField()


class PriceZone(models.Model):
    """A wholesale power market zone (e.g. ERCOT West, Nord Pool NO4, Hydro-Québec): where a
    site buys its power. Its prices over time are ZonePrice rows (docs/grid.md)."""

    code = models.SlugField(
        max_length=40, unique=True, help_text="Short stable code, e.g. ercot-west, nordpool-no4."
    )
    name = models.CharField(max_length=120)
    currency = models.CharField(
        max_length=3, help_text="ISO 4217, lower case (usd, eur, cad): the prices' currency."
    )
    timezone = models.CharField(
        max_length=64,
        default="UTC",
        help_text="The market's local time zone (IANA, e.g. America/Chicago), for its day.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["code"]
        constraints = [
            models.CheckConstraint(
                condition=Q(currency__regex=r"^[a-z]{3}$"), name="pricezone_currency_iso"
            )
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        """An IANA time zone this machine knows (the zone's day is read in it), and a currency
        that stays that of its stored prices: pricing reads them in the zone's currency, so
        30.00 EUR per MWh would be read as 30.00 of the new one."""
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValidationError(
                {"timezone": f"{self.timezone!r} is not an IANA time zone."}
            ) from None
        if self.pk is not None:
            stored = self.prices.exclude(currency=self.currency).values_list("currency", flat=True)
            other = stored.first()
            if other is not None:
                raise ValidationError(
                    {
                        "currency": f"This zone's stored prices are in {other.upper()}: "
                        "delete them first, or create a zone for the new currency."
                    }
                )


class Site(models.Model):
    """A former mining facility: its grid connection, power contract and cooling now serve GPUs."""

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    region = models.CharField(max_length=64, help_text="Marketplace region, e.g. us-central.")
    country = models.CharField(max_length=2, help_text="ISO 3166-1 alpha-2 code.")
    grid_operator = models.CharField(max_length=120, help_text="e.g. ERCOT, Hydro-Québec.")
    power_capacity_kw = models.DecimalField(
        max_digits=10, decimal_places=1, validators=[MinValueValidator(0)]
    )
    pue = models.DecimalField(
        "PUE",
        max_digits=4,
        decimal_places=2,
        validators=[MinValueValidator(1), MaxValueValidator(5)],
        help_text="Power usage effectiveness (1.00 is perfect).",
    )
    cooling = models.CharField(max_length=20, choices=CoolingType.choices)
    energy_price_per_mwh = models.DecimalField(
        max_digits=10, decimal_places=2, validators=[MinValueValidator(0)]
    )
    energy_currency = models.CharField(max_length=3, default="usd")
    price_zone = models.ForeignKey(
        PriceZone,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="sites",
        help_text="The power market the site buys from; its prices replace the static energy "
        "price above where they are published and fresh. Empty: the static price only.",
    )
    renewable_share = models.DecimalField(
        max_digits=4,
        decimal_places=3,
        validators=[MinValueValidator(0), MaxValueValidator(1)],
        help_text="Share of energy from renewable sources, 0 to 1.",
    )
    grid_carbon_g_per_kwh = models.PositiveIntegerField(
        "grid carbon intensity (gCO2e/kWh)",
        null=True,
        blank=True,
        validators=[MaxValueValidator(2000)],
        help_text="Average emissions of the site's grid supply, for the share of its energy not "
        "covered by renewable contracts; empty if unknown.",
    )
    uplink_gbps = models.PositiveIntegerField(help_text="Network uplink capacity in Gbit/s.")
    former_use = models.CharField(
        max_length=200,
        blank=True,
        help_text="What the facility did before, e.g. 'bitcoin mining, 40k S19'.",
    )
    status = models.CharField(
        max_length=20, choices=SiteStatus.choices, default=SiteStatus.COMMISSIONING, db_index=True
    )
    burn_in_command = models.CharField(
        max_length=500,
        blank=True,
        help_text="Run by the agent before a GPU or node returns to sale, e.g. 'dcgmi diag -r 2' "
        "or a stress container; exit 0 passes. Empty: no burn-in at this site.",
    )
    burn_in_time_limit_seconds = models.PositiveIntegerField(
        default=1800, validators=[MinValueValidator(10), MaxValueValidator(86400)]
    )
    reliability_30d = models.DecimalField(
        "reliability (30 days)",
        max_digits=5,
        decimal_places=4,
        null=True,
        blank=True,
        editable=False,
        help_text="0 to 1, computed hourly from the last 30 days (docs/health.md); empty until then.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]
        constraints = [
            models.CheckConstraint(condition=Q(pue__gte=1), name="site_pue_at_least_one"),
            models.CheckConstraint(
                condition=Q(renewable_share__gte=0) & Q(renewable_share__lte=1),
                name="site_renewable_share_0_1",
            ),
            models.CheckConstraint(
                condition=Q(status__in=SiteStatus.values), name="site_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def reliability_pct(self):
        """The 30-day reliability in per cent, one decimal place; None before computed."""
        if self.reliability_30d is None:
            return None
        return (self.reliability_30d * 100).quantize(Decimal("0.1"))


class ZonePrice(models.Model):
    """A zone's power price for [starts_at, ends_at), per MWh, in the zone's currency.

    Intervals of one zone never overlap (the database's exclusion constraint); a correction
    replaces the interval it covers (inventory.grid_prices.zone_prices_upsert). `received_at`
    is when the row was last written by a feed: a zone whose newest write is older than
    GRID_PRICE_MAX_AGE is stale and priced from its sites' static prices.
    """

    zone = models.ForeignKey(PriceZone, on_delete=models.CASCADE, related_name="prices")
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    price_per_mwh = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    source = models.CharField(
        max_length=120, help_text="Who sent it: csv:<user>, api_key:<prefix>, node:<hostname>."
    )
    received_at = models.DateTimeField()

    class Meta:
        ordering = ["zone_id", "starts_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(ends_at__gt=models.F("starts_at")), name="zoneprice_ends_after_start"
            ),
            ExclusionConstraint(
                name="zoneprice_no_overlap_per_zone",
                expressions=[
                    ("zone", RangeOperators.EQUAL),
                    (
                        TsTzRange("starts_at", "ends_at", models.Value("[)")),
                        RangeOperators.OVERLAPS,
                    ),
                ],
            ),
        ]
        indexes = [
            models.Index(fields=["zone", "ends_at"], name="zoneprice_zone_ends"),
            models.Index(fields=["zone", "received_at"], name="zoneprice_zone_received"),
        ]

    def __str__(self) -> str:
        return f"{self.zone.code} {self.starts_at:%Y-%m-%d %H:%M}: {self.price_per_mwh}"


class GpuModel(models.Model):
    """A catalogue entry, e.g. h100-sxm-80gb."""

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=120)
    vendor = models.CharField(max_length=40)
    memory_gb = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    tdp_watts = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    interconnect = models.CharField(
        max_length=60, blank=True, help_text="e.g. NVLink 900 GB/s, PCIe 4.0"
    )

    class Meta:
        ordering = ["vendor", "-memory_gb", "slug"]
        verbose_name = "GPU model"

    def __str__(self) -> str:
        return self.name


class NodeStatus(models.TextChoices):
    AVAILABLE = "available"
    DRAINING = "draining"
    MAINTENANCE = "maintenance"
    OFFLINE = "offline"
    RETIRED = "retired"


class Node(models.Model):
    """A host at a site carrying GPUs of one model."""

    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="nodes")
    hostname = models.CharField(max_length=120, unique=True)
    gpu_model = models.ForeignKey(GpuModel, on_delete=models.PROTECT, related_name="nodes")
    cpu_model = models.CharField(max_length=120, blank=True)
    cpu_cores = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    ram_gb = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    disk_gb = models.PositiveIntegerField()
    nic_gbps = models.PositiveIntegerField()
    status = models.CharField(
        max_length=20, choices=NodeStatus.choices, default=NodeStatus.AVAILABLE, db_index=True
    )
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    # When the status last changed: silence is measured from the later of this and the last
    # heartbeat, so a node just returned to service is not marked offline for old silence.
    status_changed_at = models.DateTimeField(null=True, blank=True)
    agent_version = models.CharField(max_length=40, blank=True)
    reliability_30d = models.DecimalField(
        "reliability (30 days)",
        max_digits=5,
        decimal_places=4,
        null=True,
        blank=True,
        editable=False,
        help_text="0 to 1, computed hourly from the last 30 days (docs/health.md); empty until then.",
    )
    telemetry_error = models.CharField(
        max_length=300,
        blank=True,
        help_text="Why the last telemetry report was unreadable, if it was.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["site_id", "hostname"]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=NodeStatus.values), name="node_status_valid"
            ),
        ]
        indexes = [
            models.Index(fields=["site", "gpu_model", "status"]),
            # The offline sweeper's read: nodes it watches, silent since before a cutoff, so a
            # sweep costs the silent nodes, not the fleet.
            models.Index(
                fields=["last_heartbeat_at"],
                condition=Q(status__in=["available", "draining"]),
                name="node_watched_last_heartbeat",
            ),
        ]

    def __str__(self) -> str:
        return self.hostname


class HeartbeatFlush(models.Model):
    """One row: how far the heartbeat buffer is known to be written to inventory_node.

    Every heartbeat older than `flushed_through` is in `Node.last_heartbeat_at`; written in the
    same transaction as the times it covers (inventory.heartbeats), read by the offline sweeper.
    """

    flushed_through = models.DateTimeField()

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(id=1), name="heartbeat_flush_one_row")]

    def __str__(self) -> str:
        return f"heartbeats flushed through {self.flushed_through:%Y-%m-%d %H:%M:%S}"


class GpuHealth(models.TextChoices):
    OK = "ok"
    DEGRADED = "degraded"
    FAILED = "failed"


class Gpu(models.Model):
    """One physical device; the unit the marketplace allocates.

    Beside these fields the table has a column `busy` (tstzmultirange, default empty; declared
    by migration 0008, not a Django field since Django has none for multiranges): the union of
    the periods of the GPU's live allocations, so a search asks each GPU `NOT busy && window`
    instead of reading the allocations. Inventory never writes it: the marketplace's triggers
    on its allocation table refresh it for every GPU a statement books, frees or moves
    (marketplace migration 0009, marketplace_gpu_busy_refresh), locking the GPU rows in id
    order first. Its readers are the availability selectors (marketplace.selectors.availability).
    """

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="gpus")
    index = models.PositiveSmallIntegerField()
    serial = models.CharField(max_length=64, unique=True)
    health = models.CharField(max_length=10, choices=GpuHealth.choices, default=GpuHealth.OK)
    health_reported_at = models.DateTimeField(null=True, blank=True)
    health_reason = models.TextField(
        blank=True, help_text="Which health rule set the current state, and on what reading."
    )
    reliability_30d = models.DecimalField(
        "reliability (30 days)",
        max_digits=5,
        decimal_places=4,
        null=True,
        blank=True,
        editable=False,
        help_text="0 to 1, computed hourly from the last 30 days (docs/health.md); empty until then.",
    )
    # When the GPU's current run of over-temperature readings began (None: not over now).
    over_temp_since = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["node_id", "index"]
        verbose_name = "GPU"
        verbose_name_plural = "GPUs"
        constraints = [
            models.UniqueConstraint(fields=["node", "index"], name="gpu_unique_index_per_node"),
            models.CheckConstraint(
                condition=Q(health__in=GpuHealth.values), name="gpu_health_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.node.hostname}/gpu{self.index}"


class StatusChange(models.Model):
    """Who changed a site's or node's status, when and why."""

    site = models.ForeignKey(
        Site, null=True, blank=True, on_delete=models.CASCADE, related_name="status_changes"
    )
    node = models.ForeignKey(
        Node, null=True, blank=True, on_delete=models.CASCADE, related_name="status_changes"
    )
    from_status = models.CharField(max_length=20)
    to_status = models.CharField(max_length=20)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_label = models.CharField(
        max_length=120, help_text="The user, or the system task that acted."
    )
    reason = models.TextField()
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(site__isnull=False) & Q(node__isnull=True))
                | (Q(site__isnull=True) & Q(node__isnull=False)),
                name="status_change_site_xor_node",
            ),
        ]

    def __str__(self) -> str:
        target = self.node or self.site
        return f"{target}: {self.from_status} → {self.to_status}"


class NodeToken(models.Model):
    """A site agent's credential for one node. The secret is shown once; only its hash is kept."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="tokens")
    prefix = models.CharField(max_length=16, unique=True)
    secret_hash = models.CharField(max_length=64)
    label = models.CharField(max_length=120, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.node.hostname})"


class GpuHealthChange(models.Model):
    """A GPU's health moving from one state to another: who or what moved it, and why."""

    gpu = models.ForeignKey(Gpu, on_delete=models.CASCADE, related_name="health_changes")
    from_health = models.CharField(max_length=10)
    to_health = models.CharField(max_length=10)
    actor_label = models.CharField(max_length=120)
    reason = models.TextField()
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.gpu_id}: {self.from_health} → {self.to_health}"


class OutageCause(models.TextChoices):
    HEARTBEAT_MISSED = "heartbeat_missed"
    HARDWARE_FAILURE = "hardware_failure"
    GPU_FAILURE = "gpu_failure"
    PROVISIONING_FAILURE = "provisioning_failure"
    GRID_CURTAILMENT = "grid_curtailment"


class Outage(models.Model):
    """An interval during which a node (or, when `gpu` is set, one GPU of it) did not deliver;
    SLA credits are computed from these. A GPU outage hits only the work on that GPU."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="outages")
    gpu = models.ForeignKey(
        Gpu, null=True, blank=True, on_delete=models.CASCADE, related_name="outages"
    )
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    cause = models.CharField(max_length=30, choices=OutageCause.choices)
    detail = models.TextField(blank=True)

    class Meta:
        ordering = ["-started_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["node"],
                condition=Q(ended_at__isnull=True, gpu__isnull=True),
                name="outage_one_open_per_node",
            ),
            models.UniqueConstraint(
                fields=["gpu"],
                condition=Q(ended_at__isnull=True, gpu__isnull=False),
                name="outage_one_open_per_gpu",
            ),
            models.CheckConstraint(
                condition=Q(ended_at__isnull=True) | Q(ended_at__gt=models.F("started_at")),
                name="outage_ends_after_start",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.node.hostname} {self.cause} from {self.started_at:%Y-%m-%d %H:%M}"

    def clean(self) -> None:
        """What staff record (the admin runs this): a GPU of this node, in years that exist,
        and something that has happened: not in the future."""
        errors = {}
        if (
            self.gpu_id is not None
            and self.node_id is not None
            and self.gpu.node_id != self.node_id
        ):
            errors["gpu"] = "This GPU is on another node."
        latest = timezone.now() + timedelta(minutes=1)  # a minute of clock skew
        for name in ("started_at", "ended_at"):
            value = getattr(self, name)
            if value is not None and not within_bounds(value):
                errors[name] = OUT_OF_RANGE
            elif value is not None and value > latest:
                errors[name] = "An outage is recorded once it has happened: not in the future."
        if errors:
            raise ValidationError(errors)


class MaintenanceWindow(models.Model):
    """Planned downtime of a node; the marketplace never sells a GPU into one."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="maintenance_windows")
    period = DateTimeRangeField(help_text="Half-open [start, end).")
    reason = models.TextField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["node_id"]
        constraints = [
            ExclusionConstraint(
                name="maintenance_no_overlap_per_node",
                expressions=[("node", RangeOperators.EQUAL), ("period", RangeOperators.OVERLAPS)],
            ),
        ]

    def __str__(self) -> str:
        return f"{self.node.hostname} maintenance {self.period}"

    def plan_errors(self, *, now) -> dict[str, ValidationError]:
        """Why this window cannot be planned as it stands, by field: its node is retired (it
        has left the fleet), or it has already ended (a window plans downtime to come; one
        under way may still be planned). Checked by clean() (the admin) and by
        inventory.services.maintenance_window_create alike."""
        errors = {}
        if self.node_id is not None and self.node.status == NodeStatus.RETIRED:
            errors["node"] = ValidationError(
                f"Node {self.node.hostname} is retired: it gets no maintenance window.",
                code="node_retired",
            )
        period = self.period
        if period is not None and period.upper is not None and period.upper <= now:
            errors["period"] = ValidationError(
                "This window has already ended: a maintenance window plans downtime to come.",
                code="window_in_past",
            )
        return errors

    def clean(self) -> None:
        """A window added, or moved to another node or period, must pass plan_errors; one kept
        where it is (its reason edited) is not checked again, so a window that has since
        ended, or whose node has since retired, can still be edited."""
        if self.pk is not None:
            stored = MaintenanceWindow.objects.filter(pk=self.pk).values_list("node_id", "period")
            if stored.first() == (self.node_id, self.period):
                return
        errors = self.plan_errors(now=timezone.now())
        if errors:
            raise ValidationError(errors)


# --- Telemetry -------------------------------------------------------------------------------


class GpuSample(models.Model):
    """One raw telemetry reading of one GPU, as its agent sent it. Kept for
    TELEMETRY_RAW_RETENTION (hours) only: the per-minute rollup keeps the history.

    Written by COPY (inventory.telemetry); no foreign key constraint and one BRIN index, so a
    write costs the row and little else. Columns are the smallest types that hold the readings.
    """

    id = models.BigAutoField(primary_key=True)
    at = models.DateTimeField()
    gpu = models.ForeignKey(
        Gpu, on_delete=models.DO_NOTHING, db_constraint=False, db_index=False, related_name="+"
    )
    readable = models.BooleanField(default=True)
    temperature_c = models.SmallIntegerField(null=True)
    power_w = models.FloatField(null=True)
    utilization_pct = models.SmallIntegerField(null=True)
    memory_used_mib = models.IntegerField(null=True)
    sm_clock_mhz = models.SmallIntegerField(null=True)
    memory_clock_mhz = models.SmallIntegerField(null=True)
    throttle_reasons = models.CharField(max_length=200, blank=True)
    ecc_volatile_corrected = models.IntegerField(null=True)
    ecc_volatile_uncorrected = models.IntegerField(null=True)
    ecc_aggregate_corrected = models.IntegerField(null=True)
    ecc_aggregate_uncorrected = models.IntegerField(null=True)
    rows_remap_pending = models.BooleanField(null=True)
    rows_remap_failure = models.BooleanField(null=True)
    events = models.CharField(max_length=200, blank=True, help_text="Xid / driver event codes.")

    class Meta:
        indexes = [BrinIndex(fields=["at"], name="gpusample_at_brin")]

    def __str__(self) -> str:
        return f"GPU {self.gpu_id} at {self.at:%Y-%m-%d %H:%M:%S}"


class GpuMinute(models.Model):
    """A GPU's telemetry rolled up per minute; kept TELEMETRY_ROLLUP_RETENTION_DAYS (30)."""

    pk = models.CompositePrimaryKey("gpu_id", "minute")
    gpu_id = models.BigIntegerField()
    minute = models.DateTimeField()
    samples = models.SmallIntegerField()
    temperature_c_max = models.SmallIntegerField(null=True)
    power_w_avg = models.FloatField(null=True)
    utilization_pct_avg = models.FloatField(null=True)
    memory_used_mib_max = models.IntegerField(null=True)

    class Meta:
        ordering = ["gpu_id", "minute"]

    def __str__(self) -> str:
        return f"GPU {self.gpu_id} {self.minute:%Y-%m-%d %H:%M}"


class FleetMinute(models.Model):
    """The whole fleet's telemetry per minute, summed from the GPUs' minute rows by the same
    rollup run: 1,440 rows a day whatever the fleet's size, so the staff dashboard's daily
    GPU utilisation reads 30 days without scanning every GPU's minutes. Kept as GpuMinute."""

    minute = models.DateTimeField(primary_key=True)
    gpus = models.IntegerField(help_text="GPUs that reported in the minute.")
    utilization_gpus = models.IntegerField(help_text="Of those, the ones with a utilisation.")
    utilization_pct_sum = models.FloatField()
    power_w_sum = models.FloatField()

    class Meta:
        ordering = ["minute"]

    def __str__(self) -> str:
        return f"fleet {self.minute:%Y-%m-%d %H:%M}: {self.gpus} GPUs"


class HealthRules(models.Model):
    """The rule set that turns telemetry into GPU health; one row (id 1), edited in the admin.

    Failed (taken out of sale, its work moved or ended): a GPU the tool cannot reach, any
    uncorrectable ECC error since its last reset, a row-remapping failure, one of the failing
    Xid / driver events, or over-temperature (at or above the limit, or a thermal slowdown
    reported) for `over_temp_minutes`. Degraded (still sold, flagged): a row remap pending, or
    at least `degraded_corrected_errors` corrected ECC errors since its last reset.
    """

    failing_events = models.CharField(
        max_length=300,
        default="48,63,64,74,79,94,95,amd_ras_uncorrectable",
        help_text="Comma-separated Xid codes (NVIDIA) and driver event names (AMD) that fail a "
        "GPU.",
    )
    fail_on_uncorrectable_ecc = models.BooleanField(default=True)
    fail_on_row_remap_failure = models.BooleanField(default=True)
    fail_on_unreachable = models.BooleanField(
        default=True, help_text="A GPU the vendor tool cannot reach (fallen off the bus)."
    )
    over_temp_c = models.PositiveSmallIntegerField(
        default=90, validators=[MinValueValidator(40), MaxValueValidator(130)]
    )
    over_temp_minutes = models.PositiveSmallIntegerField(
        default=5, validators=[MinValueValidator(1), MaxValueValidator(1440)]
    )
    degrade_on_pending_remap = models.BooleanField(default=True)
    degraded_corrected_errors = models.PositiveIntegerField(
        default=10, help_text="Corrected ECC errors since the last reset that flag a GPU."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "health rules"
        constraints = [models.CheckConstraint(condition=Q(id=1), name="health_rules_one_row")]

    def __str__(self) -> str:
        return "GPU health rules"

    @classmethod
    def current(cls) -> "HealthRules":
        rules, _ = cls.objects.get_or_create(id=1)
        return rules

    def failing_event_codes(self) -> set[str]:
        return {code.strip() for code in self.failing_events.split(",") if code.strip()}


class BurnInStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class BurnIn(models.Model):
    """A burn-in run through a node's agent: the site's command on some of its GPUs (or all),
    with a time limit. The GPUs (or the node) are sold again only when it passes."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="burn_ins")
    gpu_indexes = models.JSONField(default=list, help_text="Empty: every GPU of the node.")
    command = models.CharField(max_length=500)
    time_limit_seconds = models.PositiveIntegerField()
    status = models.CharField(
        max_length=10, choices=BurnInStatus.choices, default=BurnInStatus.QUEUED
    )
    reason = models.TextField(help_text="Why it runs (who asked, after what).")
    requested_by = models.CharField(max_length=120)
    exit_code = models.IntegerField(null=True, blank=True)
    timed_out = models.BooleanField(default=False)
    output = models.TextField(blank=True, help_text="The command's last 64 KiB of output.")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["node"],
                condition=Q(status__in=["queued", "running"]),
                name="burn_in_one_open_per_node",
            ),
        ]

    def __str__(self) -> str:
        return f"burn-in {self.pk} on {self.node_id} ({self.status})"
