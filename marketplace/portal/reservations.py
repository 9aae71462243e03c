"""Portal: find GPUs, hold a price (a quote), reserve, and follow, cancel or extend a reservation.

The same services as the API: availability_search for offers, quote_create to hold an offer's
price for settings.QUOTE_TTL, reservation_create from the quote, cancellation_terms stated
before reservation_cancel applies them, reservation_extend.
"""

from datetime import datetime, timedelta
from decimal import Decimal
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views import View

from config.errors import ApplicationError, PaymentRequired
from config.replica import replica_reads
from inventory.models import Node, Site, SiteStatus
from marketplace.filters import ReservationFilter
from marketplace.funding import funding_gate
from marketplace.models import LIVE_STATUSES, ApiKey, ReservationStatus, Tier
from marketplace.portal.forms import (
    PLANS,
    CancelForm,
    ExtendForm,
    ListingForm,
    QuoteReserveForm,
    ReservationFilterForm,
    SearchForm,
)
from marketplace.portal.live import progress, running_time
from marketplace.portal.mixins import PortalView, show_error
from marketplace.portal.nav import portal_funding
from marketplace.provisioning.workload import workload_public, workload_validate
from marketplace.selectors.availability import AvailabilityQuery, availability_search
from marketplace.selectors.catalogue import gpu_model_list, quote_get_for_org, site_list_public
from marketplace.selectors.gpu_catalogue import CATALOGUE_PLANS, gpu_catalogue
from marketplace.selectors.resale import listings_for_reservation
from marketplace.selectors.reservations import (
    reservation_charged,
    reservation_elapsed_seconds,
    reservation_get_for_org,
    reservation_list_for_org,
    reservation_remaining_seconds,
    reservations_charged_load,
)
from marketplace.selectors.ssh_keys import ssh_key_list_for_org
from marketplace.selectors.telemetry import reservation_energy, reservation_telemetry
from marketplace.services.energy import booking_energy
from marketplace.services.organizations import RESERVING_ROLES
from marketplace.services.quotes import currencies_elsewhere, quote_create
from marketplace.services.reservations import (
    cancellation_rule,
    cancellation_terms,
    extension_terms,
    reservation_cancel,
    reservation_create,
    reservation_extend,
)
from marketplace.services.ssh_keys import workload_add_saved_ssh_keys
from marketplace.services.transitions import (
    PREEMPTIBLE_STATUSES,
    TERMINAL_STATUSES,
    reservation_allowed_actions,
)
from marketplace.templatetags.portal_format import money, plan_label, utc

RESERVATIONS_PAGE_SIZE = 50


def _search_form(data=None, *, currency: str | None = None) -> SearchForm:
    return SearchForm(
        data, gpu_models=gpu_model_list(), sites=site_list_public(), currency=currency
    )


def _field_error(form, exc: ApplicationError) -> None:
    """A service's refusal, on its field when the form has one (else above the form).

    Workload fields come back as "workload.ssh_public_keys.1": the form field is the middle.
    """
    name = (exc.field or "").removeprefix("workload.").split(".")[0]
    form.add_error(name if name in form.fields else None, exc.message)


def search_url(**params) -> str:
    """The search page for these parameters (blank ones left out): a link that keeps them."""
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return reverse("portal:search") + (f"?{query}" if query else "")


def search_params_for_quote(quote) -> dict:
    """The search a quote came from, so "Back to the search" and "Search again" keep it.

    A start that has passed (a quote for "now", read a few minutes later) is left blank, as it
    was asked: now. Kept, the search would refuse it as in the past."""
    plan = next(
        k for k, (tier, term, _) in PLANS.items() if (tier, term) == (quote.tier, quote.term)
    )
    seconds = int((quote.ends_at - quote.starts_at).total_seconds())
    return {
        "gpu_model": quote.gpu_model.slug,
        "gpu_count": quote.gpu_count,
        "plan": plan,
        "starts_at": quote.starts_at.strftime("%Y-%m-%dT%H:%M")
        if quote.starts_at > timezone.now()
        else None,
        "hours": seconds // 3600 if seconds % 3600 == 0 else None,
        "site": quote.site.slug,
        "min_reliability": None
        if quote.min_reliability is None
        else f"{(quote.min_reliability * 100).normalize():f}",
    }


