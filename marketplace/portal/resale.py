"""Portal: resell part of a reserved term, withdraw a listing, see listings and sales, and buy
resold time found in the search. The same services as the API (services.resale, and
reservation_create with a listing)."""

from django.contrib import messages
from django.shortcuts import redirect, render
from django.utils.dateparse import parse_datetime
from django.views import View

from config.errors import ApplicationError, PaymentRequired
from config.once import once_or_refused
from marketplace.funding import funding_gate
from marketplace.models import ListingStatus
from marketplace.portal.forms import ListingForm, ResaleBuyForm
from marketplace.portal.mixins import PortalView, show_error
from marketplace.portal.reservations import _detail_context
from marketplace.provisioning.workload import workload_validate
from marketplace.selectors.resale import (
    listing_for_sale,
    listing_get_for_org,
    listing_get_for_sale,
    listings_for_org,
)
from marketplace.selectors.reservations import reservation_get_for_org
from marketplace.selectors.ssh_keys import ssh_key_list_for_org
from marketplace.services.organizations import RESERVING_ROLES
from marketplace.services.pricing import period_total
from marketplace.services.resale import listing_create, listing_withdraw
from marketplace.services.reservations import reservation_create
from marketplace.services.ssh_keys import workload_add_saved_ssh_keys
from marketplace.templatetags.portal_format import money


class ListingCreateView(PortalView, View):
    """POST from a reserved term's page: list part of it; refusals back on that page."""

    write_roles = RESERVING_ROLES

    def post(self, request, public_id):
        reservation = reservation_get_for_org(organization=self.organization, public_id=public_id)
        form = ListingForm(request.POST)
        if form.is_valid():
            d = form.cleaned_data
            try:
                listing = once_or_refused(
                    request,
                    self.organization,
                    d["once"],
                    lambda: listing_create(
                        organization=self.organization,
                        reservation=reservation,
                        gpu_count=d["gpu_count"],
                        starts_at=d["starts_at"],
                        ends_at=d["ends_at"],
                        price_per_gpu_hour=d["price_per_gpu_hour"],
                        tier=d["tier"],
                        user=request.user,
                    ),
                )
            except ApplicationError as exc:
                form.add_error(exc.field if exc.field in form.fields else None, exc.message)
            else:
                if listing is None:
                    messages.warning(
                        request, "This form was already sent, so nothing more was listed."
                    )
                    return redirect("portal:reservation", public_id=public_id)
                messages.success(
                    request,
                    f"Listed {listing.gpu_count} GPU(s) for resale ({listing.public_id}).",
                )
                return redirect("portal:reservation", public_id=public_id)
        return render(
            request,
            "portal/reservation.html",
            _detail_context(self, reservation, listing_form=form),
            status=400,
        )


class ListingWithdrawView(PortalView, View):
    write_roles = RESERVING_ROLES

    def post(self, request, public_id):
        listing = listing_get_for_org(organization=self.organization, public_id=public_id)
        try:
            listing_withdraw(organization=self.organization, listing=listing)
        except ApplicationError as exc:
            show_error(request, exc)
        else:
            messages.success(request, f"Withdrawn: {listing.public_id}.")
        return redirect("portal:reservation", public_id=listing.reservation.public_id)


class ResaleView(PortalView, View):
    """GET: the organisation's listings and sales, with what each sale has brought so far."""

    def get(self, request):
        listings = list(listings_for_org(organization=self.organization)[:200])
        sold = [x.pk for x in listings if x.status == ListingStatus.SOLD]
        settled = funding_gate().resale_settled(listing_ids=sold) if sold else {}
        for listing in listings:
            proceeds, fees = settled.get(listing.pk, (None, None))
            listing.proceeds, listing.fees = proceeds, fees
        return render(request, "portal/resale.html", {"listings": listings})


