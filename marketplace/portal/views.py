"""Account pages: sign up, passwords, a new organisation, switching organisation, the overview."""

from urllib.parse import urlsplit

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login, logout
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import PasswordChangeForm
from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.cache import cache
from django.shortcuts import redirect, render
from django.urls import Resolver404, resolve, reverse_lazy
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views import View

from config.errors import ApplicationError
from config.replica import replica_reads
from marketplace.models import SIGNUP_NEXT_MAX_LENGTH, Membership, ReservationStatus
from marketplace.portal.forms import (
    EmailChangeForm,
    OrganizationForm,
    SignupConfirmForm,
    SignupForm,
)
from marketplace.portal.invitations import open_invitation_for
from marketplace.portal.live import progress
from marketplace.portal.login import signup_attempts_over, signup_mails_over
from marketplace.portal.mixins import PortalView, portal_organization_set
from marketplace.portal.nav import portal_overview_panels
from marketplace.selectors.reservations import reservation_list_for_org, reservations_charged_load
from marketplace.services.accounts import (
    email_change_confirm,
    email_change_open,
    email_change_request,
)
from marketplace.services.organizations import (
    organization_create,
    signup_confirm,
    signup_pending_open,
    signup_request,
)
from marketplace.sessions import user_sessions_end

_CURRENT = [
    ReservationStatus.PENDING,
    ReservationStatus.SCHEDULED,
    ReservationStatus.PROVISIONING,
    ReservationStatus.ACTIVE,
    ReservationStatus.RELEASING,
]


def home(request):
    return redirect("portal:dashboard" if request.user.is_authenticated else "portal:login")


