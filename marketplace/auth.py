"""API key authentication: `Authorization: Bearer sy_live_…`, and nowhere else.

A key found in the query string is refused (400 api_key_in_url) rather than ignored, so an
integrator learns at once that the key has been leaking into URLs, logs and proxies.

Keys are cached per process (by the hash of their secret, for API_KEY_CACHE_SECONDS), so a
request does not read its key from PostgreSQL each time, and a revocation still takes effect
at once everywhere: every change of a key (a save or delete: revoking, scopes, the admin)
sets the keys' *generation* in Redis to a new random value after its commit, and every
request of a key reads the generation in the same Redis round trip as its rate limit
(config/api/throttling.py). A cached key is trusted only when the generation is the one it
was cached under; otherwise the cache is emptied and the key is read again (a revoked key is
refused with 401). With Redis unreachable nothing is trusted from the cache: the key is read
from PostgreSQL, as without a cache.

A refused key counts against its client's failed authentications (AUTH_FAILURE_RATE); a client
over them is answered 429 before its key is looked up, unless the key is one this process
accepted lately (config.api.throttling.AuthFailureLimit, handed to this module when that one is
imported, since it imports this one).
"""

import logging
import threading
import time

from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from marketplace.models import ApiKey
from marketplace.selectors.organizations import api_key_by_secret_hash
from marketplace.services.api_keys import (
    API_KEYS_GENERATION,
    SECRET_PREFIX,
    api_key_hash,
    api_key_record_use,
    api_keys_changed,
)

__all__ = [
    "API_KEYS_GENERATION",
    "ApiKeyAuthentication",
    "ApiKeyInUrl",
    "KEY_QUERY_PARAMS",
    "api_key_cache_clear",
    "api_key_user_confirm",
    "api_keys_changed",
    "auth_failure_limit_register",
]

logger = logging.getLogger(__name__)

KEY_QUERY_PARAMS = frozenset(
    {"api_key", "apikey", "key", "token", "access_token", "authorization", "bearer"}
)


class ApiKeyInUrl(exceptions.APIException):
    status_code = 400
    default_code = "api_key_in_url"
    default_detail = (
        "API keys are accepted only in the Authorization header (Authorization: Bearer sy_…), "
        "never in the URL. Remove it from the URL, and rotate the key if the URL was logged."
    )


class _NoFailureLimit:
    def check(self, request, credential) -> None:
        pass

    def failed(self, request) -> None:
        pass

    def vouch(self, credential) -> None:
        pass


_failure_limit = _NoFailureLimit()


def auth_failure_limit_register(limit) -> None:
    """The limit on failed authentications per client (an object with `check(request,
    credential)`, which raises while the client is over it and the credential is not one it
    vouches for, `failed(request)`, which counts one, and `vouch(credential)`, which notes one
    accepted)."""
    global _failure_limit
    _failure_limit = limit


