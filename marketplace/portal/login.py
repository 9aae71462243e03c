"""Portal sign-in and password-reset requests, with a limit on attempts.

Each sign-in attempt counts against the account name from the caller's address
(settings.PORTAL_SIGN_IN_RATE, e.g. 10/hour) and against the address alone (five times that),
in the same Redis fixed windows as the API's rate limit. Past either, the form refuses
before checking the password, and says when to try again. Counting every attempt (not only
failures) keeps it one atomic step; a person signs in far less often than the limit.

A password-reset request counts against the address it comes from (PORTAL_SIGN_IN_RATE) and
against the e-mail address it names (PASSWORD_RESETS_PER_EMAIL an hour, whoever asks), so
nobody can make Switchyard mail a person again and again; the refusal is the same whether
or not the address has an account.

Sign-up attempts count against the address too (as its sign-ins do): each one mails the
address it names (the link that finishes it, or a notice to an account), and one client must
not make Switchyard mail a whole list.

An IPv6 client is counted by its /64, the block one subscriber or host is given: counting
each address would let one machine rotate through 2^64 of them.
"""

import hashlib
import math
import time

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm, PasswordResetForm

from config.api.throttling import RateLimiterUnavailable, fixed_window_count, parse_rate
from config.client_ip import client_bucket
from marketplace.mail import mail_task_on_commit

__all__ = [
    "PASSWORD_RESETS_PER_EMAIL",
    "SIGNUP_MAILS_PER_EMAIL",
    "signup_mails_over",
    "PasswordResetDoneView",
    "PasswordResetRequestForm",
    "PasswordResetRequestView",
    "SignInForm",
    "SignInView",
    "StaffSignInForm",
    "signup_attempts_over",
]

_PER_ADDRESS = 5  # times the per-account limit
PASSWORD_RESETS_PER_EMAIL = 3  # an hour, to one e-mail address
SIGNUP_MAILS_PER_EMAIL = 3  # an hour, to one e-mail address
_LIMITER_UNAVAILABLE = "%(what)s is briefly unavailable. Try again in a minute."


def _hashed(text: str) -> str:
    # A user name or e-mail address can hold characters a cache key should not.
    return hashlib.sha256(text.strip().lower().encode()).hexdigest()[:24]


def _minutes_over(windows: list[tuple[str, int, int]]) -> int | None:
    """Count one attempt in each (name, allowed, period in seconds) window: the minutes until
    every window over its limit resets, or None when none is. RateLimiterUnavailable passes
    through; with Redis unreachable for a short while the attempt passes uncounted."""
    now = time.time()
    over = []
    for name, allowed, period in windows:
        window = fixed_window_count(name, period=period, now=now)
        if window is not None and window[0] > allowed:
            over.append(window[1])
    if not over:
        return None
    return max(1, math.ceil((max(over) - now) / 60))


def signup_attempts_over(request) -> str | None:
    """Count a sign-up attempt from the request's address (as many as its sign-ins): the refusal
    to show when it is over the limit, else None. Each sign-up mails someone, so unlimited
    attempts would make Switchyard mail a list of addresses."""
    limit, period = parse_rate(settings.PORTAL_SIGN_IN_RATE)
    name = f"signin:signup:{client_bucket(request)}"
    try:
        minutes = _minutes_over([(name, limit * _PER_ADDRESS, period)])
    except RateLimiterUnavailable:
        return _LIMITER_UNAVAILABLE % {"what": "Signing up"}
    if minutes is None:
        return None
    return f"Too many sign-up attempts from your address. Try again in {minutes} minute(s)."


def signup_mails_over(email: str) -> str | None:
    """Count a sign-up mail to `email` (SIGNUP_MAILS_PER_EMAIL an hour, whoever asks): the
    refusal to show when it is over, else None. The same for an address with an account or
    without, so it tells nothing; without it, requests from many clients could fill one
    person's inbox with sign-up mails."""
    try:
        minutes = _minutes_over(
            [(f"signin:signup-mail:{_hashed(email)}", SIGNUP_MAILS_PER_EMAIL, 3600)]
        )
    except RateLimiterUnavailable:
        return _LIMITER_UNAVAILABLE % {"what": "Signing up"}
    if minutes is None:
        return None
    return (
        "Too many sign-up requests for this e-mail address. Use the link already sent, or try "
        f"again in {minutes} minute(s)."
    )


