from django.urls import path

from inventory.apis import BurnInLeaseApi, BurnInResultApi, HeartbeatApi

urlpatterns = [
    path("agent/heartbeat", HeartbeatApi.as_view(), name="agent-heartbeat"),
    path("agent/burn-ins/lease", BurnInLeaseApi.as_view(), name="agent-burn-in-lease"),
    path(
        "agent/burn-ins/<int:burn_in_id>/result",
        BurnInResultApi.as_view(),
        name="agent-burn-in-result",
    ),
]
