"""Inventory import at fleet size, and files that are too large or hostile.

The 100,000-GPU file runs with the settings' server-side binding and prepared statements on,
where one statement may carry at most 65,535 parameters: the importer batches its lookups
and inserts under that limit (it used to send all serials in one query and fail).
"""

import time

import pytest
from django.db import connection

from config.errors import ValidationFailed
from inventory.importer import ImportFailed, inventory_import
from inventory.models import Gpu, Node, Site
from tests.factories import GpuModelFactory

pytestmark = pytest.mark.django_db

HEADER = (
    "site,site_name,region,country,grid_operator,power_capacity_kw,pue,cooling,"
    "energy_price_per_mwh,renewable_share,uplink_gbps,hostname,gpu_model,gpu_count,"
    "cpu_cores,ram_gb,disk_gb,nic_gbps"
)
NODES, GPUS_PER_NODE, SITES = 12_500, 8, 25


def _fleet_csv(path, *, last_row: str | None = None):
    lines = [HEADER]
    for n in range(NODES):
        site = n % SITES
        facts = (
            f"Site {site},us-central,US,ERCOT,60000,1.10,immersion,38.50,0.4,400"
            if n < SITES
            else ",,,,,,,,,"
        )
        lines.append(
            f"site-{site:02d},{facts},node-{n:05d},h100-sxm-80gb,{GPUS_PER_NODE},96,1024,15360,400"
        )
    if last_row is not None:
        lines[-1] = last_row
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def h100():
    return GpuModelFactory(slug="h100-sxm-80gb")


def test_a_100000_gpu_file_imports_with_prepared_statements_on(h100, tmp_path):
    assert connection.settings_dict["OPTIONS"].get("server_side_binding") is True
    path = _fleet_csv(tmp_path / "fleet.csv")

    started = time.monotonic()
    report = inventory_import(path=path)
    took = time.monotonic() - started
    print(f"\n100,000-GPU import: {took:.1f} s")

    assert report.counts["nodes"]["created"] == NODES
    assert report.counts["gpus"]["created"] == NODES * GPUS_PER_NODE == 100_000
    assert Gpu.objects.count() == 100_000
    assert Site.objects.count() == SITES
    assert list(
        Gpu.objects.filter(node__hostname="node-12499")
        .order_by("index")
        .values_list("serial", flat=True)
    ) == [f"node-12499-gpu{i}" for i in range(8)]


def test_a_bad_last_row_in_a_huge_file_is_named_and_nothing_is_written(h100, tmp_path):
    path = _fleet_csv(
        tmp_path / "fleet.csv",
        last_row="site-00,,,,,,,,,,,node-99999,h100-sxm-80gb,eight,96,1024,15360,400",
    )

    with pytest.raises(ImportFailed) as failed:
        inventory_import(path=path)

    assert [str(p) for p in failed.value.problems] == [
        f"line {NODES + 1}: node 'node-99999': gpu_count must be a whole number, got 'eight'"
    ]
    assert (Node.objects.count(), Gpu.objects.count(), Site.objects.count()) == (0, 0, 0)


def test_a_file_over_the_size_limit_is_refused_with_its_size(h100, tmp_path, settings):
    settings.INVENTORY_IMPORT_MAX_BYTES = 100 * 1024
    path = tmp_path / "fleet.csv"
    path.write_text(HEADER + "\n" + "x" * 150 * 1024)

    with pytest.raises(ValidationFailed) as refused:
        inventory_import(path=path)

    assert refused.value.code == "file_too_large"
    assert refused.value.message.startswith(
        "fleet.csv is 150 KiB; an inventory file may be at most 100 KiB (INVENTORY_IMPORT_MAX_BYTES)"
    )
    assert Node.objects.count() == 0


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
sites: [*i,*i,*i,*i,*i,*i,*i,*i,*i]
"""


def test_a_yaml_alias_bomb_is_refused_at_its_first_anchor(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)

    with pytest.raises(ImportFailed) as failed:
        inventory_import(path=path)

    [problem] = failed.value.problems
    assert problem.line == 1
    assert "YAML anchors (&) and aliases (*) are not allowed" in problem.message


def test_a_single_alias_is_refused_too(h100, tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text(
        "sites:\n"
        "  - &tx {slug: tx-1, name: T, region: us, country: US, grid_operator: ERCOT,\n"
        "         power_capacity_kw: 1, pue: 1.1, cooling: air, energy_price_per_mwh: 1,\n"
        "         renewable_share: 0.1, uplink_gbps: 1}\n"
        "  - *tx\n"
    )
    with pytest.raises(ImportFailed, match="anchors"):
        inventory_import(path=path)
    assert Site.objects.count() == 0
