"""Everything under /api/v1/, gathered from the apps."""

from django.urls import include, path

urlpatterns = [
    path("", include("inventory.urls")),
    path("", include("marketplace.urls")),
    path("", include("marketplace.provisioning.urls")),
    path("", include("billing.urls")),
]
