import re
import secrets
from datetime import timedelta

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import UserCreationForm
from django.utils import timezone

from config.errors import ValidationFailed
from config.once import OnceField
from marketplace.models import (
    RESALE_TIER_CHOICES,
    ApiKeyScope,
    EventType,
    ReservationStatus,
    Role,
    Tier,
)
from marketplace.portal.fields import PortalAmountField, PortalDateTimeField, PortalMinuteField
from marketplace.provisioning.workload import MAX_SSH_KEYS
from marketplace.rules import email_address_plain
from marketplace.services.pricing import TERM_LENGTHS
from marketplace.templatetags.portal_format import status_label

__all__ = [
    "SignupForm",
    "SignupConfirmForm",
    "EmailChangeForm",
    "OrganizationForm",
    "ApiKeyCreateForm",
    "MemberRoleForm",
    "PLANS",
    "SearchForm",
    "ReserveForm",
    "QuoteReserveForm",
    "ResaleBuyForm",
    "ReservationFilterForm",
    "CancelForm",
    "ExtendForm",
    "SshKeyCreateForm",
    "InvitationCreateForm",
]


_USERNAME_CHARACTERS = re.compile(r"[A-Za-z0-9@.+\-_]+")
_USERNAME_HELP = "Letters a-z, digits and @ . + - _ only (150 at most)."


def _username_plain(username: str) -> str:
    # Other people read a user name (team lists, reservation history, audit): letters
    # from other scripts that look like Latin ones ("pаypal" with a Cyrillic "а") would let
    # one account pass for another, so names are plain ASCII.
    if not _USERNAME_CHARACTERS.fullmatch(username):
        raise forms.ValidationError(
            "Use only letters a-z, digits and @ . + - _ in a user name.",
            code="username_characters",
        )
    return username


class SignupForm(UserCreationForm):
    """Sign-up. Whether the e-mail address has an account is not checked here (the answer
    would tell anyone), through an invitation's link too: the account is created through a
    link mailed to the address."""

    email = forms.EmailField(help_text="Where notices about your reservations and billing go.")
    organization = forms.CharField(
        label="Organisation name", max_length=100, help_text="Your team or company."
    )

    class Meta(UserCreationForm.Meta):
        fields = ("username", "email")
        # Django's says "Letters, digits and @/./+/-/_", which reads as any script's letters.
        help_texts = {"username": _USERNAME_HELP}

    def clean_username(self):
        return _username_plain(super().clean_username())

    def clean_email(self):
        # One account per address is kept by signup_request and signup_confirm, unsaid here.
        try:
            return email_address_plain(self.cleaned_data["email"].strip())
        except ValidationFailed as exc:
            raise forms.ValidationError(exc.message, code=exc.code) from None


class EmailChangeForm(forms.Form):
    """A new e-mail address for the signed-in account, with its current password (a session
    left open is not enough to move the account's mail, and its password resets, elsewhere)."""

    email = forms.EmailField(label="New e-mail address")
    password = forms.CharField(
        label="Current password", strip=False, widget=forms.PasswordInput(render_value=False)
    )

    def __init__(self, *args, user, **kwargs):
        self.user = user
        super().__init__(*args, **kwargs)

    def clean_email(self):
        try:
            return email_address_plain(self.cleaned_data["email"].strip())
        except ValidationFailed as exc:
            raise forms.ValidationError(exc.message, code=exc.code) from None

    def clean_password(self):
        if not self.user.check_password(self.cleaned_data["password"]):
            raise forms.ValidationError("That is not your current password.", code="password")
        return self.cleaned_data["password"]


class SignupConfirmForm(forms.Form):
    """Finishing a sign-up through its mailed link: the user name, which can be changed if
    another account took it meanwhile."""

    username = forms.CharField(
        label="Username",
        max_length=150,
        validators=[get_user_model().username_validator],
        help_text=_USERNAME_HELP,
    )

    def clean_username(self):
        return _username_plain(self.cleaned_data["username"])


class OrganizationForm(forms.Form):
    name = forms.CharField(label="Organisation name", max_length=100)
    # Sent twice (a double click), the form creates one organisation (OrganizationNewView).
    once = OnceField()


# --- finding and reserving GPUs -------------------------------------------------------------
class MinuteInput(forms.DateTimeInput):
    """datetime-local to the minute: a value with seconds would make the browser refuse every
    whole-minute time (its step counts from the value shown)."""

    input_type = "datetime-local"

    def __init__(self, attrs=None):
        super().__init__(attrs={"step": "60", **(attrs or {})}, format="%Y-%m-%dT%H:%M")


