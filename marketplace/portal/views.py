"""Account pages: sign up, passwords, a new organisation, switching organisation, the overview."""

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.mixins import LoginRequiredMixin
from django.contrib.messages.views import SuccessMessageMixin
from django.db import transaction
from django.shortcuts import redirect, render
from django.urls import reverse_lazy
from django.utils import timezone
from django.views import View

from config.errors import ApplicationError
from marketplace.models import Membership, ReservationStatus
from marketplace.portal.forms import OrganizationForm, SignupForm
from marketplace.portal.mixins import SESSION_ORG_KEY, PortalView
from marketplace.portal.nav import portal_overview_panels
from marketplace.selectors.reservations import reservation_list_for_org
from marketplace.services.organizations import organization_create

S = ReservationStatus
_CURRENT = [S.PENDING, S.SCHEDULED, S.PROVISIONING, S.ACTIVE, S.RELEASING]


def home(request):
    return redirect("portal:dashboard" if request.user.is_authenticated else "portal:login")


class SignupView(View):
    template_name = "portal/signup.html"

    def get(self, request):
        if request.user.is_authenticated:
            return redirect("portal:dashboard")
        return render(request, self.template_name, {"form": SignupForm()})

    def post(self, request):
        form = SignupForm(request.POST)
        if not form.is_valid():
            return render(request, self.template_name, {"form": form}, status=400)
        try:
            with transaction.atomic():
                user = form.save()
                organization = organization_create(
                    name=form.cleaned_data["organization"], owner=user
                )
        except ApplicationError as exc:
            form.add_error("organization", exc.message)
            return render(request, self.template_name, {"form": form}, status=400)
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        request.session[SESSION_ORG_KEY] = organization.public_id
        messages.success(request, f"Welcome to Switchyard. {organization.name} is ready.")
        return redirect("portal:dashboard")


class OrganizationNewView(LoginRequiredMixin, View):
    """A signed-in user creates an organisation (also where members of none are sent)."""

    template_name = "portal/organization_new.html"

    def get(self, request):
        return render(request, self.template_name, {"form": OrganizationForm()})

    def post(self, request):
        form = OrganizationForm(request.POST)
        if form.is_valid():
            try:
                organization = organization_create(
                    name=form.cleaned_data["name"], owner=request.user
                )
            except ApplicationError as exc:
                form.add_error("name", exc.message)
            else:
                request.session[SESSION_ORG_KEY] = organization.public_id
                messages.success(request, f"{organization.name} created; you are its owner.")
                return redirect("portal:dashboard")
        return render(request, self.template_name, {"form": form}, status=400)


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
            request.session[SESSION_ORG_KEY] = membership.organization.public_id
            messages.success(request, f"Now acting for {membership.organization.name}.")
        return redirect("portal:dashboard")


class DashboardView(PortalView, View):
    def get(self, request):
        current = list(
            reservation_list_for_org(organization=self.organization, status=_CURRENT).order_by(
                "starts_at"
            )[:20]
        )
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
                "running": sum(1 for r in current if r.status == S.ACTIVE),
                "memberships": memberships,
                "now": timezone.now(),
                "panels": portal_overview_panels(self.membership),
            },
        )


class PasswordChangeView(SuccessMessageMixin, auth_views.PasswordChangeView):
    template_name = "portal/password_change.html"
    success_url = reverse_lazy("portal:dashboard")
    success_message = "Your password has been changed."


class PasswordResetConfirmView(SuccessMessageMixin, auth_views.PasswordResetConfirmView):
    template_name = "portal/password_reset_confirm.html"
    success_url = reverse_lazy("portal:login")
    success_message = "Your new password is set: sign in with it."
