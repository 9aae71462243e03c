"""API key authentication: `Authorization: Bearer sy_live_…`, and nowhere else.

A key found in the query string is refused (400 api_key_in_url) rather than ignored, so an
integrator learns at once that the key has been leaking into URLs, logs and proxies.
"""

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from marketplace.models import ApiKey
from marketplace.selectors.organizations import api_key_by_secret_hash
from marketplace.services.api_keys import SECRET_PREFIX, api_key_hash, api_key_record_use

__all__ = ["ApiKeyAuthentication", "ApiKeyInUrl", "KEY_QUERY_PARAMS"]

KEY_QUERY_PARAMS = frozenset({"api_key", "apikey", "key", "token", "access_token"})


class ApiKeyInUrl(exceptions.APIException):
    status_code = 400
    default_code = "api_key_in_url"
    default_detail = (
        "API keys are accepted only in the Authorization header (Authorization: Bearer sy_…), "
        "never in the URL. Remove it from the URL, and rotate the key if the URL was logged."
    )


class ApiKeyAuthentication(BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple | None:
        _refuse_key_in_url(request)
        header = get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
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
        key = api_key_by_secret_hash(api_key_hash(secret))
        if key is None:
            raise exceptions.AuthenticationFailed("Invalid API key.", code="invalid_api_key")
        if key.revoked_at is not None:
            raise exceptions.AuthenticationFailed(
                f"This API key ({key.prefix}…) was revoked.", code="api_key_revoked"
            )
        api_key_record_use(api_key=key)
        return ApiKeyUser(key), key

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (not 403) to unauthenticated requests.
        return 'Bearer realm="switchyard"'


def _refuse_key_in_url(request: Request) -> None:
    for name, values in request.query_params.lists():
        if name.lower() in KEY_QUERY_PARAMS or any(v.startswith(SECRET_PREFIX) for v in values):
            raise ApiKeyInUrl()


class ApiKeyUser:
    """The request.user of a key-authenticated call: the organisation acting through its key."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(self, api_key: ApiKey):
        self.api_key = api_key
        self.pk = None
        self.id = None
        self.username = f"api_key:{api_key.prefix}"

    def __str__(self) -> str:
        return self.username