# One choice for tier and term together, as customers think of it.
PLANS = {
    "on_demand": ("on_demand", "none", "On-demand (by the second, cancel any time)"),
    "interruptible": ("interruptible", "none", "Interruptible (cheaper; may be preempted)"),
    "reserved_1w": ("reserved", "1w", "Reserved, 1 week"),
    "reserved_1m": ("reserved", "1m", "Reserved, 1 month"),
    "reserved_3m": ("reserved", "3m", "Reserved, 3 months"),
    "reserved_1y": ("reserved", "1y", "Reserved, 1 year"),
}


class SearchForm(forms.Form):
    """What a customer asks for; clean() gives the period, tier and term the services take."""

    gpu_model = forms.ChoiceField(label="GPU model", required=False)
    min_gpu_memory_gb = forms.IntegerField(
        label="Or at least (GB of GPU memory)", required=False, min_value=1, max_value=4096
    )
    # A link that leaves these out (hand-made, or from an older page) asks for what the form
    # shows selected: one GPU, on-demand (clean_gpu_count, clean_plan), not a form error.
    gpu_count = forms.IntegerField(
        label="GPUs", min_value=1, max_value=4096, initial=1, required=False
    )
    plan = forms.ChoiceField(
        label="Plan",
        choices=[(k, v[2]) for k, v in PLANS.items()],
        initial="on_demand",
        required=False,
    )
    starts_at = PortalDateTimeField(
        label="Start (UTC)",
        required=False,
        widget=MinuteInput(),
        help_text="Blank: now.",
    )
    hours = forms.IntegerField(
        label="Hours",
        required=False,
        min_value=1,
        max_value=366 * 24,
        help_text="Blank: 24 hours, or the whole term for a reserved plan.",
    )
    region = forms.ChoiceField(required=False)
    site = forms.ChoiceField(required=False)
    min_reliability = forms.DecimalField(
        label="Reliability at least (%)",
        required=False,
        min_value=0,
        max_value=100,
        decimal_places=2,
        help_text="Over the last 30 days: outages, failed starts, GPU failures.",
    )
    max_price_per_gpu_hour = PortalAmountField(
        label="Max price per GPU-hour",
        required=False,
        min_value=0,
        max_digits=12,
        decimal_places=4,  # a price per GPU-hour, finer than any currency's minor unit
        widget=forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off"}),
    )
    min_renewable_pct = forms.DecimalField(
        label="Renewable at least (%)",
        required=False,
        min_value=0,
        max_value=100,
        decimal_places=1,
        help_text="The site's share of energy from renewable sources.",
    )
    max_grid_carbon = forms.IntegerField(
        label="Grid carbon at most (gCO₂e/kWh)",
        required=False,
        min_value=0,
        max_value=2000,
        help_text="The site grid's average intensity; sites without the figure are left out.",
    )
    max_pue = forms.DecimalField(
        label="PUE at most",
        required=False,
        min_value=1,
        max_value=5,
        decimal_places=2,
        help_text="Power usage effectiveness: 1.00 means no cooling or power overhead.",
    )

    def __init__(self, *args, gpu_models=(), sites=(), currency=None, **kwargs):
        super().__init__(*args, **kwargs)
        if currency:
            # Offers are shown in the currency the organisation is billed in, the only one
            # it can book in: the cap is in it too.
            price = self.fields["max_price_per_gpu_hour"]
            price.label = f"Max price per GPU-hour ({currency.upper()})"
            price.help_text = f"Your organisation is billed in {currency.upper()}."
        self.fields["gpu_model"].choices = [("", "Any")] + [
            (m.slug, f"{m.name} ({m.memory_gb} GB)") for m in gpu_models
        ]
        self.fields["site"].choices = [("", "Any")] + [(s.slug, s.name) for s in sites]
        self.fields["region"].choices = [("", "Any")] + [
            (r, r) for r in sorted({s.region for s in sites})
        ]

    def clean_gpu_count(self) -> int:
        count = self.cleaned_data.get("gpu_count")
        return self.fields["gpu_count"].initial if count is None else count

    def clean_plan(self) -> str:
        return self.cleaned_data.get("plan") or self.fields["plan"].initial

    def clean(self):
        data = super().clean()
        if "plan" not in data:
            return data
        tier, term, _ = PLANS[data["plan"]]
        starts_at = data.get("starts_at") or timezone.now().replace(microsecond=0)
        if data.get("hours"):
            length = timedelta(hours=data["hours"])
        else:
            length = TERM_LENGTHS[term] if term != "none" else timedelta(hours=24)
        data.update(tier=tier, term=term, starts_at=starts_at, ends_at=starts_at + length)
        return data


