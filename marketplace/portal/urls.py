from django.contrib.auth import views as auth_views
from django.urls import path, reverse_lazy

from marketplace.portal import (
    audit,
    invitations,
    keys,
    live,
    login,
    resale,
    reservations,
    sites,
    ssh_keys,
    team,
    views,
    webhooks,
)

app_name = "portal"

urlpatterns = [
    path("", views.home, name="home"),
    path("login", login.SignInView.as_view(), name="login"),
    path("logout", auth_views.LogoutView.as_view(), name="logout"),
    # Forgotten and changed passwords: Django's own views, with the portal's templates.
    path(
        "password-reset",
        login.PasswordResetRequestView.as_view(
            template_name="portal/password_reset_form.html",
            email_template_name="portal/password_reset_email.txt",
            subject_template_name="portal/password_reset_subject.txt",
            success_url=reverse_lazy("portal:password-reset-done"),
        ),
        name="password-reset",
    ),
    path(
        "password-reset/sent",
        login.PasswordResetDoneView.as_view(),
        name="password-reset-done",
    ),
    path(
        "password-reset/<uidb64>/<token>",
        views.PasswordResetConfirmView.as_view(),
        name="password-reset-confirm",
    ),
    path(
        "account/password",
        views.PasswordChangeView.as_view(),
        name="password-change",
    ),
    path("account/email", views.EmailChangeView.as_view(), name="email-change"),
    path("account/email/<str:token>", views.EmailConfirmView.as_view(), name="email-confirm"),
    path(
        "account/sign-out-everywhere",
        views.SignOutEverywhereView.as_view(),
        name="sign-out-everywhere",
    ),
    path("signup", views.SignupView.as_view(), name="signup"),
    path("signup/confirm/<str:token>", views.SignupConfirmView.as_view(), name="signup-confirm"),
    path("organizations/new", views.OrganizationNewView.as_view(), name="organization-new"),
    path(
        "organizations/switch", views.OrganizationSwitchView.as_view(), name="organization-switch"
    ),
    path("dashboard", views.DashboardView.as_view(), name="dashboard"),
    path("gpus", reservations.SearchView.as_view(), name="search"),
    path("sites", sites.SiteListView.as_view(), name="sites"),
    path("sites/<slug:slug>", sites.SiteDetailView.as_view(), name="site"),
    path("quotes", reservations.QuoteCreateView.as_view(), name="quote-create"),
    path("quotes/<str:public_id>", reservations.QuoteView.as_view(), name="quote"),
    path("reservations", reservations.ReservationListView.as_view(), name="reservations"),
    path("reservations/live", live.LiveView.as_view(), name="reservations-live"),
    path(
        "reservations/<str:public_id>",
        reservations.ReservationDetailView.as_view(),
        name="reservation",
    ),
    path(
        "reservations/<str:public_id>/cancel",
        reservations.ReservationCancelView.as_view(),
        name="reservation-cancel",
    ),
    path(
        "reservations/<str:public_id>/extend",
        reservations.ReservationExtendView.as_view(),
        name="reservation-extend",
    ),
    path(
        "reservations/<str:public_id>/resale",
        resale.ListingCreateView.as_view(),
        name="reservation-resale",
    ),
    path("resale", resale.ResaleView.as_view(), name="resale"),
    path(
        "resale/<str:public_id>/withdraw",
        resale.ListingWithdrawView.as_view(),
        name="resale-withdraw",
    ),
    path("resale/<str:public_id>/buy", resale.ResaleBuyView.as_view(), name="resale-buy"),
    path("api-keys", keys.KeysView.as_view(), name="api-keys"),
    path("api-keys/<str:public_id>/revoke", keys.KeyRevokeView.as_view(), name="api-key-revoke"),
    path("ssh-keys", ssh_keys.SshKeysView.as_view(), name="ssh-keys"),
    path("webhooks", webhooks.WebhooksView.as_view(), name="webhooks"),
    path("audit-log", audit.AuditLogView.as_view(), name="audit-log"),
    path("webhooks/<str:public_id>", webhooks.WebhookView.as_view(), name="webhook"),
    path(
        "webhooks/<str:public_id>/delete",
        webhooks.WebhookDeleteView.as_view(),
        name="webhook-delete",
    ),
    path(
        "ssh-keys/<str:public_id>/delete",
        ssh_keys.SshKeyDeleteView.as_view(),
        name="ssh-key-delete",
    ),
    path("team", team.TeamView.as_view(), name="team"),
    path("team/<str:public_id>/role", team.MemberRoleView.as_view(), name="member-role"),
    path("team/<str:public_id>/remove", team.MemberRemoveView.as_view(), name="member-remove"),
    path("team/invitations", team.InvitationCreateView.as_view(), name="invitation-create"),
    path(
        "team/invitations/<str:public_id>/revoke",
        team.InvitationRevokeView.as_view(),
        name="invitation-revoke",
    ),
    path(
        "invitations/<str:token>",
        invitations.InvitationAcceptView.as_view(),
        name="invitation-accept",
    ),
]