class ApiKeyAuthentication(BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple | None:
        _refuse_key_in_url(request)
        header = get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        credential = header[1].decode("latin-1") if len(header) == 2 else None
        _failure_limit.check(request, credential)
        try:
            accepted = self._authenticate(request, header)
        except exceptions.AuthenticationFailed:
            _failure_limit.failed(request)
            raise
        _failure_limit.vouch(credential)
        return accepted

    def _authenticate(self, request: Request, header: list[bytes]) -> tuple:
        if len(header) != 2:
            raise exceptions.AuthenticationFailed(
                "Malformed Authorization header; expected 'Bearer <api key>'.",
                code="invalid_authorization_header",
            )
        try:
            secret = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed(
                "Invalid API key.", code="invalid_api_key"
            ) from None
        if not secret.startswith(SECRET_PREFIX):
            raise exceptions.AuthenticationFailed("Invalid API key.", code="invalid_api_key")
        secret_hash = api_key_hash(secret)
        cached = _keys.get(secret_hash)
        if cached is not None:
            key, generation = cached
            user = ApiKeyUser(key, secret_hash=secret_hash, cached_under=generation)
        else:
            loaded_under = _keys.generation  # what this process knew before the read
            key = _key_checked(secret_hash)
            user = ApiKeyUser(key, secret_hash=secret_hash, loaded_under=loaded_under)
        api_key_record_use(api_key=key)
        return user, key

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (not 403) to unauthenticated requests.
        return 'Bearer realm="switchyard"'


def _refuse_key_in_url(request: Request) -> None:
    """A parameter named like a credential, or a key anywhere in the path or the query (also
    inside a value such as `?Authorization=Bearer sy_live_…`), is refused."""
    if SECRET_PREFIX in request.path:
        raise ApiKeyInUrl()
    for name, values in request.query_params.lists():
        if (
            name.lower() in KEY_QUERY_PARAMS
            or SECRET_PREFIX in name
            or any(SECRET_PREFIX in v for v in values)
        ):
            raise ApiKeyInUrl()


def _key_checked(secret_hash: str) -> ApiKey:
    key = api_key_by_secret_hash(secret_hash)
    if key is None:
        raise exceptions.AuthenticationFailed("Invalid API key.", code="invalid_api_key")
    if key.revoked_at is not None:
        raise exceptions.AuthenticationFailed(
            f"This API key ({key.prefix}…) was revoked.", code="api_key_revoked"
        )
    return key


class ApiKeyUser:
    """The request.user of a key-authenticated call: the organisation acting through its key."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(
        self,
        api_key: ApiKey,
        *,
        secret_hash: str = "",
        cached_under: bytes | None = None,
        loaded_under: bytes | None = None,
    ):
        self.api_key = api_key
        self.pk = None
        self.id = None
        self.username = f"api_key:{api_key.prefix}"
        self.secret_hash = secret_hash
        # The keys' generation the cached key was stored under (None: read from the database
        # in this request, when the process knew the generation to be loaded_under).
        self.cached_under = cached_under
        self.loaded_under = loaded_under

    def __str__(self) -> str:
        return self.username


# --- the per-process key cache ---------------------------------------------------------------


class _KeyCache:
    def __init__(self):
        self.entries: dict[str, tuple[float, bytes, ApiKey]] = {}
        self.generation: bytes | None = None  # as last read from Redis; None: unknown
        self.lock = threading.Lock()

    def get(self, secret_hash: str) -> tuple[ApiKey, bytes] | None:
        entry = self.entries.get(secret_hash)
        if entry is None or entry[0] <= time.monotonic() or entry[1] != self.generation:
            return None
        return entry[2], entry[1]

    def seen(self, generation: bytes | None) -> None:
        with self.lock:
            if generation != self.generation:
                self.entries.clear()
                self.generation = generation

    def put(self, secret_hash: str, key: ApiKey, generation: bytes) -> None:
        with self.lock:
            if generation == self.generation:
                expires = time.monotonic() + settings.API_KEY_CACHE_SECONDS
                self.entries[secret_hash] = (expires, generation, key)


_keys = _KeyCache()


def api_key_cache_clear() -> None:
    _keys.seen(None)


def api_key_user_confirm(user: ApiKeyUser, *, generation: bytes | None) -> None:
    """Called with the keys' generation read in the request's rate-limit round trip (None:
    Redis unreachable). A key from the cache stands only if no key changed since it was
    cached; otherwise it is read again (and refused if revoked). A key read from the database
    is cached if no key changed between what the process knew before the read and now."""
    previous = _keys.generation
    _keys.seen(generation)
    if user.cached_under is not None:
        if generation is None or generation != user.cached_under:
            user.api_key = _key_checked(user.secret_hash)
            if generation is not None:
                _keys.put(user.secret_hash, user.api_key, generation)
        return
    if generation is not None and user.loaded_under == generation == previous:
        _keys.put(user.secret_hash, user.api_key, generation)


def _key_saved_or_deleted(**_kwargs) -> None:
    # Now, so that no process trusts its cached copy from here on, and again after the commit,
    # so that a copy read from the database before the commit is not trusted either.
    api_keys_changed()
    transaction.on_commit(api_keys_changed)


post_save.connect(_key_saved_or_deleted, sender=ApiKey, dispatch_uid="api_key_cache_save")
post_delete.connect(_key_saved_or_deleted, sender=ApiKey, dispatch_uid="api_key_cache_delete")