class ReserveForm(forms.Form):
    """What runs on the GPUs (optional): checked by the same workload rules as the API.

    With `saved_keys` (the organisation's saved SSH keys), they are offered as checkboxes, all
    ticked at first when a reservation may take them all (MAX_SSH_KEYS), none when it may
    not; the ticked ones join the pasted keys (services.ssh_keys).
    """

    image = forms.CharField(
        label="Container image",
        required=False,
        max_length=255,
        help_text="Blank: the platform's default CUDA image.",
    )
    ssh_key_ids = forms.MultipleChoiceField(
        label="Saved SSH keys",
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Ticked keys are installed for root on every node.",
    )
    ssh_public_keys = forms.CharField(
        label="SSH public keys",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="One per line; they are installed for root on every node.",
    )
    without_ssh = forms.BooleanField(
        label="Run without SSH access",
        required=False,
        help_text="Only if the image does its work on its own: without a key nobody can log in.",
    )

    def __init__(self, *args, saved_keys=(), **kwargs):
        super().__init__(*args, **kwargs)
        choices = [(k.public_id, f"{k.name} ({k.fingerprint})") for k in saved_keys]
        if choices:
            self.fields["ssh_key_ids"].choices = choices
            if len(choices) <= MAX_SSH_KEYS:
                self.fields["ssh_key_ids"].initial = [value for value, _ in choices]
            else:  # all ticked would be refused (too_many_ssh_keys): the customer picks
                self.fields[
                    "ssh_key_ids"
                ].help_text = (
                    f"Tick at most {MAX_SSH_KEYS}: they are installed for root on every node."
                )
        else:
            del self.fields["ssh_key_ids"]

    def clean(self):
        data = super().clean()
        pasted = any(line.strip() for line in data.get("ssh_public_keys", "").splitlines())
        if not (pasted or data.get("ssh_key_ids") or data.get("without_ssh")):
            field = "ssh_key_ids" if "ssh_key_ids" in self.fields else "ssh_public_keys"
            self.add_error(
                field,
                "Add an SSH key to log in to the nodes"
                + (" (tick a saved one or paste one)" if field == "ssh_key_ids" else "")
                + ", or tick “Run without SSH access” if the image needs none.",
            )
        return data

    def workload(self) -> dict:
        data = self.cleaned_data
        workload: dict = {}
        if data.get("image"):
            workload["image"] = data["image"].strip()
        keys = [line.strip() for line in data.get("ssh_public_keys", "").splitlines()]
        if any(keys):
            workload["ssh_public_keys"] = [k for k in keys if k]
        return workload

    def saved_key_ids(self) -> list[str]:
        return list(self.cleaned_data.get("ssh_key_ids", []))


class QuoteReserveForm(ReserveForm):
    """The quote's booking form, with the max price per GPU-hour of the search the quote was
    made from (hidden, carried from the search through the quote's page): the booking is
    refused above it (services.reservations BookingRequest.price_check), as the API's
    `max_price` is."""

    max_price_per_gpu_hour = PortalAmountField(
        required=False, min_value=0, max_digits=12, decimal_places=4, widget=forms.HiddenInput
    )

    def clean(self):
        data = super().clean()
        if self.has_error("max_price_per_gpu_hour"):  # hidden: said above the form
            self.add_error(None, "The search's max price could not be read; search again.")
        return data


class ResaleBuyForm(ReserveForm):
    """The resold time's booking form: a one-time key, so that the form sent twice (a double
    click on "Reserve") books once. Optional, so that a form without it still books."""

    once = forms.CharField(
        widget=forms.HiddenInput,
        required=False,
        max_length=64,
        initial=lambda: secrets.token_urlsafe(16),
    )


