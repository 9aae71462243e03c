"""Signed-in sessions: whose each one is, how long it lasts, and never kept by a cache.

SESSION_ENGINE: Django's database sessions, each row with its user (marketplace.UserSession),
so all of an account's sessions can be ended at once (user_sessions_end): "Sign out
everywhere", a password change (the other sessions) or reset (all of them).

SessionLimitsMiddleware, after Django's authentication middleware, for the portal, the admin
and the API's session callers alike:
- a session ends after SESSION_IDLE_TIMEOUT without a request (the live figures a page polls
  for do not count: an open tab is not activity) and SESSION_LIFETIME after signing in,
  whatever its use; the next page says which, on the sign-in page;
- every page answered to a signed-in session (outside /api/, whose responses carrying a
  secret are no-store on their own, config.api.views) is Cache-Control: no-store, so the
  back button on a shared computer shows nothing of the account after signing out.
"""

import time

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import SESSION_KEY, logout
from django.contrib.sessions.backends.db import SessionStore as DatabaseSessionStore
from django.utils.cache import add_never_cache_headers

from marketplace.models import UserSession
from marketplace.templatetags.portal_format import duration

__all__ = [
    "SessionLimitsMiddleware",
    "SessionStore",
    "session_signed_in",
    "user_sessions_end",
]

SIGNED_IN_AT = "signed_in_at"
SEEN_AT = "seen_at"
# The last request is noted at most this often (a session write), well inside the idle timeout.
_SEEN_STEP_SECONDS = 60


class SessionStore(DatabaseSessionStore):
    @classmethod
    def get_model_class(cls):
        return UserSession

    def create_model_instance(self, data):
        session = super().create_model_instance(data)
        user_id = str(data.get(SESSION_KEY) or "")
        session.user_id = int(user_id) if user_id.isdigit() else None
        return session


def user_sessions_end(*, user_id: int, keep: str | None = None) -> int:
    """End every session of the user but `keep` (a session key): how many were ended."""
    sessions = UserSession.objects.filter(user_id=user_id)
    if keep:
        sessions = sessions.exclude(session_key=keep)
    return sessions.delete()[0]


def session_signed_in(sender, request, user, **kwargs) -> None:
    """user_logged_in receiver (marketplace.apps): the session's lifetime and idle clocks
    start now, also when the same user signs in again on a session kept from before."""
    if request is not None and hasattr(request, "session"):
        now = time.time()
        request.session[SIGNED_IN_AT] = now
        request.session[SEEN_AT] = now


def _ended(session) -> str | None:
    """Why the signed-in session is over (a message for the sign-in page), else None."""
    now = time.time()
    signed_in_at, seen_at = session.get(SIGNED_IN_AT), session.get(SEEN_AT)
    if signed_in_at is None or seen_at is None:
        # Signed in before these limits existed: their clocks start now.
        session[SIGNED_IN_AT] = session[SEEN_AT] = now
        return None
    if now - signed_in_at >= settings.SESSION_LIFETIME.total_seconds():
        return (
            f"You were signed out: a session lasts at most {duration(settings.SESSION_LIFETIME)}. "
            "Sign in again."
        )
    if now - seen_at >= settings.SESSION_IDLE_TIMEOUT.total_seconds():
        return (
            f"You were signed out after {duration(settings.SESSION_IDLE_TIMEOUT)} without "
            "activity. Sign in again."
        )
    return None


class SessionLimitsMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        page = not request.path.startswith("/api/")
        signed_in = request.user.is_authenticated
        if signed_in and (reason := _ended(request.session)):
            logout(request)
            if page and request.method != "POST":  # a form sent says so itself (portal mixins)
                messages.info(request, reason)
        response = self.get_response(request)
        already = "no-store" in response.get("Cache-Control", "")
        if page and (signed_in or request.user.is_authenticated) and not already:
            add_never_cache_headers(response)
        return response

    def process_view(self, request, view_func, view_args, view_kwargs):
        """Note the request as activity, unless its view is a poll (session_passive)."""
        view = getattr(view_func, "view_class", view_func)
        if getattr(view, "session_passive", False) or not request.user.is_authenticated:
            return None
        now = time.time()
        if now - request.session.get(SEEN_AT, 0) >= _SEEN_STEP_SECONDS:
            request.session[SEEN_AT] = now
        return None