class SignInForm(AuthenticationForm):
    error_messages = {
        **AuthenticationForm.error_messages,
        "too_many_attempts": "Too many sign-in attempts. Try again in %(minutes)s minute(s), "
        "or reset your password.",
        "limiter_unavailable": _LIMITER_UNAVAILABLE % {"what": "Signing in"},
    }

    def clean(self):
        self._check_attempts()
        return super().clean()

    def _check_attempts(self) -> None:
        limit, period = parse_rate(settings.PORTAL_SIGN_IN_RATE)
        address = client_bucket(self.request)
        account = _hashed(self.cleaned_data.get("username") or "")
        windows = [
            (f"signin:{address}:{account}", limit, period),
            (f"signin:{address}", limit * _PER_ADDRESS, period),
        ]
        _refused_when_over(windows, self.error_messages, code="too_many_attempts")


class StaffSignInForm(SignInForm, AdminAuthenticationForm):
    """The admin's sign-in form (/admin/login/, config/urls.py): the same passwords as the
    portal's, staff's among them, so the same limit in the same windows; the admin's wording
    for a wrong password or an account that is not staff."""

    error_messages = {
        **AdminAuthenticationForm.error_messages,
        "too_many_attempts": SignInForm.error_messages["too_many_attempts"],
        "limiter_unavailable": SignInForm.error_messages["limiter_unavailable"],
    }


def _refused_when_over(windows, error_messages: dict, *, code: str) -> None:
    """A form error `code` (with the minutes to wait) when any of the counted windows is over
    its limit, or `limiter_unavailable` when they cannot be counted."""
    try:
        minutes = _minutes_over(windows)
    except RateLimiterUnavailable:
        raise forms.ValidationError(
            error_messages["limiter_unavailable"], code="limiter_unavailable"
        ) from None
    if minutes is not None:
        raise forms.ValidationError(error_messages[code], code=code, params={"minutes": minutes})


class SignInView(auth_views.LoginView):
    template_name = "portal/login.html"
    authentication_form = SignInForm
    redirect_authenticated_user = True


class PasswordResetRequestForm(PasswordResetForm):
    """Django's form (the same answer for every address), with the request limits above."""

    error_messages = {
        "too_many_requests": "Too many password reset requests. Try again in %(minutes)s "
        "minute(s); a link already sent keeps working until it is used.",
        "limiter_unavailable": _LIMITER_UNAVAILABLE % {"what": "Resetting a password"},
    }

    def __init__(self, *args, request=None, **kwargs):
        self.request = request
        super().__init__(*args, **kwargs)

    def save(self, **_options) -> None:
        """Queue the reset mail of each active account with this address; the worker builds
        and sends it (marketplace.tasks.password_reset_mail_send). The request does the same
        work whether or not the address has an account, and a mail server that is down
        delays the mail (retried) instead of losing it."""
        for user in self.get_users(self.cleaned_data["email"]):
            mail_task_on_commit("marketplace.tasks.password_reset_mail_send", [user.pk])

    def clean(self):
        cleaned = super().clean()
        if "email" in cleaned:
            self._check_requests(cleaned["email"])
        return cleaned

    def _check_requests(self, email: str) -> None:
        limit, period = parse_rate(settings.PORTAL_SIGN_IN_RATE)
        windows = [
            (f"signin:password-reset:{_hashed(email)}", PASSWORD_RESETS_PER_EMAIL, 3600),
            (f"signin:password-reset:{client_bucket(self.request)}", limit, period),
        ]
        _refused_when_over(windows, self.error_messages, code="too_many_requests")


class PasswordResetRequestView(auth_views.PasswordResetView):
    form_class = PasswordResetRequestForm

    def get_form_kwargs(self):
        return {**super().get_form_kwargs(), "request": self.request}


class PasswordResetDoneView(auth_views.PasswordResetDoneView):
    """The answer to a reset request, stating how long the link works (as configured)."""

    template_name = "portal/password_reset_done.html"

    def get_context_data(self, **kwargs):
        return {
            **super().get_context_data(**kwargs),
            "link_works_for": settings.PASSWORD_RESET_TIMEOUT,
        }
