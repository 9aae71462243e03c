"""What is sold: organisations, API keys, quotes, reservations and GPU allocations."""

from django.conf import settings
from django.contrib.postgres.constraints import ExclusionConstraint
from django.contrib.postgres.fields import DateTimeRangeField, RangeOperators
from django.contrib.postgres.indexes import GistIndex
from django.db import models
from django.db.models import Q

from inventory.models import Gpu, GpuModel, Node, Site
from marketplace import ids

__all__ = [
    "Organization",
    "Role",
    "MANAGER_ROLES",
    "RESERVING_ROLES",
    "Membership",
    "Invitation",
    "ApiKeyScope",
    "ApiKey",
    "SshKey",
    "Tier",
    "Term",
    "Quote",
    "ReservationStatus",
    "LIVE_STATUSES",
    "Reservation",
    "ReservationTransition",
    "Allocation",
]


class Organization(models.Model):
    public_id = models.CharField(max_length=32, unique=True, default=ids.org_id, editable=False)
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Set by staff (organization_suspend): its keys are refused, its members only read, nothing
    # is booked, extended or charged and its webhooks wait, until staff lift it.
    suspended_at = models.DateTimeField(null=True, blank=True, editable=False)
    suspension_reason = models.TextField(blank=True, default="", editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Role(models.TextChoices):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"
    BILLING = "billing"


# Who may add, change and remove members and manage API keys.
MANAGER_ROLES = frozenset({Role.OWNER, Role.ADMIN})
# Who may quote, reserve, cancel and extend. The billing role reads; it does not buy.
RESERVING_ROLES = frozenset({Role.OWNER, Role.ADMIN, Role.MEMBER})


class Membership(models.Model):
    public_id = models.CharField(max_length=32, unique=True, default=ids.member_id, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="memberships"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "user"], name="membership_unique"),
            models.CheckConstraint(condition=Q(role__in=Role.values), name="membership_role_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} ({self.role})"


class Invitation(models.Model):
    """An e-mailed invitation to join an organisation with a role, accepted through its link.

    The link carries a random token; only its SHA-256 is stored, as for API keys. At most one
    invitation per address and organisation is open (neither accepted nor revoked) at a time.
    """

    public_id = models.CharField(
        max_length=32, unique=True, default=ids.invitation_id, editable=False
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="invitations"
    )
    email = models.EmailField(help_text="Lower-cased.")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "email"],
                condition=Q(accepted_at__isnull=True, revoked_at__isnull=True),
                name="invitation_one_open_per_email",
            ),
            models.CheckConstraint(condition=Q(role__in=Role.values), name="invitation_role_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.email} to {self.organization} ({self.role})"


class ApiKeyScope(models.TextChoices):
    READ = "read"
    WRITE = "write"
    # Cards, top-ups and billing settings: never implied by write, granted only by an owner.
    BILLING = "billing"
    # Pushing power prices for any zone (a grid data feed); granted only by staff.
    GRID = "grid"


class ApiKey(models.Model):
    """An organisation's API credential. The secret is shown once; we keep its SHA-256 only."""

    public_id = models.CharField(max_length=32, unique=True, default=ids.api_key_id, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=120)
    prefix = models.CharField(
        max_length=16, unique=True, help_text="Visible part, e.g. sk_live_ab12."
    )
    secret_hash = models.CharField(max_length=64, unique=True)
    scopes = models.JSONField(
        default=list, help_text='Subset of ["read", "write", "billing", "grid"].'
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class SshKey(models.Model):
    """An SSH public key saved by an organisation, to install on the nodes it reserves.

    public_key is the normalised line ("type body [comment]"); the fingerprint is OpenSSH's
    SHA256 of the key blob, so the same key with another comment is still the same key.
    """

    public_id = models.CharField(max_length=32, unique=True, default=ids.ssh_key_id, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="ssh_keys"
    )
    name = models.CharField(max_length=100)
    public_key = models.TextField()
    fingerprint = models.CharField(max_length=64, help_text="SHA256:<base64>, as ssh-keygen -l.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "SSH key"
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "fingerprint"], name="ssh_key_unique_fingerprint"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.fingerprint})"


class Tier(models.TextChoices):
    ON_DEMAND = "on_demand", "On-demand"
    RESERVED = "reserved", "Reserved"
    INTERRUPTIBLE = "interruptible", "Interruptible"


class Term(models.TextChoices):
    """Commitment length of a reserved-tier reservation."""

    NONE = "none"
    WEEK = "1w"
    MONTH = "1m"
    QUARTER = "3m"
    YEAR = "1y"


class Quote(models.Model):
    """A priced answer to "N GPUs of model M from T1 to T2 at tier X", held for a few minutes."""

    public_id = models.CharField(max_length=32, unique=True, default=ids.quote_id, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="quotes")
    gpu_model = models.ForeignKey(GpuModel, on_delete=models.PROTECT, related_name="+")
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="+")
    gpu_count = models.PositiveIntegerField()
    tier = models.CharField(max_length=20, choices=Tier.choices)
    term = models.CharField(max_length=4, choices=Term.choices, default=Term.NONE)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    currency = models.CharField(max_length=3)
    price_per_gpu_hour = models.DecimalField(max_digits=12, decimal_places=4)
    total_amount = models.DecimalField(max_digits=14, decimal_places=2)
    breakdown = models.JSONField()
    min_reliability = models.DecimalField(
        max_digits=5,
        decimal_places=4,
        null=True,
        blank=True,
        help_text="The reliability floor (0-1) the quote was asked with: booking it places "
        "only on nodes at or above it.",
    )
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(ends_at__gt=models.F("starts_at")), name="quote_period_valid"
            ),
            models.CheckConstraint(condition=Q(gpu_count__gte=1), name="quote_gpu_count_positive"),
        ]

    def __str__(self) -> str:
        return self.public_id


