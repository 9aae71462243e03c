from io import StringIO
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management import call_command

from inventory.models import Gpu, GpuModel, Node, NodeStatus, Site, StatusChange
from marketplace.management.commands import seed_demo
from marketplace.models import ApiKey, Membership, Organization, Role

MODELS = (Site, GpuModel, Node, Gpu, StatusChange, Organization, Membership)


def _counts() -> dict[str, int]:
    counts = {model.__name__: model.objects.count() for model in MODELS}
    counts["User"] = get_user_model().objects.count()
    return counts


def test_it_seeds_a_realistic_inventory(db):
    call_command("seed_demo", stdout=StringIO())

    assert Site.objects.count() == 6
    assert Site.objects.values("grid_operator").distinct().count() == 6
    assert GpuModel.objects.count() == 6
    assert Node.objects.count() == 62
    assert Gpu.objects.count() == 416
    # Every GPU model is on at least one node, and every node has its GPUs.
    assert not GpuModel.objects.filter(nodes__isnull=True).exists()
    assert not Node.objects.filter(gpus__isnull=True).exists()
    assert Node.objects.filter(status=NodeStatus.MAINTENANCE).count() == 6
    assert Node.objects.filter(status=NodeStatus.DRAINING).count() == 2
    assert StatusChange.objects.filter(node__isnull=False, actor_label="seed_demo").count() == 8
    assert all(1 <= site.pue <= 1.3 for site in Site.objects.all())


def test_with_debug_on_it_creates_the_demo_accounts(db, settings):
    settings.DEBUG = True  # the demo logins are made for `make run` (DEBUG) only
    call_command("seed_demo", stdout=StringIO())

    user_model = get_user_model()
    admin = user_model.objects.get(username="admin")
    assert (admin.is_staff, admin.is_superuser) == (True, True)
    assert admin.check_password("switchyard-admin")
    demo = user_model.objects.get(username="demo")
    assert (demo.is_staff, demo.is_superuser) == (False, False)
    assert demo.check_password("switchyard-demo")
    membership = Membership.objects.get(user=demo)
    assert membership.organization.name == "Demo AI Lab"
    assert membership.role == Role.OWNER


def test_running_it_twice_changes_no_counts(db):
    call_command("seed_demo", stdout=StringIO())
    first = _counts()
    serials = set(Gpu.objects.values_list("serial", flat=True))

    call_command("seed_demo", stdout=StringIO())

    assert _counts() == first
    assert set(Gpu.objects.values_list("serial", flat=True)) == serials


def test_it_keeps_a_node_status_staff_changed(db):
    call_command("seed_demo", stdout=StringIO())
    Node.objects.filter(hostname="pcs-h100-001").update(status=NodeStatus.MAINTENANCE)

    call_command("seed_demo", stdout=StringIO())

    assert Node.objects.get(hostname="pcs-h100-001").status == NodeStatus.MAINTENANCE


def test_with_debug_on_it_creates_the_printed_demo_api_key(db, api_client, settings):
    settings.DEBUG = True  # the published demo API key is made for `make run` (DEBUG) only
    call_command("seed_demo", stdout=StringIO())

    response = api_client.get(
        "/api/v1/organization", HTTP_AUTHORIZATION=f"Bearer {seed_demo.DEMO_API_KEY}"
    )

    assert response.status_code == 200
    assert response.json()["name"] == "Demo AI Lab"
    # make run prints the same key.
    run_script = Path(seed_demo.__file__).resolve().parents[3] / "scripts" / "run.py"
    assert f'DEMO_API_KEY = "{seed_demo.DEMO_API_KEY}"' in run_script.read_text()


def test_with_debug_off_it_creates_no_api_key(db, settings):
    settings.DEBUG = False
    call_command("seed_demo", stdout=StringIO())

    assert ApiKey.objects.count() == 0


def test_with_debug_off_it_creates_no_login_with_a_published_password(db, settings, client):
    settings.DEBUG = False
    out = StringIO()
    call_command("seed_demo", stdout=out)

    assert not get_user_model().objects.filter(username__in=["admin", "demo"]).exists()
    assert ApiKey.objects.count() == 0
    assert "switchyard-admin" not in out.getvalue()
    assert "DEBUG is off: no demo logins and no API key were created" in out.getvalue()
    assert not client.login(username="admin", password="switchyard-admin")
    # The organisation exists (make seed credits it), with nobody in it.
    assert Organization.objects.get(slug="demo-ai-lab").memberships.count() == 0


def test_demo_logins_with_debug_off_get_random_passwords_printed_once(db, settings):
    settings.DEBUG = False
    out = StringIO()
    call_command("seed_demo", "--demo-logins", stdout=out)

    printed = dict(
        line.removeprefix("Demo login ").split(" (shown once")[0].split(" / ")
        for line in out.getvalue().splitlines()
        if "(shown once" in line
    )
    assert set(printed) == {"admin", "demo"}
    users = {u.username: u for u in get_user_model().objects.filter(username__in=printed)}
    for username, password in printed.items():
        assert len(password) >= 20
        assert users[username].check_password(password)
    assert not users["admin"].check_password("switchyard-admin")
    assert not users["demo"].check_password("switchyard-demo")
    assert printed["admin"] != printed["demo"]
    assert ApiKey.objects.count() == 0

    again = StringIO()
    call_command("seed_demo", "--demo-logins", stdout=again)
    assert "(shown once" not in again.getvalue()
    assert "Demo login admin exists; its password is unchanged." in again.getvalue()
    assert get_user_model().objects.get(username="admin").check_password(printed["admin"])
