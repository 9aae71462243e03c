import textwrap
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from inventory.models import Gpu, GpuModel, Node, NodeStatus, Site, SiteStatus
from tests.factories import GpuModelFactory, NodeFactory, SiteFactory

pytestmark = pytest.mark.django_db

FIXTURES = Path(__file__).resolve().parents[2] / "inventory" / "fixtures"

CSV_HEADER = (
    "site,site_name,region,country,grid_operator,power_capacity_kw,pue,cooling,"
    "energy_price_per_mwh,energy_currency,renewable_share,uplink_gbps,former_use,site_status,"
    "hostname,gpu_model,gpu_count,gpu_serials,cpu_model,cpu_cores,ram_gb,disk_gb,nic_gbps,"
    "node_status"
)
CSV_SITE = "oh-site,Ohio,us-east,US,PJM,5000,1.20,air,45.00,usd,0.20,40,mining,active"


def run(path: Path) -> str:
    out = StringIO()
    call_command("import_inventory", str(path), stdout=out)
    return out.getvalue()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def snapshot() -> dict:
    return {
        "gpu_models": list(GpuModel.objects.order_by("slug").values()),
        "sites": list(Site.objects.order_by("slug").values()),
        "nodes": list(Node.objects.order_by("hostname").values()),
        "gpus": list(Gpu.objects.order_by("serial").values()),
    }


def test_it_imports_the_example_yaml():
    output = run(FIXTURES / "example_inventory.yaml")

    assert "gpu models: 2 created" in output
    assert "sites: 2 created" in output
    assert "nodes: 3 created" in output
    assert "gpus: 20 created" in output
    site = Site.objects.get(slug="tx-abilene")
    assert (site.country, site.grid_operator, site.cooling) == ("US", "ERCOT", "immersion")
    assert (site.pue, site.renewable_share) == (Decimal("1.12"), Decimal("0.350"))
    assert site.grid_carbon_g_per_kwh == 390
    assert site.energy_price_per_mwh == Decimal("31.50")
    assert site.status == SiteStatus.ACTIVE
    baie = Site.objects.get(slug="qc-baie-comeau")
    assert (baie.energy_currency, baie.status) == ("cad", SiteStatus.COMMISSIONING)
    node = Node.objects.get(hostname="abl-h100-001")
    assert (node.site, node.gpu_model.slug, node.cpu_cores) == (site, "h100-sxm-80gb", 96)
    assert list(node.gpus.values_list("index", "serial")) == [
        (i, f"abl-h100-001-gpu{i}") for i in range(8)
    ]
    l40s = Node.objects.get(hostname="abl-l40s-001")
    assert list(l40s.gpus.values_list("serial", flat=True)) == [
        "L40S-1A2B",
        "L40S-3C4D",
        "L40S-5E6F",
        "L40S-7A8B",
    ]
    assert l40s.cpu_model == ""


def test_it_imports_the_example_csv_after_the_catalogue():
    GpuModelFactory(slug="h100-sxm-80gb")
    GpuModelFactory(slug="l40s-48gb", name="L40S", memory_gb=48)

    output = run(FIXTURES / "example_inventory.csv")

    assert "sites: 1 created" in output
    assert "nodes: 3 created" in output
    assert "gpus: 18 created" in output
    site = Site.objects.get(slug="no-kristiansand")
    assert (site.country, site.energy_currency, site.renewable_share) == (
        "NO",
        "eur",
        Decimal("0.980"),
    )
    assert site.nodes.count() == 3
    l40s = Node.objects.get(hostname="krs-l40s-001")
    assert l40s.status == NodeStatus.MAINTENANCE
    assert list(l40s.gpus.values_list("serial", flat=True)) == ["KRS-L40S-A", "KRS-L40S-B"]


@pytest.mark.parametrize("name", ["example_inventory.yaml", "example_inventory.csv"])
def test_a_second_run_changes_nothing(name):
    GpuModelFactory(slug="h100-sxm-80gb")
    GpuModelFactory(slug="l40s-48gb", name="NVIDIA L40S 48GB", memory_gb=48, tdp_watts=350)
    run(FIXTURES / name)
    before = snapshot()

    output = run(FIXTURES / name)

    assert snapshot() == before  # includes every updated_at
    for kind in ("gpu models", "sites", "nodes", "gpus"):
        assert f"{kind}: 0 created, 0 updated" in output


