"""Portal sign-in, with a limit on attempts.

Each attempt counts against the account name from the caller's address
(settings.PORTAL_SIGN_IN_RATE, e.g. 10/hour) and against the address alone (five times that),
in the same Redis fixed windows as the API's rate limit. Past either, the form refuses
before checking the password, and says when to try again. Counting every attempt (not only
failures) keeps it one atomic step; a person signs in far less often than the limit.
"""

import hashlib
import math
import time

from django import forms
from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm

from config.api.throttling import RateLimiterUnavailable, fixed_window_count, parse_rate
from config.client_ip import client_ip

__all__ = ["SignInForm", "SignInView"]

_PER_ADDRESS = 5  # times the per-account limit


class SignInForm(AuthenticationForm):
    error_messages = {
        **AuthenticationForm.error_messages,
        "too_many_attempts": "Too many sign-in attempts. Try again in %(minutes)s minute(s), "
        "or reset your password.",
        "limiter_unavailable": "Signing in is briefly unavailable. Try again in a minute.",
    }

    def clean(self):
        self._check_attempts()
        return super().clean()

    def _check_attempts(self) -> None:
        limit, period = parse_rate(settings.PORTAL_SIGN_IN_RATE)
        now = time.time()
        address = client_ip(self.request) if self.request else "unknown"
        name = (self.cleaned_data.get("username") or "").strip().lower()
        # Hashed: a user name can hold characters a cache key should not.
        account = hashlib.sha256(name.encode()).hexdigest()[:24]
        try:
            windows = [
                (fixed_window_count(f"signin:{address}:{account}", period=period, now=now), limit),
                (
                    fixed_window_count(f"signin:{address}", period=period, now=now),
                    limit * _PER_ADDRESS,
                ),
            ]
        except RateLimiterUnavailable:
            raise forms.ValidationError(
                self.error_messages["limiter_unavailable"], code="limiter_unavailable"
            ) from None
        # None: Redis is unreachable and the attempt passes uncounted (for a bounded time).
        counted = [(*window, allowed) for window, allowed in windows if window is not None]
        over = [reset_at for count, reset_at, allowed in counted if count > allowed]
        if over:
            raise forms.ValidationError(
                self.error_messages["too_many_attempts"],
                code="too_many_attempts",
                params={"minutes": max(1, math.ceil((max(over) - now) / 60))},
            )


class SignInView(auth_views.LoginView):
    template_name = "portal/login.html"
    authentication_form = SignInForm
    redirect_authenticated_user = True