class ReservationFilterForm(forms.Form):
    """The reservation list's filters; each blank means any. `sites`: the public sites."""

    status = forms.ChoiceField(
        required=False,
        # Named as the pages show a status (portal_format.status_label).
        choices=[("", "Any")] + [(s, status_label(s)) for s in ReservationStatus.values],
    )
    tier = forms.ChoiceField(required=False, label="Plan", choices=[("", "Any")] + Tier.choices)
    site = forms.ChoiceField(required=False)

    def __init__(self, *args, sites=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["site"].choices = [("", "Any")] + [(s.slug, s.name) for s in sites]

    def active_filters(self) -> dict[str, str]:
        """The filters set (valid form only), e.g. for links that must keep them."""
        return {name: value for name, value in self.cleaned_data.items() if value}


class CancelForm(forms.Form):
    reason = forms.CharField(required=False, max_length=500, label="Reason (optional)")
    # Set only by the confirmation page, which states the refund first: a POST without it
    # shows that page instead of cancelling.
    confirm = forms.BooleanField(required=False, widget=forms.HiddenInput)
    # The refund rule's share the confirmation page stated: confirmed once a boundary of the
    # rule has passed (7 days' or 24 hours' notice), the page is shown again, not applied.
    refund_fraction = forms.DecimalField(
        required=False, min_value=0, max_value=1, max_digits=5, decimal_places=4,
        widget=forms.HiddenInput,
    )  # fmt: skip


class ExtendForm(forms.Form):
    ends_at = PortalMinuteField(label="New end (UTC)", widget=MinuteInput())
    confirm = forms.BooleanField(required=False, widget=forms.HiddenInput)


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(
        max_length=120, help_text="To recognise the key later, e.g. “CI runner”."
    )
    scopes = forms.MultipleChoiceField(
        choices=ApiKeyScope.choices,
        widget=forms.CheckboxSelectMultiple,
        initial=[ApiKeyScope.READ],
        error_messages={"required": "Choose at least one scope."},
        help_text="read: GET only. write: everything a member can do (includes read), except "
        "moving money. billing: cards, top-ups and billing settings (owners only). grid: "
        "push power prices for any price zone (staff only).",
    )
    # A one-time token (see portal.keys): reloading the page that shows the secret re-sends
    # the form, and that must not create a second key.
    once = forms.CharField(widget=forms.HiddenInput, required=False)

    def __init__(
        self, *args, can_grant_billing: bool = False, can_grant_grid: bool = False, **kwargs
    ):
        super().__init__(*args, **kwargs)
        hidden = {ApiKeyScope.BILLING} if not can_grant_billing else set()
        if not can_grant_grid:
            hidden.add(ApiKeyScope.GRID)
        self.fields["scopes"].choices = [c for c in ApiKeyScope.choices if c[0] not in hidden]


class MemberRoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class SshKeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="To recognise the key, e.g. “laptop”.")
    public_key = forms.CharField(
        label="Public key",
        max_length=16384,
        widget=forms.Textarea(attrs={"rows": 4, "spellcheck": "false"}),
        help_text="One line, e.g. the contents of <code>~/.ssh/id_ed25519.pub</code>: "
        "ssh-ed25519, ssh-rsa (2048 bits or more) or ecdsa-sha2-nistp256/384/521.",
    )


class InvitationCreateForm(forms.Form):
    """The team page's invitation form (prefix="invite": its fields are invite-email and
    invite-role, apart from the page's other forms)."""

    email = forms.EmailField(label="E-mail address", help_text="They need no account yet.")
    role = forms.ChoiceField(
        label="Invite as",
        choices=Role.choices,
        initial=Role.MEMBER,
        help_text="Owner: everything, the owner role included. Admin: everything else (team, "
        "API keys, webhooks, audit log, billing, reservations). Member: finds GPUs, reserves, "
        "extends and cancels, adds SSH keys; reads billing. Billing: cards, top-ups and billing "
        "settings; sees reservations but does not book.",
    )


class WebhookEndpointForm(forms.Form):
    # Sent twice (a double click, a reload of the page with the secret): one endpoint.
    once = OnceField()
    url = forms.URLField(
        label="URL",
        max_length=2000,
        assume_scheme="https",
        help_text="https, on a public address. We POST events here.",
    )
    event_types = forms.MultipleChoiceField(
        label="Events",
        choices=EventType.choices,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked: every event.",
    )
    description = forms.CharField(max_length=200, required=False)


class ListingForm(forms.Form):
    """Resell part of a reserved term (services.resale.listing_create checks the rest).
    Prefixed: it shares the term's page with the extend form (ids stay unique)."""

    prefix = "resale"

    # Sent twice (a double click), the form lists once.
    once = OnceField()
    gpu_count = forms.IntegerField(label="GPUs", min_value=1, max_value=4096)
    starts_at = PortalMinuteField(label="From (UTC)", widget=MinuteInput())
    ends_at = PortalMinuteField(label="Until (UTC)", widget=MinuteInput())
    price_per_gpu_hour = PortalAmountField(
        label="Asking price per GPU-hour",
        max_digits=12,
        decimal_places=4,
        min_value=0,
        widget=forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off"}),
        help_text="Not below the floor.",
    )
    tier = forms.ChoiceField(
        label="Sold as",
        choices=RESALE_TIER_CHOICES,
        help_text="Interruptible time is cheaper to buyers and may be preempted by the grid.",
    )
