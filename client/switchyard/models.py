"""Typed views of the API's objects: attribute access over the JSON the API returned.

Each class names the fields the API documents (for editors and type checkers); any other field
the API adds later is still there, as an attribute and through obj["name"]. A named field that
may be absent (`secret`, sent only when a key or an endpoint is created) reads as None where
the response has none. `obj.to_dict()` gives the JSON back.
"""

import functools
import types
from typing import Any, Union, get_args, get_origin

__all__ = [
    "ApiObject",
    "GpuModel",
    "Site",
    "Offer",
    "Quote",
    "Reservation",
    "Event",
    "WebhookEndpoint",
    "WebhookDelivery",
    "ApiKey",
    "SshKey",
    "AuditEntry",
    "wrap",
]


class ApiObject:
    def __init__(self, data: dict[str, Any]):
        object.__setattr__(self, "_data", data)

    def __getattr__(self, name: str) -> Any:
        try:
            return wrap(self._data[name])
        except KeyError:
            if name in _optional_fields(type(self)):
                return None
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._data[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._data.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        return self._data

    def __eq__(self, other) -> bool:
        return isinstance(other, ApiObject) and other._data == self._data

    def __repr__(self) -> str:
        ident = self._data.get("id") or self._data.get("slug") or ""
        return f"<{type(self).__name__} {ident}>"


@functools.cache
def _optional_fields(cls: type) -> frozenset[str]:
    """The fields a class names with a type that allows None (`secret: str | None`)."""
    names = set()
    for klass in cls.__mro__:
        for name, hint in getattr(klass, "__annotations__", {}).items():
            if get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint):
                names.add(name)
    return frozenset(names)


def wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return ApiObject(value)
    if isinstance(value, list):
        return [wrap(v) for v in value]
    return value


class GpuModel(ApiObject):
    id: str  # the slug, e.g. h100-sxm-80gb
    name: str
    memory_gb: int


class Site(ApiObject):
    id: str  # the slug
    name: str
    region: str
    country: str


class Offer(ApiObject):
    site: ApiObject  # id (the slug), name, region, country
    gpu_model: str
    gpu_count: int
    price_per_gpu_hour: str
    total: str
    currency: str


class Quote(ApiObject):
    id: str
    gpu_model: str
    site: str
    gpu_count: int
    starts_at: str
    ends_at: str
    total: str
    currency: str
    expires_at: str


class Reservation(ApiObject):
    id: str
    status: str
    status_reason: str
    gpu_model: str
    site: str
    gpu_count: int
    tier: str
    starts_at: str
    ends_at: str
    currency: str
    price_per_gpu_hour: str
    total: str
    connection: Any
    allowed_actions: list[str]


class Event(ApiObject):
    id: str
    type: str
    created: str
    object_type: str
    object_id: str
    data: Any


class WebhookEndpoint(ApiObject):
    id: str
    url: str
    event_types: list[str]
    enabled: bool
    secret: str | None


class WebhookDelivery(ApiObject):
    id: str
    event: str
    event_type: str
    status: str
    attempts: list[Any]


class ApiKey(ApiObject):
    id: str
    name: str
    prefix: str
    scopes: list[str]
    secret: str | None


class SshKey(ApiObject):
    id: str
    name: str
    fingerprint: str


class AuditEntry(ApiObject):
    id: str
    created_at: str
    actor: str
    action: str
    object_id: str
    changes: Any