def node_specs(node_ids: list[int]) -> dict[int, Node]:
    """The offered nodes' CPUs, memory, disk and network, by id (one query for a page)."""
    return Node.objects.only("cpu_model", "cpu_cores", "ram_gb", "disk_gb", "nic_gbps").in_bulk(
        node_ids
    )


def nothing_fits_reasons(asked: dict) -> list[str]:
    """Why a search found nothing, where the reason is known: sites shedding load."""
    sites = Site.objects.filter(status=SiteStatus.CURTAILED)
    if asked.get("gpu_model"):
        sites = sites.filter(nodes__gpu_model__slug=asked["gpu_model"])
    if asked.get("site"):
        sites = sites.filter(slug=asked["site"])
    curtailed = sorted({site.name for site in sites})
    if not curtailed:
        return []
    offering = Site.objects.filter(status=SiteStatus.ACTIVE)
    if asked.get("gpu_model"):
        offering = offering.filter(nodes__gpu_model__slug=asked["gpu_model"])
    where = ", ".join(curtailed)
    if asked.get("site") or not offering.exists():
        return [
            f"Every site that has these GPUs is curtailed now: its grid operator asked it to "
            f"shed load ({where}). Try another GPU model, or a later start."
        ]
    return [f"Curtailed now by their grid operators, so not selling: {where}."]


def _reliability_floor(cleaned: dict) -> Decimal | None:
    """The form's floor in % as the services take it (0-1)."""
    percent = cleaned.get("min_reliability")
    return None if percent is None else percent / 100


def _search_query(cleaned: dict, *, currency: str | None) -> AvailabilityQuery:
    """The search form's fields as the search takes them (percentages as 0-1), for offers
    priced in `currency` (the one the organisation is billed in: it can book no other)."""
    renewable_pct = cleaned.get("min_renewable_pct")
    return AvailabilityQuery(
        gpu_count=cleaned["gpu_count"],
        starts_at=cleaned["starts_at"],
        ends_at=cleaned["ends_at"],
        tier=cleaned["tier"],
        term=cleaned["term"],
        gpu_model=cleaned["gpu_model"] or None,
        min_gpu_memory_gb=cleaned["min_gpu_memory_gb"],
        region=cleaned["region"] or None,
        site=cleaned["site"] or None,
        max_price_per_gpu_hour=cleaned["max_price_per_gpu_hour"],
        min_reliability=_reliability_floor(cleaned),
        min_renewable_share=None if renewable_pct is None else renewable_pct / 100,
        max_grid_carbon_g_per_kwh=cleaned.get("max_grid_carbon"),
        max_pue=cleaned.get("max_pue"),
        currency=currency,
        include_resale=True,
    )


class SearchView(PortalView, View):
    """GET: the search form and, once asked, the offers that can be reserved right now."""

    @replica_reads
    def get(self, request):
        asked = bool(request.GET)
        currency = funding_gate().billing_currency(organization_id=self.organization.pk)
        form = _search_form(request.GET if asked else None, currency=currency)
        offers = None
        if asked and form.is_valid():
            d = form.cleaned_data
            try:
                offers = availability_search(_search_query(d, currency=currency))
            except ApplicationError as exc:
                _field_error(form, exc)
            else:
                specs = node_specs([offer.nodes[0].node_id for offer in offers if offer.nodes])
                offers = [
                    (
                        offer,
                        offer.energy(),
                        specs.get(offer.nodes[0].node_id) if offer.nodes else None,
                    )
                    for offer in offers
                ]
        status = 400 if asked and form.errors else 200
        context = {"form": form, "offers": offers, "can_reserve": self._can_reserve()}
        if not asked:
            # Before any search: the catalogue, each price a search link for that plan.
            context["catalogue"] = gpu_catalogue(now=timezone.now(), currency=currency)
            context["plans"] = [(key, PLANS[key][2].split(" (")[0]) for key, *_ in CATALOGUE_PLANS]
        if offers is not None:
            context["asked"] = form.cleaned_data
            context["asked_plan"] = PLANS[form.cleaned_data["plan"]][2]  # as the form names it
            context["search_query"] = request.GET.urlencode()
            if not offers:
                context["reasons"] = nothing_fits_reasons(form.cleaned_data)
                elsewhere = currencies_elsewhere(
                    _search_query(form.cleaned_data, currency=currency)
                )
                if elsewhere:
                    context["reasons"].append(
                        f"Sites priced in {', '.join(c.upper() for c in elsewhere)} have them, "
                        f"but your organisation is billed in {currency.upper()} and can book "
                        f"only in {currency.upper()}."
                    )
        return render(request, "portal/search.html", context, status=status)

    def _can_reserve(self) -> bool:
        return self.membership.role in RESERVING_ROLES


