"""Reads of the inventory, shared by the admin, the API and the marketplace."""

from django.db.models import Count, Q, QuerySet

from inventory.models import Gpu, GpuHealth, NodeStatus, Site

NODE_STATUSES = list(NodeStatus.values)


def site_list_with_capacity() -> QuerySet[Site]:
    """Sites annotated with GPU totals: gpu_total and gpu_available (on available nodes)."""
    return Site.objects.annotate(
        gpu_total=Count("nodes__gpus"),
        gpu_available=Count("nodes__gpus", filter=Q(nodes__status=NodeStatus.AVAILABLE)),
    )


def site_capacity_summary(*, site: Site) -> list[dict]:
    """GPUs at the site per model: how many sit on nodes in each status, and how many are
    unhealthy. One aggregated query; one row per GPU model, ordered by model slug.

    Each row: {"gpu_model", "gpu_model_name", "total", "unhealthy", <each node status>: n}.
    """
    per_status = {status: Count("id", filter=Q(node__status=status)) for status in NODE_STATUSES}
    rows = (
        Gpu.objects.filter(node__site=site)
        .values("node__gpu_model__slug", "node__gpu_model__name")
        .annotate(
            total=Count("id"),
            unhealthy=Count("id", filter=~Q(health=GpuHealth.OK)),
            **per_status,
        )
        .order_by("node__gpu_model__slug")
    )
    return [
        {
            "gpu_model": row.pop("node__gpu_model__slug"),
            "gpu_model_name": row.pop("node__gpu_model__name"),
            **row,
        }
        for row in rows
    ]
