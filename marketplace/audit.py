"""Who is acting, and from where: the request's audit context, read by audit_record.

AuditContextMiddleware opens a context for every request (client address through
config.client_ip, user agent, the signed-in user) and closes it afterwards; the API's base view
names the API key when a key acts. Outside a request (tasks, management commands) there is no
context, and audit_record records nothing: those changes are made by no person or key.
"""

from contextvars import ContextVar
from dataclasses import dataclass

from django.conf import settings
from django.http import HttpRequest

from config.client_ip import client_ip

__all__ = ["AuditContext", "audit_context", "audit_actor_set", "AuditContextMiddleware"]

_USER_AGENT_MAX = 400


@dataclass
class AuditContext:
    actor: str | None
    ip_address: str | None
    user_agent: str


_current: ContextVar[AuditContext | None] = ContextVar("audit_context", default=None)


def audit_context() -> AuditContext | None:
    return _current.get()


def audit_actor_set(actor: str) -> None:
    """Name who acts in this request (the API's base view, once it knows the key)."""
    context = _current.get()
    if context is not None:
        context.actor = actor


def _address(request: HttpRequest) -> str | None:
    address = client_ip(request)
    return None if address == "unknown" else address


def _user_actor(request: HttpRequest) -> str | None:
    if settings.SESSION_COOKIE_NAME not in request.COOKIES:
        return None  # no session, nobody signed in: an API key's call is not made to load one
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    prefix = "staff" if request.path.startswith("/admin/") and user.is_staff else "user"
    return f"{prefix}:{user.get_username()}"


class AuditContextMiddleware:
    """After AuthenticationMiddleware: the session's user is known; an API key is named later."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest):
        token = _current.set(
            AuditContext(
                actor=_user_actor(request),
                ip_address=_address(request),
                user_agent=request.META.get("HTTP_USER_AGENT", "")[:_USER_AGENT_MAX],
            )
        )
        try:
            return self.get_response(request)
        finally:
            _current.reset(token)