def test_it_updates_what_changed_and_reports_it(tmp_path):
    run(FIXTURES / "example_inventory.yaml")
    text = (FIXTURES / "example_inventory.yaml").read_text()
    changed = text.replace("pue: 1.12", "pue: 1.10").replace(
        "gpu_count: 8\n        cpu_model", "gpu_count: 10\n        cpu_model"
    )
    path = tmp_path / "changed.yaml"
    path.write_text(changed)
    untouched = Site.objects.get(slug="qc-baie-comeau").updated_at

    output = run(path)

    assert "sites: 0 created, 1 updated, 1 unchanged" in output
    assert "gpus: 2 created, 0 updated, 20 unchanged" in output
    assert Site.objects.get(slug="tx-abilene").pue == Decimal("1.10")
    assert Site.objects.get(slug="qc-baie-comeau").updated_at == untouched
    assert Node.objects.get(hostname="abl-h100-001").gpus.count() == 10


def test_a_status_in_the_file_is_used_only_on_creation(tmp_path):
    run(FIXTURES / "example_inventory.yaml")
    Site.objects.filter(slug="tx-abilene").update(status=SiteStatus.CURTAILED)

    run(FIXTURES / "example_inventory.yaml")

    assert Site.objects.get(slug="tx-abilene").status == SiteStatus.CURTAILED


def test_csv_rows_can_add_nodes_to_an_existing_site(tmp_path):
    site = SiteFactory(slug="known")
    GpuModelFactory()
    path = write(
        tmp_path,
        "add.csv",
        """
        site,hostname,gpu_model,gpu_count,cpu_cores,ram_gb,disk_gb,nic_gbps
        known,new-node-1,h100-sxm-80gb,2,32,256,1000,100
        """,
    )
    before = Site.objects.get(pk=site.pk).updated_at

    output = run(path)

    assert "sites: 0 created, 0 updated, 1 unchanged" in output
    assert Node.objects.get(hostname="new-node-1").site == site
    assert Site.objects.get(pk=site.pk).updated_at == before


# --- Bad files: every problem reported with its line; nothing written ---------------------

GOOD_SITE_YAML = """
gpu_models:
  - slug: h100-sxm-80gb
    name: H100
    vendor: NVIDIA
    memory_gb: 80
    tdp_watts: 700
sites:
  - slug: good-site
    name: Good
    region: us-west
    country: US
    grid_operator: CAISO
    power_capacity_kw: 1000
    pue: 1.2
    cooling: air
    energy_price_per_mwh: 30
    renewable_share: 0.5
    uplink_gbps: 10
    nodes:
      - hostname: good-1
        gpu_model: h100-sxm-80gb
        gpu_count: 2
        cpu_cores: 8
        ram_gb: 64
        disk_gb: 100
        nic_gbps: 10
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "pue: 1.2",
            "pue: 0.95",
            "line 14: site 'good-site': pue must be between 1 and 5, got 0.95",
        ),
        (
            "renewable_share: 0.5",
            "renewable_share: 1.2",
            "line 17: site 'good-site': renewable_share must be between 0 and 1, got 1.2",
        ),
        (
            "renewable_share: 0.5",
            "renewable_share: -0.1",
            "line 17: site 'good-site': renewable_share must be between 0 and 1, got -0.1",
        ),
        (
            "renewable_share: 0.5",
            "renewable_share: 0.5\n    grid_carbon_g_per_kwh: 2500",
            "line 18: site 'good-site': grid_carbon_g_per_kwh must be between 0 and 2000, got 2500",
        ),
        (
            "country: US",
            "country: USA",
            "line 11: site 'good-site': country must be a two-letter ISO 3166-1 country code, got 'USA'",
        ),
        (
            "gpu_model: h100-sxm-80gb",
            "gpu_model: b200",
            "line 21: node 'good-1': unknown gpu model 'b200'",
        ),
        (
            "        nic_gbps: 10\n",
            "",
            "line 20: node 'good-1': missing required field(s) nic_gbps",
        ),
        (
            "cpu_cores: 8",
            "cpu_cores: eight",
            "line 23: node 'good-1': cpu_cores must be a whole number, got 'eight'",
        ),
        (
            "gpu_count: 2",
            "gpu_count: 2.5",
            "line 22: node 'good-1': gpu_count must be a whole number, got 2.5",
        ),
        (
            "power_capacity_kw: 1000",
            "power_capacity_kw: lots",
            "line 13: site 'good-site': power_capacity_kw must be a number, got 'lots'",
        ),
        (
            "cooling: air",
            "cooling: freon",
            "line 15: site 'good-site': cooling must be one of air, hydro, immersion, "
            "direct_liquid, got 'freon'",
        ),
        (
            "uplink_gbps: 10",
            "uplink_gbps: 10\n    colour: red",
            "line 19: site 'good-site': unknown field 'colour'",
        ),
        (
            "pue: 1.2",
            "pue: 1.234",
            "line 14: site 'good-site': pue must have at most 2 decimal places, got 1.234",
        ),
        (
            "gpu_count: 2",
            "gpu_count: 3\n        gpu_serials: [A, B]",
            "line 22: node 'good-1': gpu_count is 3 but 2 gpu_serials are given",
        ),
    ],
)
def test_it_reports_a_bad_yaml_row_with_its_line_and_writes_nothing(tmp_path, old, new, expected):
    assert old in GOOD_SITE_YAML
    path = write(tmp_path, "bad.yaml", GOOD_SITE_YAML.replace(old, new, 1))

    with pytest.raises(CommandError) as failed:
        run(path)

    message = str(failed.value)
    assert "1 problem(s) found; nothing was written" in message
    assert expected in message
    assert snapshot() == {"gpu_models": [], "sites": [], "nodes": [], "gpus": []}


def test_it_reports_every_problem_at_once(tmp_path):
    text = GOOD_SITE_YAML.replace("pue: 1.2", "pue: 0.5").replace("cpu_cores: 8", "cpu_cores: x")
    text += """
      - hostname: good-1
        gpu_model: h100-sxm-80gb
        gpu_count: 1
        cpu_cores: 8
        ram_gb: 64
        disk_gb: 100
        nic_gbps: 10