class ReservationStatus(models.TextChoices):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    PROVISIONING = "provisioning"
    ACTIVE = "active"
    RELEASING = "releasing"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    PREEMPTED = "preempted"


# Statuses in which a reservation holds its GPUs.
LIVE_STATUSES = (
    ReservationStatus.PENDING,
    ReservationStatus.SCHEDULED,
    ReservationStatus.PROVISIONING,
    ReservationStatus.ACTIVE,
    ReservationStatus.RELEASING,
)


class Reservation(models.Model):
    """What a customer bought: GPUs of one model at one site for a half-open period."""

    public_id = models.CharField(
        max_length=32, unique=True, default=ids.reservation_id, editable=False
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="reservations"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    quote = models.OneToOneField(
        Quote, null=True, blank=True, on_delete=models.SET_NULL, related_name="reservation"
    )
    gpu_model = models.ForeignKey(GpuModel, on_delete=models.PROTECT, related_name="+")
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="reservations")
    gpu_count = models.PositiveIntegerField()
    tier = models.CharField(max_length=20, choices=Tier.choices)
    term = models.CharField(max_length=4, choices=Term.choices, default=Term.NONE)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    currency = models.CharField(max_length=3)
    price_per_gpu_hour = models.DecimalField(max_digits=12, decimal_places=4)
    total_amount = models.DecimalField(
        max_digits=14, decimal_places=2, help_text="Price of the whole period as quoted."
    )
    breakdown = models.JSONField(default=dict)
    status = models.CharField(
        max_length=20,
        choices=ReservationStatus.choices,
        default=ReservationStatus.PENDING,
        db_index=True,
    )
    status_reason = models.TextField(blank=True)
    workload = models.JSONField(default=dict, blank=True, help_text="Image, SSH keys, env, ports.")
    connection = models.JSONField(default=dict, blank=True, help_text="Host and ports once active.")
    activated_at = models.DateTimeField(null=True, blank=True)
    released_at = models.DateTimeField(null=True, blank=True)
    cancellation = models.JSONField(
        default=dict,
        blank=True,
        help_text="Set when cancelled: at, rule, refund_amount, fee_amount (billing settles it).",
    )
    # Interruptible only: the notice of a preemption (a grid curtailment of the site). The
    # dispatcher preempts the reservation at preempt_at; the API shows the notice until then.
    preempt_at = models.DateTimeField(null=True, blank=True)
    # db_default: app servers still on the previous release keep inserting during a deploy.
    preempt_reason = models.TextField(blank=True, default="", db_default="")
    placement_generation = models.PositiveIntegerField(
        default=0,
        db_default=0,
        help_text="Raised each time its GPUs are moved while it lives: the workload is "
        "restarted for the new generation (site-agent jobs carry it).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(ends_at__gt=models.F("starts_at")), name="reservation_period_valid"
            ),
            models.CheckConstraint(
                condition=Q(gpu_count__gte=1), name="reservation_gpu_count_positive"
            ),
            models.CheckConstraint(
                condition=Q(status__in=ReservationStatus.values), name="reservation_status_valid"
            ),
        ]
        indexes = [
            models.Index(fields=["organization", "-created_at"]),
            models.Index(fields=["status", "starts_at"]),
            models.Index(fields=["status", "ends_at"]),
            models.Index(
                fields=["preempt_at"],
                condition=Q(preempt_at__isnull=False),
                name="reservation_preempt_at_idx",
            ),
            # The provisioning dispatcher's teardown scan (every 5 s): recently ended
            # reservations that may still have a workload to stop, not all ended history.
            models.Index(
                fields=["released_at"],
                condition=Q(status__in=["preempted", "failed", "cancelled"]),
                name="reservation_teardown_idx",
            ),
        ]

    def __str__(self) -> str:
        return self.public_id


class ReservationTransition(models.Model):
    """One entry of a reservation's history: a state change, or an extension (the same status
    before and after), with its cause and who made it."""

    reservation = models.ForeignKey(
        Reservation, on_delete=models.CASCADE, related_name="transitions"
    )
    from_status = models.CharField(max_length=20)
    to_status = models.CharField(max_length=20)
    cause = models.TextField()
    actor_label = models.CharField(max_length=120)
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.reservation_id}: {self.from_status} → {self.to_status}"


class Allocation(models.Model):
    """One GPU serving one reservation for a half-open period.

    The exclusion constraint makes double booking impossible: no two live allocations of the
    same GPU may overlap. Past allocations are kept (is_live = false) for the record only.
    """

    reservation = models.ForeignKey(
        Reservation, on_delete=models.CASCADE, related_name="allocations"
    )
    gpu = models.ForeignKey(Gpu, on_delete=models.PROTECT, related_name="allocations")
    node = models.ForeignKey(
        Node,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="The GPU's node, kept for locking.",
    )
    period = DateTimeRangeField()
    is_live = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            ExclusionConstraint(
                name="allocation_no_double_booking",
                expressions=[("gpu", RangeOperators.EQUAL), ("period", RangeOperators.OVERLAPS)],
                condition=Q(is_live=True),
            ),
        ]
        indexes = [
            GistIndex(
                fields=["period", "gpu"],
                condition=Q(is_live=True),
                name="allocation_live_period_idx",
            ),
            # Per-node probes (availability for one model or site, placement): one probe per
            # node instead of one per GPU; gpu included so the probe is index-only.
            GistIndex(
                fields=["node", "period", "gpu"],
                condition=Q(is_live=True),
                name="allocation_live_node_period_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.gpu_id} {self.period}"
