"""django-prometheus's per-view HTTP middleware, recording the series operators read.

The library's PrometheusAfterMiddleware updates fourteen labelled series a request (requests
by method, by transport, by view, transport and method, body sizes both ways, responses by
status, by charset, ...) and builds the request's header map to look for an AJAX header. All
but two are sums or slices of those two, which the alerts and dashboards use
(docs/operations.md): responses by status, view and method, and latency by view and method.
Together the rest cost about a tenth of the cheapest authenticated request's CPU
(docs/benchmarks.md), so this subclass records only the two, plus the library's exception
counters, through its own metric objects and names. PrometheusBeforeMiddleware (requests and
latency including every middleware) is the library's, unchanged.
"""

from django_prometheus import middleware
from django_prometheus.utils import Time, TimeSince

__all__ = ["PrometheusAfterMiddleware"]


class PrometheusAfterMiddleware(middleware.PrometheusAfterMiddleware):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Each labelled child once per process: prometheus_client's labels() takes a lock
        # and validates the names on every call. Label values are bounded (views, methods,
        # status codes), as they already are in the metric's own children.
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *values: str):
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def process_request(self, request):
        request.prometheus_after_middleware_event = Time()

    def process_view(self, request, view_func, *view_args, **view_kwargs):
        return None

    def process_template_response(self, request, response):
        return response

    def process_response(self, request, response):
        method = self._method(request)
        view = self._get_view_name(request)
        self._child(
            self.metrics.responses_by_status_view_method, str(response.status_code), view, method
        ).inc()
        started = getattr(request, "prometheus_after_middleware_event", None)
        if started is None:  # a middleware above answered before this one ran
            self.metrics.requests_unknown_latency.inc()
        else:
            self._child(self.metrics.requests_latency_by_view_method, view, method).observe(
                TimeSince(started)
            )
        return response