class QuoteCreateView(PortalView, View):
    """POST an offer's parameters: hold its price at that site (a quote), then confirm it."""

    write_roles = RESERVING_ROLES

    def post(self, request):
        form = _search_form(request.POST)
        # Back to the same search on any refusal (the offer's fields are the search's).
        back = search_url(**{k: request.POST.get(k) for k in form.fields})
        if not form.is_valid() or not form.cleaned_data.get("gpu_model"):
            messages.error(request, "That offer could not be read; search again.")
            return redirect(back)
        d = form.cleaned_data
        try:
            quote = quote_create(
                organization=self.organization,
                gpu_model=d["gpu_model"],
                gpu_count=d["gpu_count"],
                starts_at=d["starts_at"],
                ends_at=d["ends_at"],
                tier=d["tier"],
                term=d["term"],
                site=d["site"] or None,
                min_reliability=_reliability_floor(d),
            )
        except ApplicationError as exc:
            show_error(request, exc)
            return redirect(back)
        # The search's max price goes with the quote to its page, and from there to the booking.
        url = reverse("portal:quote", kwargs={"public_id": quote.public_id})
        if d["max_price_per_gpu_hour"] is not None:
            url += "?" + urlencode({"max_price_per_gpu_hour": f"{d['max_price_per_gpu_hour']:f}"})
        return redirect(url)


