"""A GPU's node and index, and a node's site, are physical identity: set when they are
created (the fleet import, or an add page), never edited afterwards in the admin. Jobs send
`gpu_indexes` from the GPU's index, telemetry and health match by it, and placement and
curtailment go by the node's site."""

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from inventory.models import Gpu, Node
from tests.factories import NodeFactory, SiteFactory

pytestmark = pytest.mark.django_db


def _posted(page) -> dict:
    """The change form as the browser would send it back unchanged (inlines included)."""
    data: dict = {}

    def add(form) -> None:
        for bound in form:
            value = bound.value()
            if isinstance(value, bool):
                if value:
                    data[bound.html_name] = "on"
            elif value is not None:
                data[bound.html_name] = value

    add(page.context["adminform"].form)
    for inline in page.context["inline_admin_formsets"]:
        add(inline.formset.management_form)
        for form in inline.formset.forms:
            add(form)
    return data


@pytest.fixture
def node():
    return NodeFactory(hostname="abl-001", gpus=4)


def test_a_nodes_site_cannot_be_changed_on_its_page(admin_client, node):
    elsewhere = SiteFactory(slug="elsewhere")
    url = reverse("admin:inventory_node_change", args=[node.pk])
    page = admin_client.get(url)
    assert "site" not in page.context["adminform"].form.fields
    assert "site" in page.context["adminform"].readonly_fields

    data = _posted(page)
    data["site"] = elsewhere.pk
    response = admin_client.post(url, data)

    assert response.status_code == 302, response.context["errors"] if response.context else ""
    node.refresh_from_db()
    assert node.site.slug != "elsewhere"


def test_a_gpus_index_cannot_be_changed_on_its_nodes_page_but_a_new_gpu_gets_one(
    admin_client, node
):
    url = reverse("admin:inventory_node_change", args=[node.pk])
    page = admin_client.get(url)
    data = _posted(page)
    gpus = next(i.formset for i in page.context["inline_admin_formsets"] if i.formset.model is Gpu)
    first = gpus.forms[0]
    assert first.fields["index"].disabled
    data[first["index"].html_name] = 9  # renumbered in a forged form: ignored
    # A GPU added on the page gets the index given.
    prefix = gpus.prefix
    data[f"{prefix}-TOTAL_FORMS"] = len(gpus.forms) + 1
    data[f"{prefix}-4-index"] = 4
    data[f"{prefix}-4-serial"] = "abl-001-new"
    data[f"{prefix}-4-node"] = node.pk

    response = admin_client.post(url, data)

    assert response.status_code == 302
    assert list(node.gpus.order_by("index").values_list("index", flat=True)) == [0, 1, 2, 3, 4]
    assert Gpu.objects.get(pk=first.instance.pk).index == first.instance.index
    assert Gpu.objects.get(serial="abl-001-new").index == 4


def test_a_gpus_node_and_index_cannot_be_changed_on_its_page(admin_client, node):
    other = NodeFactory(hostname="abl-002", gpus=2)
    gpu = node.gpus.get(index=3)
    url = reverse("admin:inventory_gpu_change", args=[gpu.pk])
    page = admin_client.get(url)
    form = page.context["adminform"]
    assert {"node", "index"} <= set(form.readonly_fields)
    assert not {"node", "index"} & set(form.form.fields)

    data = _posted(page)
    data.update(node=other.pk, index=0, serial="renamed-sn")
    response = admin_client.post(url, data)

    assert response.status_code == 302
    gpu.refresh_from_db()
    assert (gpu.node_id, gpu.index, gpu.serial) == (node.pk, 3, "renamed-sn")


def test_a_gpu_and_a_node_are_given_their_identity_on_the_add_pages(admin_client):
    gpu_form = admin_client.get(reverse("admin:inventory_gpu_add")).context["adminform"].form
    node_form = admin_client.get(reverse("admin:inventory_node_add")).context["adminform"].form
    assert {"node", "index"} <= set(gpu_form.fields)
    assert {"site", "gpu_model"} <= set(node_form.fields)
    assert Node.objects.count() == 0


# --- the fleet import refuses to move what exists -------------------------------------------

FIXTURES = Path(__file__).resolve().parents[2] / "inventory" / "fixtures"


def _import(path: Path) -> None:
    call_command("import_inventory", str(path), stdout=StringIO())


def _snapshot() -> list:
    return [
        sorted(Node.objects.values_list("hostname", "site__slug", "updated_at")),
        sorted(Gpu.objects.values_list("node__hostname", "index", "serial")),
    ]


def test_an_import_refuses_to_move_an_existing_node_to_another_site(tmp_path):
    _import(FIXTURES / "example_inventory.yaml")
    text = (FIXTURES / "example_inventory.yaml").read_text()
    # abl-l40s-001 listed under Baie-Comeau instead of Abilene.
    l40s = text[text.index("      - hostname: abl-l40s-001") : text.index("\n\n  - slug: qc-")]
    moved = tmp_path / "moved.yaml"
    moved.write_text(text.replace(l40s + "\n", "").rstrip("\n") + "\n" + l40s + "\n")
    before = _snapshot()

    with pytest.raises(CommandError) as failed:
        _import(moved)

    assert (
        "node 'abl-l40s-001' is at site 'tx-abilene'; import does not move an existing node "
        "to site 'qc-baie-comeau'" in str(failed.value)
    )
    assert _snapshot() == before
    assert Node.objects.get(hostname="abl-l40s-001").site.slug == "tx-abilene"


def test_an_import_refuses_to_change_an_existing_gpus_index(tmp_path):
    _import(FIXTURES / "example_inventory.yaml")
    text = (FIXTURES / "example_inventory.yaml").read_text()
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text(
        text.replace(
            "[L40S-1A2B, L40S-3C4D, L40S-5E6F, L40S-7A8B]",
            "[L40S-3C4D, L40S-1A2B, L40S-5E6F, L40S-7A8B]",
        )
    )
    before = _snapshot()

    with pytest.raises(CommandError) as failed:
        _import(swapped)

    message = str(failed.value)
    assert (
        "node 'abl-l40s-001': GPU serial 'L40S-3C4D' is its gpu 1; import does not change an "
        "existing GPU's index (to 0)" in message
    )
    assert (
        "node 'abl-l40s-001': GPU serial 'L40S-1A2B' is its gpu 0; import does not change an "
        "existing GPU's index (to 1)" in message
    )
    assert _snapshot() == before


def test_an_import_of_the_same_places_still_updates_a_node(tmp_path):
    _import(FIXTURES / "example_inventory.yaml")
    text = (FIXTURES / "example_inventory.yaml").read_text()
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(text.replace("ram_gb: 512", "ram_gb: 1024"))

    _import(bigger)

    node = Node.objects.get(hostname="abl-l40s-001")
    assert (node.site.slug, node.ram_gb) == ("tx-abilene", 1024)