class ResaleBuyView(PortalView, View):
    """GET: resold time from a search offer, with what to run (or that it is not for sale at
    the moment: sold, withdrawn, begun, its seller suspended); POST books it."""

    write_roles = RESERVING_ROLES

    def _asked(self, data):
        """The listing, and the GPUs and window asked of it (from a search's offer link), or
        None for the second when they cannot be read or are not part of the listing: a
        tampered link is sent back to search, not priced (or crashed on)."""
        listing = listing_get_for_sale(public_id=self.kwargs["public_id"])
        try:
            starts_at = parse_datetime(data.get("starts_at") or "")
            ends_at = parse_datetime(data.get("ends_at") or "")
        except ValueError:  # a month 13, an offset of +99:00
            return listing, None
        raw = data.get("gpu_count") or ""
        gpu_count = int(raw) if raw.isascii() and raw.isdigit() else 0
        ok = (
            starts_at is not None
            and ends_at is not None
            and starts_at.tzinfo is not None
            and ends_at.tzinfo is not None
            and listing.starts_at <= starts_at < ends_at <= listing.ends_at
            and 1 <= gpu_count <= listing.gpu_count
        )
        return listing, (gpu_count, starts_at, ends_at) if ok else None

    def _form(self, data=None) -> ResaleBuyForm:
        saved = ssh_key_list_for_org(organization=self.organization).order_by("name", "pk")
        return ResaleBuyForm(data, saved_keys=saved)

    def _page(self, request, listing, asked, form, status=200):
        gpu_count, starts_at, ends_at = asked
        seconds = int((ends_at - starts_at).total_seconds())
        total = period_total(
            price_per_gpu_hour=listing.price_per_gpu_hour,
            gpu_count=gpu_count,
            seconds=seconds,
            currency=listing.currency,
        )
        return render(
            request,
            "portal/resale_buy.html",
            {
                "listing": listing,
                "for_sale": listing_for_sale(listing),
                "gpu_count": gpu_count,
                "starts_at": starts_at,
                "ends_at": ends_at,
                "total": total,
                "form": form,
            },
            status=status,
        )

    def get(self, request, public_id):
        listing, asked = self._asked(request.GET)
        if asked is None:
            messages.error(request, "That offer could not be read; search again.")
            return redirect("portal:search")
        return self._page(request, listing, asked, self._form())

    def post(self, request, public_id):
        listing, asked = self._asked(request.POST)
        if asked is None:
            messages.error(request, "That offer could not be read; search again.")
            return redirect("portal:search")
        form = self._form(request.POST)
        if not form.is_valid():
            return self._page(request, listing, asked, form, status=400)
        gpu_count, starts_at, ends_at = asked
        try:
            workload = workload_add_saved_ssh_keys(
                organization=self.organization,
                workload=workload_validate(form.workload()),
                ssh_key_ids=form.saved_key_ids(),
            )

            def book():
                return reservation_create(
                    organization=self.organization,
                    user=request.user,
                    listing=listing,
                    gpu_count=gpu_count,
                    starts_at=starts_at,
                    ends_at=ends_at,
                    workload=workload,
                    auto_recharge=False,
                )

            once = form.cleaned_data["once"]
            reservation = (
                once_or_refused(request, self.organization, once, book) if once else book()
            )
        except PaymentRequired as exc:
            form.add_error(None, exc.message)
            return self._page(request, listing, asked, form, status=exc.status_code)
        except ApplicationError as exc:
            form.add_error(None, exc.message)
            return self._page(request, listing, asked, form, status=exc.status_code)
        if reservation is None:
            messages.warning(
                request,
                "This form was already sent, so the resold time was booked once: it is in "
                "your reservations.",
            )
            return redirect("portal:reservations")
        messages.success(
            request,
            f"Reserved resold time: {reservation.public_id} "
            f"({money(reservation.total_amount, reservation.currency)}).",
        )
        return redirect("portal:reservation", public_id=reservation.public_id)