class QuoteView(PortalView, View):
    """The held price, the refund rule, and what to run; POST reserves at the quoted price."""

    write_roles = RESERVING_ROLES

    def get(self, request, public_id):
        quote = quote_get_for_org(organization=self.organization, public_id=public_id)
        asked = request.GET.get("max_price_per_gpu_hour", "")
        try:
            max_price = QuoteReserveForm.base_fields["max_price_per_gpu_hour"].clean(asked)
        except forms.ValidationError:
            messages.error(request, "That max price could not be read; search again.")
            return redirect(search_url(**search_params_for_quote(quote)))
        form = self._form(initial={"max_price_per_gpu_hour": max_price})
        return self._page(request, quote, form, max_price=max_price)

    def post(self, request, public_id):
        quote = quote_get_for_org(organization=self.organization, public_id=public_id)
        form = self._form(request.POST)
        if not form.is_valid():
            return self._page(request, quote, form, status=400)
        max_price = form.cleaned_data["max_price_per_gpu_hour"]
        try:
            workload = workload_add_saved_ssh_keys(
                organization=self.organization,
                workload=workload_validate(form.workload()),
                ssh_key_ids=form.saved_key_ids(),
            )
            reservation = reservation_create(
                organization=self.organization,
                user=request.user,
                quote=quote,
                workload=workload,
                # An automatic recharge only once the customer has seen its amount and said yes.
                auto_recharge=request.POST.get("confirm_recharge") == "yes",
                max_price_per_gpu_hour=max_price,
            )
        except PaymentRequired as exc:
            recharge = (
                exc.recharge if exc.recharge and exc.recharge["status"] == "confirm" else None
            )
            # The way out beside the refusal: a recharge to confirm, or top up, add a card,
            # or ask for less.
            return self._page(
                request,
                quote,
                form,
                status=exc.status_code,
                recharge=recharge,
                payment_required=None if recharge else exc.message,
                payment_code=exc.code,
                max_price=max_price,
            )
        except ApplicationError as exc:
            _field_error(form, exc)
            return self._page(request, quote, form, status=exc.status_code, max_price=max_price)
        messages.success(request, f"Reserved: {reservation.public_id}.")
        return redirect("portal:reservation", public_id=reservation.public_id)

    def _form(self, data=None, **kwargs) -> QuoteReserveForm:
        saved = ssh_key_list_for_org(organization=self.organization).order_by("name", "pk")
        return QuoteReserveForm(data, saved_keys=saved, **kwargs)

    def _page(
        self,
        request,
        quote,
        form,
        status=200,
        recharge=None,
        payment_required=None,
        payment_code=None,
        max_price=None,
    ):
        funding = portal_funding(
            self.membership,
            tier=quote.tier,
            gpu_count=quote.gpu_count,
            price_per_gpu_hour=quote.price_per_gpu_hour,
            total_amount=quote.total_amount,
            currency=quote.currency,
            starts_at=quote.starts_at,
            ends_at=quote.ends_at,
        )
        params = search_params_for_quote(quote)
        if max_price is not None:
            params["max_price_per_gpu_hour"] = f"{max_price:f}"
        back = search_url(**params)
        smaller = search_url(**(params | {"gpu_count": quote.gpu_count // 2, "site": None}))
        return render(
            request,
            "portal/quote.html",
            {
                "quote": quote,
                "form": form,
                "expired": timezone.now() >= quote.expires_at,
                "rule": cancellation_rule(quote.tier),
                "energy": booking_energy(quote),
                "used": getattr(quote, "reservation", None),
                "funding": funding,
                "search_url": back,
                "smaller_url": smaller if quote.gpu_count > 1 else None,
                "payment_required": payment_required,
                "payment_code": payment_code,
                "recharge": recharge,
                "plan": plan_label(quote.tier, quote.term),
                "max_price": max_price,
            },
            status=status,
        )


class ReservationListView(PortalView, View):
    """GET: every reservation of the organisation, newest first, filtered, page by page."""

    @replica_reads
    def get(self, request):
        form = ReservationFilterForm(request.GET, sites=site_list_public().order_by("name"))
        if not form.is_valid():
            return render(
                request, "portal/reservations.html", {"form": form, "page": None}, status=400
            )
        # The API's filter set, on the same query string: one definition of what each filter
        # means (the form above offers the common ones and says what is wrong with them; the
        # API's others, such as created_after, work here too).
        filterset = ReservationFilter(
            request.GET, queryset=reservation_list_for_org(organization=self.organization)
        )
        if not filterset.is_valid():
            problems = [f"{name}: {' '.join(e)}" for name, e in filterset.errors.items()]
            return render(
                request,
                "portal/reservations.html",
                {"form": form, "page": None, "filter_errors": problems},
                status=400,
            )
        filters = [  # as asked (a filter may repeat: ?status=a&status=b), blanks left out
            (name, value)
            for name in request.GET
            if name in filterset.filters
            for value in request.GET.getlist(name)
            if value.strip()
        ]
        reservations = filterset.qs
        # get_page clamps: a page that is not a number is the first, one out of range the last.
        page = Paginator(reservations, RESERVATIONS_PAGE_SIZE).get_page(request.GET.get("page"))
        reservations_charged_load(page.object_list)  # one question to billing for the page
        now = timezone.now()
        for reservation in page.object_list:
            reservation.progress = progress(reservation, now)
        return render(
            request,
            "portal/reservations.html",
            {
                "form": form,
                "page": page,
                "filtered": bool(filters),
                # The pagination links' query string, "&" included when there is one.
                "filter_query": f"{urlencode(filters)}&" if filters else "",
            },
        )


class ReservationDetailView(PortalView, View):
    def get(self, request, public_id):
        reservation = reservation_get_for_org(organization=self.organization, public_id=public_id)
        return render(request, "portal/reservation.html", _detail_context(self, reservation))


def _gpu_use(reservation, minutes: int = 30) -> list[dict]:
    """The reservation's GPUs together, per minute, newest first (the API has them per GPU)."""
    if reservation.activated_at is None:
        return []
    until = min(timezone.now(), reservation.released_at or reservation.ends_at)
    series = reservation_telemetry(
        reservation=reservation, since=until - timedelta(minutes=minutes), until=until
    )
    by_minute: dict = {}
    for gpu in series:
        for point in gpu.points:
            row = by_minute.setdefault(point["t"], {"t": point["t"], "gpus": 0, "util": 0.0,
                                                     "memory": 0, "power": 0.0, "hottest": None})  # fmt: skip
            row["gpus"] += 1
            row["util"] += point["utilization_pct"] or 0
            row["memory"] += point["memory_used_mib"] or 0
            row["power"] += point["power_w"] or 0
            temp = point["temperature_c"]
            if temp is not None and (row["hottest"] is None or temp > row["hottest"]):
                row["hottest"] = temp
    rows = sorted(by_minute.values(), key=lambda r: r["t"], reverse=True)
    for row in rows:
        row["util"] = round(row["util"] / row["gpus"], 1)
        row["power"] = round(row["power"])
    return rows


def _next_minute(at):
    """The first whole minute at or after `at`."""
    whole = at.replace(second=0, microsecond=0)
    return whole if whole == at else whole + timedelta(minutes=1)


def _gpu_chart(rows: list[dict]) -> dict | None:
    """The per-minute GPU use as a chart (oldest first): mean utilisation and total power."""
    if not rows:
        return None
    rows = list(reversed(rows))
    return {
        "use": {
            "type": "line",
            "labels": [f"{row['t']:%H:%M}" for row in rows],
            "datasets": [
                {"label": "Utilisation, mean (%)", "data": [row["util"] for row in rows]},
                {"label": "Power, all GPUs (W)", "data": [row["power"] for row in rows]},
            ],
        }
    }


def _last_placement(allocations) -> list:
    """The allocations an ended reservation held at its end: those reaching the latest end."""
    held = [a for a in allocations if a.period is not None and not a.period.isempty]
    last = max((a.period.upper for a in held), default=None)
    return [a for a in held if a.period.upper == last]


def _detail_context(view, reservation, **extra) -> dict:
    allowed = reservation_allowed_actions(reservation)
    gpu_use = _gpu_use(reservation)
    live = [a for a in reservation.allocation_list if a.is_live]
    # Distinct GPUs: a GPU whose time was partly resold has an allocation before and after.
    # Once it has ended, the GPUs it held last (a GPU moved off after a failure is not one).
    gpus_on: dict[str, set[int]] = {}
    for allocation in live or _last_placement(reservation.allocation_list):
        gpus_on.setdefault(allocation.node.hostname, set()).add(allocation.gpu_id)
    per_node = {host: len(gpus) for host, gpus in gpus_on.items()}
    can_act = view.membership.role in RESERVING_ROLES
    # A stopped term (releasing) has given its time up: nothing of it is listed any more.
    resellable = reservation.tier == Tier.RESERVED and reservation.status in (
        set(LIVE_STATUSES) - {ReservationStatus.RELEASING}
    )
    interruption = reservation.preempt_at is not None and reservation.status in PREEMPTIBLE_STATUSES
    workload = workload_public(reservation.workload)
    context = {
        "reservation": reservation,
        # Charged, not booked: what it has cost so far (the final amount once it has ended).
        "charged": reservation_charged(reservation),
        "ended": reservation.status in TERMINAL_STATUSES,
        "elapsed": running_time(reservation_elapsed_seconds(reservation)),
        "remaining": running_time(reservation_remaining_seconds(reservation)),
        "energy": reservation_energy(reservation=reservation),
        "gpu_use": gpu_use,
        "gpu_chart": _gpu_chart(gpu_use),
        # Moving on its own (provisioning, tearing down): the page reloads itself to follow.
        "refresh_seconds": 5
        if reservation.status in (ReservationStatus.PROVISIONING, ReservationStatus.RELEASING)
        else None,
        "allowed": allowed if can_act else [],
        "can_act": can_act,
        "nodes": per_node,
        "workload": workload,
        "has_ssh_keys": bool(workload.get("ssh_public_keys")),
        "connection": reservation.connection
        if reservation.status == ReservationStatus.ACTIVE
        else None,
        "interruption": interruption,
        "progress": progress(reservation),
        "plan": plan_label(reservation.tier, reservation.term),
        "key_names": dict(
            ApiKey.objects.filter(organization=view.organization).values_list("prefix", "name")
        ),
        "extend_form": ExtendForm(
            initial={"ends_at": _next_minute(reservation.ends_at) + timedelta(hours=1)}
        ),
        # A reserved term's resale: its listings, and the form to list more (reserving roles).
        "listings": listings_for_reservation(reservation=reservation)
        if reservation.tier == Tier.RESERVED
        else [],
        "listing_form": ListingForm(
            initial={
                "starts_at": _next_minute(max(timezone.now(), reservation.starts_at))
                + timedelta(hours=1),
                "ends_at": reservation.ends_at,
                "tier": Tier.ON_DEMAND,
            }
        )
        if resellable and can_act
        else None,
    }
    context.update(extra)
    return context


def _cancel_page(view, request, reservation, form, status=200):
    """The confirmation: what stopping or cancelling now refunds, before it is done."""
    try:
        terms = cancellation_terms(reservation)
    except ApplicationError as exc:
        show_error(request, exc)
        return redirect("portal:reservation", public_id=reservation.public_id)
    if not form.is_bound:
        form.initial["refund_fraction"] = terms.refund_fraction  # what this page states
    return render(
        request,
        "portal/reservation_cancel.html",
        {"reservation": reservation, "terms": terms, "form": form},
        status=status,
    )


class ReservationCancelView(PortalView, View):
    """GET: what cancelling (before activation) or stopping early would refund, to confirm.
    POST from that page (confirmed): do it on those terms, or, if the refund rule has since
    moved against the customer, state the new terms again and change nothing."""

    write_roles = RESERVING_ROLES
    allowed_while_suspended = True
    read_roles = RESERVING_ROLES

    def get(self, request, public_id):
        reservation = reservation_get_for_org(organization=self.organization, public_id=public_id)
        return _cancel_page(self, request, reservation, CancelForm(initial={"confirm": True}))

    def post(self, request, public_id):
        reservation = reservation_get_for_org(organization=self.organization, public_id=public_id)
        form = CancelForm(request.POST)
        if not form.is_valid():
            return _cancel_page(self, request, reservation, form, status=400)
        confirmed_page = {"reason": form.cleaned_data["reason"], "confirm": True}
        if not form.cleaned_data["confirm"]:
            # Not confirmed on the page that states the refund: state it, change nothing.
            return _cancel_page(self, request, reservation, CancelForm(initial=confirmed_page))
        try:
            # The share the page stated is checked under the reservation's lock: if the rule
            # gives less now (left open across a notice boundary), nothing is cancelled.
            updated = reservation_cancel(
                reservation=reservation,
                actor_label=self.org_context.actor_label,
                reason=form.cleaned_data["reason"],
                expected_refund_fraction=form.cleaned_data["refund_fraction"],
            )
        except ApplicationError as exc:
            reservation.refresh_from_db(fields=["status", "cancellation"])
            if exc.code == "cancel_not_allowed" and reservation.cancellation:
                # The confirmation sent again (a double click, a reload of its answer): the
                # first send did it; say so rather than refuse it as if nothing had happened.
                done = reservation.cancellation
                verb = "stopped" if done.get("action") == "stop" else "cancelled"
                at = datetime.fromisoformat(done["at"]) if done.get("at") else None
                messages.info(
                    request,
                    f"Already {verb}{f' at {utc(at)}' if at else ''}; nothing more was done.",
                )
                return redirect("portal:reservation", public_id=public_id)
            if exc.code != "refund_changed":
                show_error(request, exc)
                return redirect("portal:reservation", public_id=public_id)
            messages.warning(
                request,
                "The refund has changed since that page was shown: nothing was done. Here "
                "is what it is now.",
            )
            return _cancel_page(
                self, request, reservation, CancelForm(initial=confirmed_page), status=409
            )
        else:
            refund = updated.cancellation["refund_amount"]
            verb = "Stopped" if reservation.status == ReservationStatus.ACTIVE else "Cancelled"
            if updated.tier != Tier.RESERVED:  # charged as used: nothing was paid ahead
                messages.success(request, f"{verb}. Charged only for the time it ran.")
            else:
                messages.success(request, f"{verb}. Refund: {money(refund, updated.currency)}.")
        return redirect("portal:reservation", public_id=public_id)


class ReservationExtendView(PortalView, View):
    """POST a new end: first the cost of the extension to confirm, then (confirmed) extend."""

    write_roles = RESERVING_ROLES

    def _confirmation(self, request, reservation, new_ends_at, *, recharge=None, status=200):
        return render(
            request,
            "portal/reservation_extend.html",
            {
                "reservation": reservation,
                "terms": extension_terms(reservation, new_ends_at),
                "added_seconds": int((new_ends_at - reservation.ends_at).total_seconds()),
                "form": ExtendForm(initial={"ends_at": new_ends_at, "confirm": True}),
                "recharge": recharge,
            },
            status=status,
        )

    def post(self, request, public_id):
        reservation = reservation_get_for_org(organization=self.organization, public_id=public_id)
        form = ExtendForm(request.POST)
        if (
            form.is_valid()
            and form.cleaned_data["confirm"]
            and form.cleaned_data["ends_at"] == reservation.ends_at
        ):
            # The confirmation sent again (a double click, a reload of its answer): the first
            # send extended it; say so rather than refuse an end that is no longer later.
            messages.info(request, f"Already extended: it ends at {utc(reservation.ends_at)}.")
            return redirect("portal:reservation", public_id=public_id)
        if form.is_valid() and form.cleaned_data["ends_at"] <= reservation.ends_at:
            form.add_error(
                "ends_at", f"Choose a time after the current end ({utc(reservation.ends_at)})."
            )
        if not form.is_valid():
            return render(
                request,
                "portal/reservation.html",
                _detail_context(self, reservation, extend_form=form),
                status=400,
            )
        new_ends_at = form.cleaned_data["ends_at"]
        if not form.cleaned_data["confirm"]:
            # First the extra cost, changing nothing; the customer confirms it to extend.
            try:
                return self._confirmation(request, reservation, new_ends_at)
            except ApplicationError as exc:
                show_error(request, exc)
                return redirect("portal:reservation", public_id=public_id)
        try:
            updated = reservation_extend(
                reservation=reservation,
                new_ends_at=new_ends_at,
                actor_label=self.org_context.actor_label,
                # An automatic recharge only once the customer has seen its amount and said yes.
                auto_recharge=request.POST.get("confirm_recharge") == "yes",
            )
        except PaymentRequired as exc:
            if not (exc.recharge and exc.recharge["status"] == "confirm"):
                show_error(request, exc)
                return redirect("portal:reservation", public_id=public_id)
            # The same confirmation, now asking whether to charge the card first.
            return self._confirmation(
                request, reservation, new_ends_at, recharge=exc.recharge, status=exc.status_code
            )
        except ApplicationError as exc:
            show_error(request, exc)
        else:
            messages.success(
                request,
                f"Extended to {utc(updated.ends_at)}; total now "
                f"{money(updated.total_amount, updated.currency)}.",
            )
        return redirect("portal:reservation", public_id=public_id)