def _safe_next(request, wanted: str | None) -> str | None:
    """`wanted` if it is a URL on this site (not another host, nor //host), else None."""
    safe = wanted and url_has_allowed_host_and_scheme(
        wanted, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
    return wanted if safe else None


class SignupView(View):
    """A new account and its own organisation, created through a link mailed to the address
    (SignupConfirmView): the page answers the same whether or not the address has an account.
    Signing up through an invitation link (?next=/invitations/<token>) is mailed the same way
    (the same answer too), and the account joins the inviting organisation instead. Any other
    ?next= on this site is kept with the sign-up and followed once the account is created."""

    template_name = "portal/signup.html"

    def get(self, request):
        if request.user.is_authenticated:
            return redirect("portal:dashboard")
        invitation = self._invitation(request)
        form = self._form(invitation, initial={"email": invitation.email} if invitation else None)
        return self._render(request, form, invitation)

    def post(self, request):
        invitation = self._invitation(request)
        if refusal := signup_attempts_over(request):
            # Refused before the form is checked: it says nothing of the e-mail address.
            kept = {k: request.POST.get(k, "") for k in ("username", "email", "organization")}
            form = self._form(invitation, initial=kept)
            form.cleaned_data = {}  # unbound: add_error expects what a check would leave
            form.add_error(None, refusal)
            return self._render(request, form, invitation, status=429)
        form = self._form(invitation, data=request.POST)
        if not form.is_valid():
            return self._render(request, form, invitation, status=400)
        if refusal := signup_mails_over(form.cleaned_data["email"]):
            form.add_error("email", refusal)
            return self._render(request, form, invitation, status=429)
        return self._request(request, form, invitation)

    def _request(self, request, form, invitation):
        """Mail the address the link that finishes the sign-up (or, if it has an account, a
        notice): the same page either way, with or without an invitation."""
        data = form.cleaned_data
        try:
            signup_request(
                email=data["email"],
                username=data["username"],
                organization_name=data.get("organization", ""),
                password=data["password1"],
                invitation=invitation,
                # An invitation's link (its token) is not kept: the sign-up joins it anyway.
                next_url="" if invitation else self._next(request) or "",
            )
        except ApplicationError as exc:  # what was typed (a name): nothing of the account
            form.add_error(exc.field if exc.field in form.fields else None, exc.message)
            return self._render(request, form, invitation, status=400)
        context = {"email": data["email"], "hours": settings.SIGNUP_CONFIRM_HOURS}
        return render(request, "portal/signup_sent.html", context)

    def _form(self, invitation, **kwargs) -> SignupForm:
        form = SignupForm(**kwargs)
        if invitation:
            del form.fields["organization"]  # they join the inviting organisation
        return form

    def _render(self, request, form, invitation, *, status=200):
        context = {"form": form, "invitation": invitation, "next": self._next(request) or ""}
        return render(request, self.template_name, context, status=status)

    @staticmethod
    def _next(request) -> str | None:
        wanted = request.POST.get("next") or request.GET.get("next")
        if wanted and len(wanted) > SIGNUP_NEXT_MAX_LENGTH:
            return None
        return _safe_next(request, wanted)

    def _token(self, request) -> str | None:
        """The invitation token when `next` is an invitation link."""
        wanted = self._next(request)
        if not wanted:
            return None
        try:
            match = resolve(urlsplit(wanted).path)
        except Resolver404:
            return None
        return match.kwargs["token"] if match.view_name == "portal:invitation-accept" else None

    def _invitation(self, request):
        token = self._token(request)
        return open_invitation_for(token) if token else None


class SignupConfirmView(View):
    """/signup/confirm/<token>, the link a sign-up mailed: GET shows what will be created and
    a button (mail scanners open links: a GET creates nothing); POST creates the account and
    its organisation (or joins the invitation's) and signs in, then goes where the sign-up
    page was asked to (?next=, checked again here) or to the dashboard. A user name taken
    meanwhile is asked for again here."""

    template_name = "portal/signup_confirm.html"

    def get(self, request, token: str):
        try:
            pending = signup_pending_open(token=token)
        except ApplicationError as exc:
            return self._refused(request, exc)
        form = SignupConfirmForm(initial={"username": pending.username})
        return self._render(request, form, pending)

    def post(self, request, token: str):
        try:
            pending = signup_pending_open(token=token)
        except ApplicationError as exc:
            return self._refused(request, exc)
        form = SignupConfirmForm(request.POST)
        if not form.is_valid():
            return self._render(request, form, pending, status=400)
        try:
            user, organization = signup_confirm(token=token, username=form.cleaned_data["username"])
        except ApplicationError as exc:
            if exc.field != "username":
                return self._refused(request, exc)  # used or expired meanwhile
            form.add_error("username", exc.message)
            return self._render(request, form, pending, status=400)
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        if organization is None:  # its invitation closed, or its organisation is suspended
            messages.warning(
                request,
                "Welcome to Switchyard. The invitation cannot be accepted now (revoked, used "
                "or expired, or its organisation is suspended): open its link again later, "
                "ask for a new one, or create an organisation.",
            )
            return redirect("portal:organization-new")
        portal_organization_set(request, organization.public_id)
        if pending.invitation_id:
            messages.success(request, f"Welcome to Switchyard. You joined {organization.name}.")
        else:
            messages.success(request, f"Welcome to Switchyard. {organization.name} is ready.")
        return redirect(_safe_next(request, pending.next_url) or "portal:dashboard")

    def _render(self, request, form, pending, *, status=200):
        context = {"form": form, "pending": pending}
        return render(request, self.template_name, context, status=status)

    def _refused(self, request, exc: ApplicationError):
        return render(request, self.template_name, {"refusal": exc}, status=exc.status_code)


def _once_key(request, key: str) -> str:
    return f"portal:once:{request.user.pk}:{key}"


def _first_send(once: str) -> bool:
    try:
        return cache.add(once, 1, timeout=24 * 3600)
    except Exception:  # noqa: BLE001 — Redis away: a second organisation is the lesser harm
        return True


class OrganizationNewView(LoginRequiredMixin, View):
    """A signed-in user creates an organisation (also where members of none are sent)."""

    template_name = "portal/organization_new.html"

    def get(self, request):
        return render(request, self.template_name, {"form": OrganizationForm()})

    def post(self, request):
        form = OrganizationForm(request.POST)
        status = 400
        if form.is_valid():
            # One-time key (OnceField), kept in the cache: an organisation is not there yet
            # to hold it as config.once does. add is atomic: of two sends at once one is first.
            once = _once_key(request, form.cleaned_data["once"])
            if not _first_send(once):
                messages.warning(request, "This form was already sent: the organisation exists.")
                return redirect("portal:dashboard")
            try:
                organization = organization_create(
                    name=form.cleaned_data["name"], owner=request.user
                )
            except ApplicationError as exc:
                cache.delete(once)  # nothing was created: the form may be sent again
                form.add_error("name", exc.message)
                status = exc.status_code  # 403 for a member of a suspended organisation
            else:
                portal_organization_set(request, organization.public_id)
                messages.success(request, f"{organization.name} created; you are its owner.")
                return redirect("portal:dashboard")
        return render(request, self.template_name, {"form": form}, status=status)


class OrganizationSwitchView(LoginRequiredMixin, View):
    def post(self, request):
        wanted = request.POST.get("organization", "")
        membership = (
            Membership.objects.select_related("organization")
            .filter(user=request.user, organization__public_id=wanted)
            .first()
        )
        if membership is None:
            messages.error(request, "You are not a member of that organisation.")
        else:
            portal_organization_set(request, membership.organization.public_id)
            messages.success(request, f"Now acting for {membership.organization.name}.")
        return redirect("portal:dashboard")


class DashboardView(PortalView, View):
    @replica_reads
    def get(self, request):
        current = list(
            reservation_list_for_org(organization=self.organization)
            .filter(status__in=_CURRENT)
            .order_by("starts_at")[:20]
        )
        reservations_charged_load(current)  # one question to billing for them all
        now = timezone.now()
        for reservation in current:
            reservation.progress = progress(reservation, now)
        memberships = (
            Membership.objects.select_related("organization")
            .filter(user=request.user)
            .order_by("organization__name")
        )
        return render(
            request,
            "portal/dashboard.html",
            {
                "current": current,
                "running": sum(1 for r in current if r.status == ReservationStatus.ACTIVE),
                "memberships": memberships,
                "now": timezone.now(),
                "panels": portal_overview_panels(self.membership),
            },
        )


class PasswordChangeView(auth_views.PasswordChangeView):
    """Your account: the password changed here signs out every other session of the account
    (whoever had the old password is out too). The page also changes the e-mail address
    (EmailChangeView) and signs out everywhere."""

    template_name = "portal/password_change.html"
    success_url = reverse_lazy("portal:dashboard")

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context.setdefault("email_form", EmailChangeForm(user=self.request.user, prefix="email"))
        return context

    def form_valid(self, form):
        response = super().form_valid(form)  # this session carries on, with a new key
        ended = user_sessions_end(user_id=form.user.pk, keep=self.request.session.session_key)
        messages.success(
            self.request,
            f"Your password has been changed. {_sessions_ended(ended, 'other ')}",
        )
        return response


class PasswordResetConfirmView(auth_views.PasswordResetConfirmView):
    """A new password from an e-mailed link: every session of the account is signed out."""

    template_name = "portal/password_reset_confirm.html"
    success_url = reverse_lazy("portal:login")

    def form_valid(self, form):
        response = super().form_valid(form)
        ended = user_sessions_end(user_id=form.user.pk)
        messages.success(
            self.request, f"Your new password is set. {_sessions_ended(ended)} Sign in with it."
        )
        return response


class EmailChangeView(LoginRequiredMixin, View):
    """POST from the account page: mail the new address a link that confirms it (the address
    stays until then) and tell the current one. At most SIGNUP_MAILS_PER_EMAIL such mails an
    hour go to one address, with the sign-up mails."""

    def post(self, request):
        form = EmailChangeForm(request.POST, user=request.user, prefix="email")
        status = 400
        if form.is_valid() and (refusal := signup_mails_over(form.cleaned_data["email"])):
            form.add_error("email", refusal)
            status = 429
        if form.is_valid():
            try:
                email = email_change_request(user=request.user, email=form.cleaned_data["email"])
            except ApplicationError as exc:
                form.add_error("email", exc.message)
            else:
                messages.success(
                    request,
                    f"We sent a link to {email} to confirm it; it works for "
                    f"{settings.SIGNUP_CONFIRM_HOURS} hours. Your e-mail address stays "
                    f"{request.user.email or '(none)'} until then.",
                )
                return redirect("portal:password-change")
        # The account page again, with this form's errors.
        context = {"form": PasswordChangeForm(user=request.user), "email_form": form}
        return render(request, PasswordChangeView.template_name, context, status=status)


class EmailConfirmView(View):
    """/account/email/<token>, the link mailed to a new address: GET shows what changes and a
    button (mail scanners open links), POST makes the change."""

    template_name = "portal/email_confirm.html"

    def get(self, request, token: str):
        try:
            user, email = email_change_open(token=token)
        except ApplicationError as exc:
            return self._refused(request, exc)
        return render(request, self.template_name, {"account": user, "email": email})

    def post(self, request, token: str):
        try:
            user = email_change_confirm(token=token)
        except ApplicationError as exc:
            return self._refused(request, exc)
        messages.success(request, f"{user.email} is now the e-mail address of your account.")
        return redirect("portal:dashboard" if request.user == user else "portal:login")

    def _refused(self, request, exc: ApplicationError):
        return render(request, self.template_name, {"refusal": exc}, status=exc.status_code)


class SignOutEverywhereView(LoginRequiredMixin, View):
    """POST: end every session of the account, this one included."""

    def post(self, request):
        ended = user_sessions_end(user_id=request.user.pk)
        logout(request)
        messages.success(request, f"You were signed out everywhere. {_sessions_ended(ended)}")
        return redirect("portal:login")


def _sessions_ended(count: int, which: str = "") -> str:
    if count == 0:
        return f"No {which}session was signed in to your account."
    if count == 1:
        return f"The {which}session signed in to your account was signed out."
    return f"All {count} {which}sessions signed in to your account were signed out."
