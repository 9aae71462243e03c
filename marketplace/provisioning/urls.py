"""The site agent's job endpoints; included under /api/v1/ by config/api_urls.py."""

from django.urls import path

from marketplace.provisioning.apis import (
    AgentJobCompleteApi,
    AgentJobFailApi,
    AgentJobLeaseApi,
    AgentJobProgressApi,
    AgentWorkloadsApi,
)

urlpatterns = [
    path("agent/jobs/lease", AgentJobLeaseApi.as_view(), name="agent-job-lease"),
    path(
        "agent/jobs/<int:job_id>/progress",
        AgentJobProgressApi.as_view(),
        name="agent-job-progress",
    ),
    path(
        "agent/jobs/<int:job_id>/complete",
        AgentJobCompleteApi.as_view(),
        name="agent-job-complete",
    ),
    path("agent/jobs/<int:job_id>/fail", AgentJobFailApi.as_view(), name="agent-job-fail"),
    path("agent/workloads", AgentWorkloadsApi.as_view(), name="agent-workloads"),
]
