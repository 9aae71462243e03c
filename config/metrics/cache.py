"""Django's Redis cache, timed: each operation's duration, and gets counted as hits or misses
(django-prometheus's cache counters; its own Redis backend needs django-redis)."""

from django.core.cache.backends.redis import RedisCache
from django_prometheus.cache.metrics import (
    django_cache_get_fail_total,
    django_cache_get_total,
    django_cache_hits_total,
    django_cache_misses_total,
)
from prometheus_client import Histogram

__all__ = ["InstrumentedRedisCache"]

cache_operation_seconds = Histogram(
    "django_cache_operation_duration_seconds",
    "Time a cache operation took, by operation.",
    ["backend", "operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
_BACKEND = "redis"
_MISSING = object()


def _timed(operation: str):
    timer = cache_operation_seconds.labels(_BACKEND, operation)

    def decorate(method):
        def timed(self, *args, **kwargs):
            with timer.time():
                return method(self, *args, **kwargs)

        timed.__name__ = method.__name__
        return timed

    return decorate


class InstrumentedRedisCache(RedisCache):
    def get(self, key, default=None, version=None):
        django_cache_get_total.labels(backend=_BACKEND).inc()
        try:
            with cache_operation_seconds.labels(_BACKEND, "get").time():
                value = super().get(key, _MISSING, version)
        except Exception:
            django_cache_get_fail_total.labels(backend=_BACKEND).inc()
            raise
        if value is _MISSING:
            django_cache_misses_total.labels(backend=_BACKEND).inc()
            return default
        django_cache_hits_total.labels(backend=_BACKEND).inc()
        return value

    set = _timed("set")(RedisCache.set)
    add = _timed("add")(RedisCache.add)
    delete = _timed("delete")(RedisCache.delete)
    get_many = _timed("get_many")(RedisCache.get_many)
    set_many = _timed("set_many")(RedisCache.set_many)
    incr = _timed("incr")(RedisCache.incr)
    touch = _timed("touch")(RedisCache.touch)
