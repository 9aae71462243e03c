"""Content negotiation: DRF's, with the answer to the common requests known in advance.

Nearly every call accepts JSON plainly (no Accept header, `*/*` or `application/json`) and
names no format; DRF's negotiation still parses and ranks the header on each. For those the
first renderer, when it is JSON, is what DRF would choose, with the same media type; every
other request (another type, a list of types, `?format=`) is negotiated by DRF.
"""

from rest_framework.negotiation import DefaultContentNegotiation

__all__ = ["ContentNegotiation"]

_PLAIN_JSON = frozenset({"*/*", "application/json"})


class ContentNegotiation(DefaultContentNegotiation):
    def select_renderer(self, request, renderers, format_suffix=None):
        if (
            not format_suffix
            and renderers
            and renderers[0].media_type == "application/json"
            and request.META.get("HTTP_ACCEPT", "*/*") in _PLAIN_JSON  # none: */*, as DRF reads it
            and self.settings.URL_FORMAT_OVERRIDE not in request.query_params
        ):
            return renderers[0], "application/json"
        return super().select_renderer(request, renderers, format_suffix)
