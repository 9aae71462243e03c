from django.urls import path

from inventory.apis import HeartbeatApi

urlpatterns = [
    path("agent/heartbeat", HeartbeatApi.as_view(), name="agent-heartbeat"),
]