"""
    path = write(tmp_path, "bad.yaml", text)

    with pytest.raises(CommandError) as failed:
        run(path)

    lines = [line.strip() for line in str(failed.value).splitlines()[1:]]
    assert lines == [
        "line 14: site 'good-site': pue must be between 1 and 5, got 0.5",
        "line 23: node 'good-1': cpu_cores must be a whole number, got 'x'",
        "line 28: node 'good-1' appears twice in the file (first on line 20)",
    ]
    assert Site.objects.count() == 0


def test_a_good_site_is_not_written_when_another_row_is_bad(tmp_path):
    SiteFactory(slug="good-site", pue=Decimal("1.50"))
    text = GOOD_SITE_YAML.replace("gpu_model: h100-sxm-80gb", "gpu_model: nope")
    before = snapshot()

    with pytest.raises(CommandError):
        run(write(tmp_path, "bad.yaml", text))

    assert snapshot() == before
    assert Site.objects.get(slug="good-site").pue == Decimal("1.50")


def test_invalid_yaml_is_reported_with_its_line(tmp_path):
    path = write(tmp_path, "broken.yaml", "sites:\n  - slug: a\n   name: [unclosed\n")

    with pytest.raises(CommandError, match=r"line \d+: not valid YAML"):
        run(path)


def test_an_unknown_extension_is_refused(tmp_path):
    path = write(tmp_path, "inventory.json", "{}")

    with pytest.raises(CommandError, match="must end in .yaml, .yml or .csv"):
        run(path)


def test_it_reports_bad_csv_rows_with_their_lines(tmp_path):
    GpuModelFactory()
    path = write(
        tmp_path,
        "bad.csv",
        f"""
        {CSV_HEADER}
        {CSV_SITE},oh-1,h100-sxm-80gb,8,,,32,256,1000,100,
        oh-site,,,,,,,,,,,,,,oh-2,h100-sxm-80gb,eight,,,32,256,1000,100,
        oh-site,,,,,,1.30,,,,,,,,oh-3,h100-sxm-80gb,8,,,32,256,1000,100,
        oh-site,,,,,,,,,,,,,,oh-1,h100-sxm-80gb,8,,,32,256,1000,100,
        oh-site,,,,,,,,,,,,,,oh-5,a100,8,,,32,256,1000,100,
        oh-site,,,,,,,,,,,,,,oh-6,h100-sxm-80gb,8,,,32,256,,100,
        other,Other,eu,DE,TenneT,10,1.1,air,10,eur,2,1,,,oh-7,h100-sxm-80gb,1,,,1,1,1,1,
        """,
    )

    with pytest.raises(CommandError) as failed:
        run(path)

    lines = [line.strip() for line in str(failed.value).splitlines()[1:]]
    assert lines == [
        "line 3: node 'oh-2': gpu_count must be a whole number, got 'eight'",
        "line 4: site 'oh-site': pue is 1.30 here but 1.20 on line 2",
        "line 5: node 'oh-1' appears twice in the file (first on line 2)",
        "line 6: node 'oh-5': unknown gpu model 'a100'",
        "line 7: node 'oh-6': missing required field(s) disk_gb",
        "line 8: site 'other': renewable_share must be between 0 and 1, got 2",
    ]
    assert Site.objects.count() == 0
    assert Node.objects.count() == 0


def test_a_csv_with_unknown_columns_is_refused(tmp_path):
    path = write(tmp_path, "bad.csv", "site,hostname,colour\nx,y,red\n")

    with pytest.raises(CommandError, match="line 1: unknown column\\(s\\): colour"):
        run(path)


def test_it_refuses_to_shrink_a_node(tmp_path):
    run(FIXTURES / "example_inventory.yaml")
    text = (FIXTURES / "example_inventory.yaml").read_text()
    path = tmp_path / "shrunk.yaml"
    path.write_text(
        text.replace("gpu_count: 8\n        cpu_model", "gpu_count: 4\n        cpu_model")
    )
    before = snapshot()

    with pytest.raises(CommandError) as failed:
        run(path)

    assert (
        "line 34: node 'abl-h100-001' has 8 GPUs; the file gives 4; import never removes GPUs"
        in str(failed.value)
    )
    assert snapshot() == before


def test_it_refuses_to_change_the_gpu_model_of_an_existing_node(tmp_path):
    GpuModelFactory(slug="a100-80gb", name="A100")
    NodeFactory(hostname="abl-h100-001", gpus=8)
    text = (FIXTURES / "example_inventory.yaml").read_text()
    path = tmp_path / "remodel.yaml"
    path.write_text(text.replace("gpu_model: h100-sxm-80gb", "gpu_model: a100-80gb", 1))
    before = snapshot()

    with pytest.raises(CommandError, match="import does not change an existing node's GPU model"):
        run(path)

    assert snapshot() == before


def test_it_refuses_a_serial_that_belongs_to_another_gpu(tmp_path):
    NodeFactory(hostname="elsewhere", gpus=1)  # serial elsewhere-sn0
    text = (FIXTURES / "example_inventory.yaml").read_text()
    path = tmp_path / "dup.yaml"
    path.write_text(text.replace("L40S-1A2B", "elsewhere-sn0"))

    with pytest.raises(CommandError) as failed:
        run(path)

    assert (
        "node 'abl-l40s-001': GPU serial 'elsewhere-sn0' already belongs to elsewhere gpu 0"
        in str(failed.value)
    )
    assert Site.objects.filter(slug="tx-abilene").count() == 0


def test_it_adds_no_node_to_a_retired_site(tmp_path):
    # A retired site is final, retired only once all its nodes are: a node added to it (or to
    # a site the file creates retired) would stand available at a site that never sells again.
    SiteFactory(slug="known", status=SiteStatus.RETIRED)
    GpuModelFactory()
    path = write(
        tmp_path,
        "retired.csv",
        f"""
        {CSV_HEADER}
        known,,,,,,,,,,,,,,new-node-1,h100-sxm-80gb,2,,,32,256,1000,100,
        {CSV_SITE.replace(",active", ",retired")},new-node-2,h100-sxm-80gb,2,,,32,256,1000,100,
        """,
    )
    before = snapshot()

    with pytest.raises(CommandError) as failed:
        run(path)

    assert "line 2: node 'new-node-1': site 'known' is retired; import adds no node" in str(
        failed.value
    )
    assert "line 3: node 'new-node-2': site 'oh-site' is retired" in str(failed.value)
    assert snapshot() == before


def test_the_admin_offers_no_retired_site_for_a_new_node(admin_client):
    live = SiteFactory(slug="live")
    retired = SiteFactory(slug="gone", status=SiteStatus.RETIRED)

    form = admin_client.get(reverse("admin:inventory_node_add")).context["adminform"].form

    assert live in form.fields["site"].queryset
    assert retired not in form.fields["site"].queryset
