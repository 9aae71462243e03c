"""`python manage.py seed_demo`: a realistic demo inventory and the demo accounts.

Idempotent: rows are matched by slug, hostname, serial or username, so running it again
changes nothing that was already there (node statuses staff changed during a demo are kept;
hardware facts and site data are brought back to the values below).

With DEBUG on it also creates the demo logins with their published passwords and a
read/write API key for Demo AI Lab with a fixed, printed secret (DEMO_API_KEY), so the API
can be tried at once. With DEBUG off it creates no login and no key: published credentials
must never reach a deployment. `--demo-logins` creates the two logins anyway, each with a
random password printed once (an existing login is left as it is), and still no key.

Pricing: `_seed_pricing()` writes list prices per GPU model, two site overrides and a pricing
policy. The demo organisation's prepaid balance is billing's business: `make run` and
`make seed` credit it with `manage.py billing_credit` (marketplace does not import billing).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from inventory.grid_prices import PriceRow, zone_prices_upsert
from inventory.models import (
    CoolingType,
    Gpu,
    GpuModel,
    Node,
    NodeStatus,
    PriceZone,
    Site,
    SiteStatus,
    StatusChange,
)
from marketplace.models import (
    ApiKey,
    ApiKeyScope,
    Membership,
    Organization,
    PricingPolicy,
    RateCard,
    Role,
)
from marketplace.services.api_keys import SECRET_PREFIX, api_key_hash
from marketplace.services.pricing import DEFAULT_POLICY

ADMIN_USERNAME, ADMIN_PASSWORD = "admin", "switchyard-admin"
DEMO_USERNAME, DEMO_PASSWORD = "demo", "switchyard-demo"
DEMO_ORG_NAME, DEMO_ORG_SLUG = "Demo AI Lab", "demo-ai-lab"
SEED_ACTOR = "seed_demo"
# Well known on purpose (printed by make run), hence only ever created with DEBUG on.
DEMO_API_KEY_PREFIX = f"{SECRET_PREFIX}demolab1"
DEMO_API_KEY = f"{DEMO_API_KEY_PREFIX}_LocalDemoKeyForDemoAiLabNotForProduction"

GPU_MODELS = [
    # slug, name, vendor, memory GB, TDP W, interconnect
    ("h200-sxm-141gb", "NVIDIA H200 SXM 141GB", "NVIDIA", 141, 700, "NVLink 4, 900 GB/s"),
    ("h100-sxm-80gb", "NVIDIA H100 SXM 80GB", "NVIDIA", 80, 700, "NVLink 4, 900 GB/s"),
    ("a100-sxm-80gb", "NVIDIA A100 SXM 80GB", "NVIDIA", 80, 400, "NVLink 3, 600 GB/s"),
    ("l40s-48gb", "NVIDIA L40S 48GB", "NVIDIA", 48, 350, "PCIe 4.0 x16"),
    ("rtx-4090-24gb", "NVIDIA GeForce RTX 4090 24GB", "NVIDIA", 24, 450, "PCIe 4.0 x16"),
    ("mi300x-192gb", "AMD Instinct MI300X 192GB", "AMD", 192, 750, "Infinity Fabric, 896 GB/s"),
]


# The power market zones the demo sites buy from: code, name, currency, market time zone.
PRICE_ZONES = [
    ("ercot-west", "ERCOT West (LZ_WEST)", "usd", "America/Chicago"),
    ("hydro-quebec", "Hydro-Québec (rate L)", "cad", "America/Toronto"),
    ("nordpool-no4", "Nord Pool NO4 (Northern Norway)", "eur", "Europe/Oslo"),
    ("ande-py", "ANDE (Paraguay)", "usd", "America/Asuncion"),
    ("landsnet-is", "Landsnet (Iceland)", "usd", "Atlantic/Reykjavik"),
    ("pacificorp-east", "PacifiCorp East (PACE)", "usd", "America/Denver"),
]
# Hourly price shape (per cent of the zone's base price), hour 0-23 UTC, and the base per MWh.
PRICE_SHAPE = [70, 65, 62, 60, 62, 70, 85, 100, 110, 105, 95, 88, 82, 80, 84, 95, 115, 150,
               180, 160, 130, 110, 90, 78]  # fmt: skip
ZONE_BASE_PRICES = {
    "ercot-west": "32.00", "hydro-quebec": "48.00", "nordpool-no4": "26.00", "ande-py": "30.00",
    "landsnet-is": "41.00", "pacificorp-east": "39.00",
}  # fmt: skip
SITE_ZONES = {
    "pecos-tx": "ercot-west",
    "baie-comeau-qc": "hydro-quebec",
    "mo-i-rana-no": "nordpool-no4",
    "hernandarias-py": "ande-py",
    "reykjanes-is": "landsnet-is",
    "gillette-wy": "pacificorp-east",
}


@dataclass(frozen=True)
class SiteSpec:
    slug: str
    code: str  # hostname prefix
    name: str
    region: str
    country: str
    grid_operator: str
    power_capacity_kw: str
    pue: str
    cooling: str
    energy_price_per_mwh: str
    renewable_share: str
    grid_carbon_g_per_kwh: int  # the grid's average, for the non-renewable share
    uplink_gbps: int
    former_use: str
    status: str


SITES = [
    SiteSpec("pecos-tx", "pcs", "Pecos, West Texas", "us-central", "US", "ERCOT", "60000",
             "1.08", CoolingType.IMMERSION, "38.50", "0.420", 390, 400,
             "bitcoin mining, 12,000 Antminer S19 XP in single-phase immersion tanks",
             SiteStatus.ACTIVE),
    SiteSpec("baie-comeau-qc", "bcm", "Baie-Comeau, Québec", "ca-east", "CA", "Hydro-Québec",
             "30000", "1.12", CoolingType.AIR, "41.20", "0.995", 2, 200,
             "bitcoin mining, 9,500 Antminer S19j Pro in a former aluminium smelter hall",
             SiteStatus.ACTIVE),
    SiteSpec("mo-i-rana-no", "mir", "Mo i Rana, Nordland", "eu-north", "NO", "Nord Pool (NO4)",
             "20000", "1.06", CoolingType.HYDRO, "27.80", "1.000", 12, 200,
             "bitcoin mining, 7,000 Whatsminer M30S++ with fjord-water cooling",
             SiteStatus.ACTIVE),
    SiteSpec("hernandarias-py", "hnd", "Hernandarias, Alto Paraná", "sa-east", "PY",
             "ANDE (Itaipú)", "25000", "1.25", CoolingType.AIR, "34.00", "1.000", 1, 100,
             "bitcoin mining, 8,000 Antminer S19 Pro beside the Itaipú substation",
             SiteStatus.ACTIVE),
    SiteSpec("reykjanes-is", "rkn", "Reykjanes, Iceland", "eu-north", "IS", "Landsnet", "18000",
             "1.05", CoolingType.AIR, "43.00", "1.000", 10, 100,
             "bitcoin mining, 6,000 Antminer S17 on geothermal power", SiteStatus.CURTAILED),
    SiteSpec("gillette-wy", "glt", "Gillette, Wyoming", "us-west", "US", "PacifiCorp", "40000",
             "1.18", CoolingType.IMMERSION, "46.50", "0.310", 640, 200,
             "bitcoin mining, 15,000 Antminer S19j Pro; two-phase immersion since 2022",
             SiteStatus.COMMISSIONING),
]  # fmt: skip


@dataclass(frozen=True)
class Fleet:
    site: str
    gpu_model: str
    nodes: int
    gpus_per_node: int
    cpu_model: str
    cpu_cores: int
    ram_gb: int
    disk_gb: int
    nic_gbps: int


FLEETS = [
    Fleet("pecos-tx", "h100-sxm-80gb", 10, 8, "2x Intel Xeon Platinum 8480+", 112, 2048, 30720, 400),
    Fleet("pecos-tx", "h200-sxm-141gb", 4, 8, "2x AMD EPYC 9654", 192, 2304, 30720, 400),
    Fleet("baie-comeau-qc", "a100-sxm-80gb", 8, 8, "2x AMD EPYC 7763", 128, 1024, 15360, 200),
    Fleet("baie-comeau-qc", "l40s-48gb", 6, 4, "AMD EPYC 9354", 32, 512, 7680, 100),
    Fleet("mo-i-rana-no", "h100-sxm-80gb", 6, 8, "2x Intel Xeon Platinum 8468", 96, 2048, 30720, 400),
    Fleet("mo-i-rana-no", "mi300x-192gb", 3, 8, "2x AMD EPYC 9474F", 96, 2304, 30720, 400),
    Fleet("hernandarias-py", "rtx-4090-24gb", 10, 4, "AMD EPYC 7443P", 24, 256, 3840, 25),
    Fleet("hernandarias-py", "a100-sxm-80gb", 4, 8, "2x AMD EPYC 7763", 128, 1024, 15360, 200),
    Fleet("reykjanes-is", "h200-sxm-141gb", 4, 8, "2x AMD EPYC 9654", 192, 2304, 30720, 400),
    Fleet("reykjanes-is", "l40s-48gb", 4, 4, "AMD EPYC 9354", 32, 512, 7680, 100),
    Fleet("gillette-wy", "h100-sxm-80gb", 3, 8, "2x Intel Xeon Platinum 8480+", 112, 2048, 30720, 400),
]  # fmt: skip

# Nodes that are not available when first seeded, with the reason staff gave.
NODE_EXCEPTIONS = {
    "pcs-h100-004": (NodeStatus.MAINTENANCE, "NVSwitch tray replacement after XID 74 errors."),
    "pcs-h100-009": (NodeStatus.DRAINING, "PSU B failing; drain before swap."),
    "bcm-a100-006": (NodeStatus.MAINTENANCE, "BMC and GPU VBIOS firmware update."),
    "mir-mi300x-002": (NodeStatus.DRAINING, "ROCm driver upgrade scheduled."),
    "hnd-4090-007": (NodeStatus.MAINTENANCE, "Riser cable reseat; GPU 2 dropping off the bus."),
    "glt-h100-001": (NodeStatus.MAINTENANCE, "Burn-in before the site opens."),
    "glt-h100-002": (NodeStatus.MAINTENANCE, "Burn-in before the site opens."),
    "glt-h100-003": (NodeStatus.MAINTENANCE, "Burn-in before the site opens."),
}


def _short(gpu_model: str) -> str:
    return gpu_model.split("-")[0] if not gpu_model.startswith("rtx") else "4090"


def _serial(hostname: str, index: int, vendor: str) -> str:
    digest = int(hashlib.sha256(f"{hostname}/{index}".encode()).hexdigest(), 16)
    if vendor == "AMD":
        return f"PCB{digest % 10**12:012d}"
    return f"16{digest % 10**11:011d}"  # NVIDIA serials are 13 digits


class Command(BaseCommand):
    help = "Create or update the demo inventory (sites, GPU models, nodes, GPUs) and demo accounts."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--demo-logins",
            action="store_true",
            help="With DEBUG off, create the demo logins anyway, each with a random password "
            "printed once (never the published ones); existing logins are left unchanged.",
        )

    @transaction.atomic
    def handle(self, *args, **options) -> None:
        models = _seed_gpu_models()
        sites = _seed_sites()
        nodes, gpus = _seed_nodes(sites, models)
        org = _seed_organization()
        api_key = None
        self.stdout.write(
            f"Demo data: {len(sites)} sites, {len(models)} GPU models, {nodes} nodes, {gpus} GPUs."
        )
        if settings.DEBUG:
            _seed_logins(org, admin_password=ADMIN_PASSWORD, demo_password=DEMO_PASSWORD)
            api_key = _seed_demo_api_key(org)
            self.stdout.write(
                f"Demo logins: staff {ADMIN_USERNAME} / {ADMIN_PASSWORD}; "
                f"customer {DEMO_USERNAME} / {DEMO_PASSWORD} (owner of {DEMO_ORG_NAME})."
            )
        elif options["demo_logins"]:
            created = _seed_logins(
                org,
                admin_password=secrets.token_urlsafe(18),
                demo_password=secrets.token_urlsafe(18),
                keep_existing=True,
            )
            for username, password in created.items():
                self.stdout.write(f"Demo login {username} / {password} (shown once; store it).")
            for username in {ADMIN_USERNAME, DEMO_USERNAME} - set(created):
                self.stdout.write(f"Demo login {username} exists; its password is unchanged.")
        else:
            self.stdout.write(
                "DEBUG is off: no demo logins and no API key were created (--demo-logins "
                "creates the logins with random passwords)."
            )
        _seed_pricing()
        _seed_zone_prices()
        if api_key is not None and api_key.revoked_at is None:
            self.stdout.write(f"Demo API key ({DEMO_ORG_NAME}, read and write): {DEMO_API_KEY}")


def _seed_gpu_models() -> dict[str, GpuModel]:
    models = {}
    for slug, name, vendor, memory_gb, tdp_watts, interconnect in GPU_MODELS:
        models[slug], _ = GpuModel.objects.update_or_create(
            slug=slug,
            defaults={
                "name": name,
                "vendor": vendor,
                "memory_gb": memory_gb,
                "tdp_watts": tdp_watts,
                "interconnect": interconnect,
            },
        )
    return models


def _seed_price_zones() -> dict[str, PriceZone]:
    zones = {}
    for code, name, currency, tz in PRICE_ZONES:
        zones[code], _ = PriceZone.objects.update_or_create(
            code=code, defaults={"name": name, "currency": currency, "timezone": tz}
        )
    return zones


def _seed_zone_prices() -> None:
    """A day back and a day and a half ahead of hourly prices per zone, as a day-ahead market
    publishes them (re-running adds the hours that came since and changes nothing else)."""
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    rows = []
    for zone in PriceZone.objects.filter(code__in=ZONE_BASE_PRICES):
        base = Decimal(ZONE_BASE_PRICES[zone.code])
        for n in range(-24, 36):
            start = hour + timedelta(hours=n)
            price = (base * PRICE_SHAPE[start.hour] / 100).quantize(Decimal("0.01"))
            rows.append(PriceRow(zone, start, start + timedelta(hours=1), price, zone.currency))
    if rows:
        zone_prices_upsert(rows=rows, source=SEED_ACTOR)


def _seed_sites() -> dict[str, Site]:
    zones = _seed_price_zones()
    sites = {}
    for spec in SITES:
        facts = {
            "name": spec.name,
            "region": spec.region,
            "country": spec.country,
            "grid_operator": spec.grid_operator,
            "power_capacity_kw": Decimal(spec.power_capacity_kw),
            "pue": Decimal(spec.pue),
            "cooling": spec.cooling,
            "energy_price_per_mwh": Decimal(spec.energy_price_per_mwh),
            "renewable_share": Decimal(spec.renewable_share),
            "grid_carbon_g_per_kwh": spec.grid_carbon_g_per_kwh,
            "uplink_gbps": spec.uplink_gbps,
            "former_use": spec.former_use,
            "price_zone": zones[SITE_ZONES[spec.slug]],
        }
        sites[spec.slug], _ = Site.objects.update_or_create(
            slug=spec.slug,
            defaults=facts,
            # Status is operational state: set once, then left to staff.
            create_defaults={**facts, "status": spec.status},
        )
    return sites


def _seed_nodes(sites: dict[str, Site], models: dict[str, GpuModel]) -> tuple[int, int]:
    now = timezone.now()
    node_count = 0
    gpu_rows = []
    for fleet in FLEETS:
        model = models[fleet.gpu_model]
        for number in range(1, fleet.nodes + 1):
            hostname = f"{SITES_BY_SLUG[fleet.site].code}-{_short(fleet.gpu_model)}-{number:03d}"
            hardware = {
                "site": sites[fleet.site],
                "gpu_model": model,
                "cpu_model": fleet.cpu_model,
                "cpu_cores": fleet.cpu_cores,
                "ram_gb": fleet.ram_gb,
                "disk_gb": fleet.disk_gb,
                "nic_gbps": fleet.nic_gbps,
            }
            status, reason = NODE_EXCEPTIONS.get(hostname, (NodeStatus.AVAILABLE, ""))
            node, created = Node.objects.update_or_create(
                hostname=hostname,
                defaults=hardware,
                create_defaults={**hardware, "status": status, "status_changed_at": now},
            )
            if created and status != NodeStatus.AVAILABLE:
                StatusChange.objects.create(
                    node=node,
                    from_status=NodeStatus.AVAILABLE,
                    to_status=status,
                    actor_label=SEED_ACTOR,
                    reason=reason,
                )
            node_count += 1
            gpu_rows += [
                Gpu(node=node, index=i, serial=_serial(hostname, i, model.vendor))
                for i in range(fleet.gpus_per_node)
            ]
    # One statement for every GPU; a re-run matches on serial and changes nothing.
    Gpu.objects.bulk_create(
        gpu_rows, update_conflicts=True, unique_fields=["serial"], update_fields=["node", "index"]
    )
    # No last heartbeat: the demo has no site agents, and the offline sweeper only watches
    # nodes that have reported at least once.
    return node_count, len(gpu_rows)


SITES_BY_SLUG = {spec.slug: spec for spec in SITES}


def _seed_organization() -> Organization:
    org, _ = Organization.objects.get_or_create(
        slug=DEMO_ORG_SLUG, defaults={"name": DEMO_ORG_NAME}
    )
    return org


def _seed_logins(
    org: Organization, *, admin_password: str, demo_password: str, keep_existing: bool = False
) -> dict[str, str]:
    """The staff login and the demo customer (owner of the demo organisation).

    Returns {username: password} of the logins whose password was set now. keep_existing:
    leave a login that already exists exactly as it is.
    """
    user_model = get_user_model()
    admin, admin_created = user_model.objects.get_or_create(
        username=ADMIN_USERNAME, defaults={"email": "admin@switchyard.example"}
    )
    demo, demo_created = user_model.objects.get_or_create(
        username=DEMO_USERNAME,
        defaults={"email": "demo@demo-ai-lab.example", "first_name": "Demo", "last_name": "User"},
    )
    set_now = {}
    for user, created, password, staff in (
        (admin, admin_created, admin_password, True),
        (demo, demo_created, demo_password, False),
    ):
        if created or not keep_existing:
            _ensure_login(user, password, staff=staff)
            set_now[user.username] = password
    Membership.objects.update_or_create(organization=org, user=demo, defaults={"role": Role.OWNER})
    return set_now


def _seed_demo_api_key(org: Organization) -> ApiKey:
    """A key whose secret is known, so make run can print it. A revoked one stays revoked."""
    key, _ = ApiKey.objects.update_or_create(
        prefix=DEMO_API_KEY_PREFIX,
        defaults={
            "organization": org,
            "name": "Demo key (local demo only)",
            "secret_hash": api_key_hash(DEMO_API_KEY),
            "scopes": [ApiKeyScope.READ, ApiKeyScope.WRITE],
        },
    )
    return key


def _ensure_login(user, password: str, *, staff: bool) -> None:
    """The printed demo password always works; the password is only rehashed when it differs."""
    changed = False
    if not user.check_password(password):
        user.set_password(password)
        changed = True
    for attr, value in (("is_active", True), ("is_staff", staff), ("is_superuser", staff)):
        if getattr(user, attr) != value:
            setattr(user, attr, value)
            changed = True
    if changed:
        user.save()


def _seed_pricing() -> None:
    """Demo rate cards (list price per GPU-hour, USD) and a pricing policy.

    Idempotent: rate cards are matched on (GPU model, site); a policy is created only when
    there is none, so staff edits made during a demo are kept.
    """
    defaults = {
        "h200-sxm-141gb": "3.1000",
        "h100-sxm-80gb": "2.2000",
        "a100-sxm-80gb": "1.4000",
        "l40s-48gb": "0.8500",
        "rtx-4090-24gb": "0.3500",
        "mi300x-192gb": "2.4000",
    }
    # Sites with cheap hydro power sell a little below list.
    site_overrides = {
        ("h100-sxm-80gb", "mo-i-rana-no"): "2.0500",
        ("a100-sxm-80gb", "baie-comeau-qc"): "1.3000",
    }
    models = GpuModel.objects.in_bulk(defaults, field_name="slug")
    for slug, price in defaults.items():
        if slug in models:
            RateCard.objects.update_or_create(
                gpu_model=models[slug],
                site=None,
                defaults={"price_per_gpu_hour": Decimal(price), "currency": "usd"},
            )
    sites = Site.objects.in_bulk([site for _, site in site_overrides], field_name="slug")
    for (slug, site_slug), price in site_overrides.items():
        if slug in models and site_slug in sites:
            RateCard.objects.update_or_create(
                gpu_model=models[slug],
                site=sites[site_slug],
                defaults={"price_per_gpu_hour": Decimal(price), "currency": "usd"},
            )
    if not PricingPolicy.objects.exists():
        PricingPolicy.objects.create(**DEFAULT_POLICY, note="demo default")
