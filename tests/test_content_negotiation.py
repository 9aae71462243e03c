"""config.api.negotiation: the known answer for plain JSON requests is DRF's own answer, and
everything else is still negotiated by DRF (406 included)."""

import pytest
from django.http import Http404
from rest_framework.exceptions import NotAcceptable
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BrowsableAPIRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from config.api.negotiation import ContentNegotiation

ACCEPTS = [None, "", "*/*", "application/json", "application/json; indent=4", "text/html",
           "text/html, */*;q=0.8", "application/*", "application/xml", "image/png"]  # fmt: skip


def _choice(negotiation, renderers, accept, query=""):
    extra = {} if accept is None else {"HTTP_ACCEPT": accept}
    request = Request(APIRequestFactory().get("/api/v1/gpu-models" + query, **extra))
    try:
        renderer, media_type = negotiation.select_renderer(request, renderers)
    except NotAcceptable:
        return "406"
    except Http404:  # ?format= naming no renderer
        return "404"
    return type(renderer), media_type


@pytest.mark.parametrize("accept", ACCEPTS)
@pytest.mark.parametrize("query", ["", "?format=json", "?format=api", "?page=2"])
@pytest.mark.parametrize("renderers", [[JSONRenderer], [JSONRenderer, BrowsableAPIRenderer]])
def test_the_choice_is_drfs_for_every_accept_header(accept, query, renderers):
    instances = [renderer() for renderer in renderers]
    expected = _choice(DefaultContentNegotiation(), instances, accept, query)
    assert _choice(ContentNegotiation(), instances, accept, query) == expected
