"""Files a spreadsheet or an export tool can produce that PostgreSQL or the csv module cannot
take: a NUL character in a value, a field past the csv module's size limit, a file that is
not UTF-8. Each is a problem named with its line and nothing is written, as for any bad row
(they were a DataError or a csv.Error traceback, or a byte offset instead of a line)."""

from pathlib import Path

import pytest
from django.core.management import CommandError

from inventory.models import Node
from tests.factories import GpuModelFactory, NodeFactory, SiteFactory
from tests.inventory.test_import_inventory import CSV_HEADER, CSV_SITE, run, snapshot, write

pytestmark = pytest.mark.django_db


@pytest.fixture
def existing():
    site = SiteFactory(slug="oh-site")
    GpuModelFactory()
    return NodeFactory(hostname="oh-1", site=site, gpus=2, cpu_model="EPYC 9454")


def test_a_nul_character_in_an_existing_nodes_value_is_refused_with_its_line(tmp_path, existing):
    before = snapshot()
    path = write(
        tmp_path,
        "nul.csv",
        f"""
        {CSV_HEADER}
        {CSV_SITE},oh-2,h100-sxm-80gb,8,,,32,256,1000,100,
        oh-site,,,,,,,,,,,,,,oh-1,h100-sxm-80gb,2,,EPYC\x009454,32,256,1000,100,
        """,
    )

    with pytest.raises(CommandError) as failed:
        run(path)

    assert str(failed.value).splitlines()[1:] == [
        "  line 3: node 'oh-1': cpu_model must not contain a NUL character"
    ]
    assert snapshot() == before
    assert Node.objects.get(hostname="oh-1").cpu_model == "EPYC 9454"


def test_a_nul_character_in_yaml_and_in_a_serial_is_refused(tmp_path, existing):
    before = snapshot()
    path = write(
        tmp_path,
        "nul.yaml",
        """
        sites:
          - slug: oh-site
            former_use: "bitcoin\\0mining"
            nodes:
              - hostname: oh-9
                gpu_model: h100-sxm-80gb
                gpu_serials: "S1;S\\x002"
                cpu_cores: 32
                ram_gb: 256
                disk_gb: 1000
                nic_gbps: 100
        """,
    )

    with pytest.raises(CommandError) as failed:
        run(path)

    assert str(failed.value).splitlines()[1:] == [
        "  line 3: site 'oh-site': former_use must not contain a NUL character",
        "  line 7: node 'oh-9': gpu_serials must not contain a NUL character",
    ]
    assert snapshot() == before


def test_a_csv_field_past_the_csv_modules_limit_is_refused_with_its_line(tmp_path, existing):
    before = snapshot()
    huge = "A" * 200_000
    path = write(
        tmp_path,
        "huge.csv",
        f"""
        {CSV_HEADER}
        {CSV_SITE},oh-2,h100-sxm-80gb,8,,,32,256,1000,100,
        oh-site,,,,,,,,,,,,,,oh-3,h100-sxm-80gb,8,,"{huge}",32,256,1000,100,
        """,
    )

    with pytest.raises(CommandError) as failed:
        run(path)

    assert str(failed.value).splitlines()[1:] == [
        "  line 3: not valid CSV: field larger than field limit (131072)"
    ]
    assert snapshot() == before


@pytest.mark.parametrize(
    ("encoding", "line", "byte"),
    [("latin-1", 2, "0xf6"), ("utf-16", 1, "0xff")],
)
def test_a_file_not_in_utf8_is_refused_with_the_line_of_its_first_bad_byte(
    tmp_path: Path, existing, encoding, line, byte
):
    before = snapshot()
    path = tmp_path / "legacy.csv"
    row = CSV_SITE.replace("mining", "Bitcöin") + ",oh-2,h100-sxm-80gb,8,,,32,256,1000,100,"
    path.write_bytes(f"{CSV_HEADER}\n{row}\n".encode(encoding))

    with pytest.raises(CommandError) as failed:
        run(path)

    assert str(failed.value) == (
        f"legacy.csv: line {line}: not UTF-8 (byte {byte}); save the file as UTF-8 and "
        "import it again. Nothing was written."
    )
    assert snapshot() == before
