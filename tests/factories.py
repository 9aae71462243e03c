"""factory-boy factories for the whole suite, in one place."""

from decimal import Decimal

import factory
from django.contrib.auth import get_user_model

from inventory.models import Gpu, GpuModel, Node, PriceZone, Site, SiteStatus
from marketplace.models import Membership, Organization, Role


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("correct horse battery staple")


class PriceZoneFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = PriceZone
        django_get_or_create = ("code",)

    code = factory.Sequence(lambda n: f"zone-{n}")
    name = factory.LazyAttribute(lambda z: z.code.upper())
    currency = "usd"
    timezone = "America/Chicago"


class SiteFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Site

    slug = factory.Sequence(lambda n: f"site-{n}")
    name = factory.LazyAttribute(lambda s: s.slug.replace("-", " ").title())
    region = "us-central"
    country = "US"
    grid_operator = "ERCOT"
    power_capacity_kw = Decimal("25000.0")
    pue = Decimal("1.15")
    cooling = "immersion"
    energy_price_per_mwh = Decimal("38.50")
    renewable_share = Decimal("0.420")
    uplink_gbps = 100
    former_use = "bitcoin mining"
    status = SiteStatus.ACTIVE


class GpuModelFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = GpuModel
        django_get_or_create = ("slug",)

    slug = "h100-sxm-80gb"
    name = "NVIDIA H100 SXM 80GB"
    vendor = "NVIDIA"
    memory_gb = 80
    tdp_watts = 700
    interconnect = "NVLink 900 GB/s"


class NodeFactory(factory.django.DjangoModelFactory):
    """A node with `gpus` GPU rows (8 unless told otherwise)."""

    class Meta:
        model = Node
        skip_postgeneration_save = True

    site = factory.SubFactory(SiteFactory)
    gpu_model = factory.SubFactory(GpuModelFactory)
    hostname = factory.Sequence(lambda n: f"node-{n:05d}")
    cpu_model = "AMD EPYC 9454"
    cpu_cores = 96
    ram_gb = 1024
    disk_gb = 15360
    nic_gbps = 400

    @factory.post_generation
    def gpus(self, create, extracted, **kwargs):
        count = 8 if extracted is None else extracted
        if create:
            Gpu.objects.bulk_create(
                Gpu(node=self, index=i, serial=f"{self.hostname}-sn{i}") for i in range(count)
            )


class OrganizationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Organization

    name = factory.Sequence(lambda n: f"Org {n}")
    slug = factory.Sequence(lambda n: f"org-{n}")


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    organization = factory.SubFactory(OrganizationFactory)
    user = factory.SubFactory(UserFactory)
    role = Role.OWNER
