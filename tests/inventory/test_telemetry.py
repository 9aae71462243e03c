"""Telemetry through the heartbeat: stored as raw samples, judged by the health rules, rolled
up per minute and forgotten on time. Readings come from the agent's parsers run on the
recorded tool outputs (tests/agent/fixtures/telemetry)."""

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from agent import gpu_telemetry as t
from config.errors import InvalidTransition, ValidationFailed
from inventory.models import (
    FleetMinute,
    Gpu,
    GpuHealth,
    GpuHealthChange,
    GpuMinute,
    GpuSample,
    HealthRules,
    Node,
    NodeStatus,
    Outage,
    OutageCause,
)
from inventory.partitions import MINUTES, partitions_ensure
from inventory.services import node_mark_offline, node_token_issue
from inventory.telemetry import (
    gpu_return_to_service,
    telemetry_flush,
    telemetry_purge,
    telemetry_record,
    telemetry_rollup,
)
from tests.agent.test_gpu_telemetry import fixture
from tests.factories import NodeFactory

pytestmark = pytest.mark.django_db
URL = "/api/v1/agent/heartbeat"


@pytest.fixture(autouse=True)
def empty_buffer():
    from inventory import telemetry

    client = telemetry._buffer()
    client.delete(telemetry.BUFFER_KEY, telemetry.CLAIMS_KEY)
    telemetry.rules_cache_clear()
    yield
    client.delete(telemetry.BUFFER_KEY, telemetry.CLAIMS_KEY)
    telemetry.rules_cache_clear()


@pytest.fixture
def node():
    return NodeFactory(gpus=8)


@pytest.fixture
def secret(node):
    return node_token_issue(node=node, label="agent")[1]


def beat(api_client, secret, telemetry):
    response = api_client.post(
        URL, {"telemetry": telemetry}, format="json", HTTP_AUTHORIZATION=f"Bearer {secret}"
    )
    telemetry_flush()
    return response


def nvidia(name: str, stderr: str = "", kernel: str | None = None) -> dict:
    report = t.parse_nvidia_smi_xml(fixture(name), fixture(stderr) if stderr else "")
    if kernel:
        t.attach_events(report, t.KernelEventCursor().new_events(fixture(kernel).splitlines()))
    return report


def health(node) -> dict[int, str]:
    return dict(Gpu.objects.filter(node=node).values_list("index", "health"))


def test_a_healthy_report_is_stored_one_sample_per_gpu(api_client, node, secret):
    response = beat(api_client, secret, nvidia("nvidia_h100_healthy.xml"))

    assert response.status_code == 200, response.json()
    assert GpuSample.objects.count() == 8
    gpu0 = Gpu.objects.get(node=node, index=0)
    sample = GpuSample.objects.get(gpu_id=gpu0.pk)
    assert (
        sample.readable,
        sample.temperature_c,
        sample.power_w,
        sample.utilization_pct,
        sample.memory_used_mib,
        sample.sm_clock_mhz,
        sample.memory_clock_mhz,
        sample.throttle_reasons,
        sample.ecc_volatile_uncorrected,
        sample.ecc_aggregate_corrected,
        sample.rows_remap_pending,
        sample.events,
    ) == (True, 61, 612.87, 98, 74211, 1980, 2619, "", 0, 0, False, "")
    assert set(health(node).values()) == {GpuHealth.OK}
    assert not Outage.objects.exists()
    node.refresh_from_db()
    assert node.telemetry_error == ""


def test_uncorrectable_ecc_fails_that_gpu_only_with_its_own_outage(api_client, node, secret):
    response = beat(
        api_client,
        secret,
        nvidia("nvidia_h100_uncorrectable_ecc.xml", kernel="kernel_h100_ecc.log"),
    )

    assert response.status_code == 200
    assert health(node) == {i: GpuHealth.FAILED if i == 3 else GpuHealth.OK for i in range(8)}
    gpu = Gpu.objects.get(node=node, index=3)
    assert gpu.health_reason == "driver event 63, 94; 2 uncorrectable ECC error(s)"
    outage = Outage.objects.get()
    assert (outage.node_id, outage.gpu_id, outage.cause, outage.ended_at) == (
        node.pk,
        gpu.pk,
        OutageCause.GPU_FAILURE,
        None,
    )
    change = GpuHealthChange.objects.get()
    assert (change.gpu_id, change.from_health, change.to_health) == (gpu.pk, "ok", "failed")
    assert change.actor_label.startswith("node agent (nt_")
    node.refresh_from_db()
    assert node.status == NodeStatus.AVAILABLE  # the other seven are still sold


def test_a_gpu_fallen_off_the_bus_fails(api_client, node, secret):
    report = nvidia(
        "nvidia_h100_fallen_off_bus.xml",
        "nvidia_h100_fallen_off_bus.stderr",
        "kernel_h100_xid79.log",
    )
    assert beat(api_client, secret, report).status_code == 200

    gpu = Gpu.objects.get(node=node, index=2)
    assert gpu.health == GpuHealth.FAILED
    assert gpu.health_reason == "unreachable (nvidia-smi: Unknown Error); driver event 79"
    sample = GpuSample.objects.get(gpu_id=gpu.pk)
    assert (sample.readable, sample.temperature_c, sample.events) == (False, None, "79")


def test_a_gpu_the_driver_stops_listing_fails_and_the_others_keep_their_readings(
    api_client, node, secret
):
    """nvidia-smi numbers GPUs in PCI bus order: with GPU 2 gone from the bus entirely, the
    GPUs after it come as indexes 2 to 6. Matched by serial, each reading lands on its GPU
    and the one left out is unreachable."""
    report = nvidia("nvidia_h100_healthy.xml")
    for gpu, reading in zip(Gpu.objects.filter(node=node).order_by("index"), report["gpus"]):
        Gpu.objects.filter(pk=gpu.pk).update(serial=reading["serial"])
    gone = report["gpus"].pop(2)
    for index, reading in enumerate(report["gpus"]):
        reading["index"] = index
    report["gpus"][2]["temperature_c"] = 71.0  # GPU 3's, now numbered 2

    assert beat(api_client, secret, report).status_code == 200

    gpus = {g.index: g for g in Gpu.objects.filter(node=node)}
    assert {i: g.health for i, g in gpus.items() if g.health != GpuHealth.OK} == {
        2: GpuHealth.FAILED
    }
    assert gpus[2].serial == gone["serial"]
    assert gpus[2].health_reason == ("unreachable (not listed by the driver (fallen off the bus?))")
    assert GpuSample.objects.get(gpu_id=gpus[3].pk).temperature_c == 71
    assert GpuSample.objects.get(gpu_id=gpus[2].pk).readable is False
    assert GpuSample.objects.count() == 8


def test_readings_whose_serials_are_not_the_nodes_are_taken_by_index(api_client, node, secret):
    report = nvidia("nvidia_h100_healthy.xml")  # serials the factory's GPUs do not have
    del report["gpus"][7]

    assert beat(api_client, secret, report).status_code == 200

    assert set(health(node).values()) == {GpuHealth.OK}
    assert GpuSample.objects.count() == 7


def test_a_row_remap_failure_fails_and_a_pending_remap_only_degrades(api_client, node, secret):
    beat(api_client, secret, nvidia("nvidia_a100_row_remap_failure.xml"))
    beat(api_client, secret, nvidia("nvidia_a100_remap_pending.xml"))

    gpus = {g.index: g for g in Gpu.objects.filter(node=node)}
    assert gpus[1].health == GpuHealth.FAILED
    assert gpus[1].health_reason == "1 uncorrectable ECC error(s); row remapping failure"
    # The pending report shows GPU 1 healthy again: failed is sticky until staff return it.
    assert gpus[6].health == GpuHealth.DEGRADED
    assert gpus[6].health_reason == (
        "row remap pending (needs a reset); 31 corrected ECC errors since the last reset"
    )
    assert Outage.objects.filter(gpu=gpus[6]).count() == 0
    assert [g for g, h in health(node).items() if h != GpuHealth.OK] == [1, 6]


def test_degraded_comes_and_goes_with_the_readings(api_client, node, secret):
    beat(api_client, secret, nvidia("nvidia_a100_remap_pending.xml"))
    beat(api_client, secret, nvidia("nvidia_a100_healthy.xml"))
    gpu = Gpu.objects.get(node=node, index=6)
    assert (gpu.health, gpu.health_reason) == (GpuHealth.OK, "")
    assert list(GpuHealthChange.objects.filter(gpu=gpu).values_list("to_health", flat=True)) == [
        "ok",
        "degraded",
    ]  # newest first


def _at(minute: int, second: int = 0) -> datetime:
    return datetime(2026, 12, 6, 10, minute, second, tzinfo=UTC)


def test_over_temperature_fails_only_after_the_configured_minutes(node):
    rules = HealthRules.current()
    rules.over_temp_minutes = 5
    rules.save()
    hot = nvidia("nvidia_a100_thermal_throttle.xml")
    cool = nvidia("nvidia_a100_healthy.xml")

    def record(report, at):
        gpus = {g.index: g for g in Gpu.objects.filter(node=node)}
        telemetry_record(node=node, report=report, gpus=gpus, now=at, actor_label="test")
        return Gpu.objects.get(node=node, index=5)

    assert record(hot, _at(0)).over_temp_since == _at(0)
    assert record(hot, _at(4, 59)).health == GpuHealth.OK
    cooled = record(cool, _at(5, 30))  # a cool reading resets the clock
    assert (cooled.health, cooled.over_temp_since) == (GpuHealth.OK, None)
    assert record(hot, _at(6)).health == GpuHealth.OK
    failed = record(hot, _at(11))
    assert failed.health == GpuHealth.FAILED
    assert failed.health_reason == (
        "over temperature (91 °C, hw_thermal_slowdown, sw_thermal_slowdown) since 10:06:00 UTC"
    )
    assert Outage.objects.get(gpu=failed).started_at == _at(11)


def test_the_rules_are_configurable(api_client, node, secret):
    rules = HealthRules.current()
    rules.failing_events = "48,94"
    rules.fail_on_unreachable = False
    rules.save()
    report = nvidia(
        "nvidia_h100_fallen_off_bus.xml",
        "nvidia_h100_fallen_off_bus.stderr",
        "kernel_h100_xid79.log",
    )
    beat(api_client, secret, report)
    assert set(health(node).values()) == {GpuHealth.OK}


def test_mi300x_uncorrectable_error_fails_the_gpu(api_client, node, secret):
    report = t.parse_amd_smi_json(
        fixture("amd_mi300x_uncorrectable_ecc.json"), fixture("amd_mi300x_list.json")
    )
    t.attach_events(
        report, t.KernelEventCursor().new_events(fixture("kernel_mi300x_ras.log").splitlines())
    )
    assert beat(api_client, secret, report).status_code == 200
    gpu = Gpu.objects.get(node=node, index=4)
    assert gpu.health_reason == "driver event amd_ras_uncorrectable; 1 uncorrectable ECC error(s)"
    sample = GpuSample.objects.get(gpu_id=gpu.pk)
    assert (sample.temperature_c, sample.power_w, sample.memory_used_mib) == (78, 712.0, 174112)


def test_unreadable_telemetry_is_recorded_and_changes_no_gpu(api_client, node, secret):
    report = t.parse_nvidia_smi_xml(fixture("nvidia_h100_truncated.xml"))
    response = beat(api_client, secret, report)

    assert response.status_code == 200
    node.refresh_from_db()
    assert node.telemetry_error.startswith("telemetry unreadable: nvidia-smi output is not valid")
    assert GpuSample.objects.count() == 0
    assert set(health(node).values()) == {GpuHealth.OK}
    beat(api_client, secret, nvidia("nvidia_h100_healthy.xml"))
    node.refresh_from_db()
    assert node.telemetry_error == ""


@pytest.mark.parametrize(
    "mutate, field, code",
    [
        (lambda g: g.update(index=9), "telemetry.gpus.0.index", "unknown_gpu"),
        (lambda g: g.update(temperature_c="hot"), "telemetry.gpus.0.temperature_c", "invalid"),
        (lambda g: g.update(utilization_pct=101), "telemetry.gpus.0.utilization_pct", "max_value"),
        (lambda g: g.update(sm_clock_mhz=40000), "telemetry.gpus.0.sm_clock_mhz", "max_value"),
        (
            lambda g: g.update(events=[{"detail": "x"}]),
            "telemetry.gpus.0.events.0.code",
            "required",
        ),
        (
            lambda g: g.update(ecc_volatile_uncorrected=-1),
            "telemetry.gpus.0.ecc_volatile_uncorrected",
            "min_value",
        ),
    ],
)
def test_bad_telemetry_gets_400_and_writes_nothing(api_client, node, secret, mutate, field, code):
    report = nvidia("nvidia_h100_uncorrectable_ecc.xml")
    report["gpus"] = [report["gpus"][3]]
    mutate(report["gpus"][0])
    response = beat(api_client, secret, report)

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["field"], error["code"]) == (field, code)
    assert GpuSample.objects.count() == 0
    assert set(health(node).values()) == {GpuHealth.OK}
    assert Node.objects.get(pk=node.pk).last_heartbeat_at is None


def test_a_gpu_reported_twice_is_refused(api_client, node, secret):
    report = nvidia("nvidia_h100_healthy.xml")
    report["gpus"][1]["index"] = 0
    response = beat(api_client, secret, report)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "telemetry.gpus.1.index"
    assert GpuSample.objects.count() == 0


def test_staff_return_a_failed_gpu_with_a_reason(api_client, node, secret, admin_user):
    beat(api_client, secret, nvidia("nvidia_h100_uncorrectable_ecc.xml"))
    gpu = Gpu.objects.get(node=node, index=3)
    with pytest.raises(ValidationFailed):
        gpu_return_to_service(gpu=gpu, actor=admin_user, reason=" ")
    assert Gpu.objects.get(pk=gpu.pk).health == GpuHealth.FAILED

    returned = gpu_return_to_service(gpu=gpu, actor=admin_user, reason="GPU replaced, RMA 4411")

    assert (returned.health, returned.health_reason) == (GpuHealth.OK, "")
    assert Outage.objects.get(gpu=gpu).ended_at is not None
    change = GpuHealthChange.objects.filter(gpu=gpu).first()
    assert (change.to_health, change.reason, change.actor_label) == (
        "ok",
        "GPU replaced, RMA 4411",
        admin_user.get_username(),
    )
    with pytest.raises(InvalidTransition):
        gpu_return_to_service(gpu=gpu, actor=admin_user, reason="again")


def test_a_gpu_outage_and_a_node_outage_can_be_open_together(api_client, node, secret):
    beat(api_client, secret, nvidia("nvidia_h100_uncorrectable_ecc.xml"))
    Node.objects.filter(pk=node.pk).update(last_heartbeat_at=timezone.now() - timedelta(hours=1))
    node.refresh_from_db()
    node_mark_offline(node=node, reason="No heartbeat for 3600 s.")

    causes = sorted(Outage.objects.filter(ended_at=None).values_list("cause", "gpu__index"))
    assert causes == [(OutageCause.GPU_FAILURE, 3), (OutageCause.HEARTBEAT_MISSED, None)]


def test_rollup_per_minute_is_exact_and_idempotent(node):
    gpus = {g.index: g for g in Gpu.objects.filter(node=node)}
    report = nvidia("nvidia_h100_healthy.xml")
    for second in (0, 30):
        telemetry_record(node=node, report=report, gpus=gpus, now=_at(1, second), actor_label="t")
    report["gpus"][0]["temperature_c"] = 66.0
    report["gpus"][0]["power_w"] = 400.0
    telemetry_record(node=node, report=report, gpus=gpus, now=_at(2, 10), actor_label="t")
    telemetry_record(node=node, report=report, gpus=gpus, now=_at(3, 0), actor_label="t")

    assert telemetry_flush() == 32
    written = telemetry_rollup(now=_at(3, 5))
    assert written == 16  # minutes 10:01 and 10:02 of 8 GPUs; 10:03 is not complete
    assert telemetry_rollup(now=_at(3, 5)) == 16
    rows = list(
        GpuMinute.objects.filter(gpu_id=gpus[0].pk)
        .order_by("minute")
        .values_list("minute", "samples", "temperature_c_max", "power_w_avg", "utilization_pct_avg")
    )
    assert rows == [(_at(1), 2, 61, 612.87, 98.0), (_at(2), 1, 66, 400.0, 98.0)]
    assert GpuMinute.objects.count() == 16
    # The fleet's minute is the sum of its GPUs' minutes, written by the same run.
    fleet = list(
        FleetMinute.objects.values_list(
            "minute", "gpus", "utilization_gpus", "utilization_pct_sum", "power_w_sum"
        )
    )
    expected = []
    for minute in (_at(1), _at(2)):
        rows = GpuMinute.objects.filter(minute=minute)
        util = [r.utilization_pct_avg for r in rows if r.utilization_pct_avg is not None]
        power = [r.power_w_avg for r in rows if r.power_w_avg is not None]
        expected.append((minute, 8, len(util), pytest.approx(sum(util)), pytest.approx(sum(power))))
    assert fleet == expected
    assert fleet[1][4] == pytest.approx(fleet[0][4] - 612.87 + 400.0)  # GPU 0 drew less


def test_retention_drops_old_raw_samples_and_old_minutes(node, settings):
    settings.TELEMETRY_RAW_RETENTION = timedelta(hours=6)
    settings.TELEMETRY_ROLLUP_RETENTION = timedelta(days=30)
    gpus = {g.index: g for g in Gpu.objects.filter(node=node)}
    report = nvidia("nvidia_h100_healthy.xml")
    now = _at(0)
    for at in (now - timedelta(hours=7), now - timedelta(hours=5)):
        telemetry_record(node=node, report=report, gpus=gpus, now=at, actor_label="t")
    telemetry_flush()
    minutes = [now - timedelta(days=d) for d in (31, 29)]
    partitions_ensure(MINUTES, minutes[0], now)  # the rollup makes its own; this writes by hand
    GpuMinute.objects.bulk_create(
        GpuMinute(gpu_id=gpus[0].pk, minute=m, samples=2) for m in minutes
    )

    FleetMinute.objects.bulk_create(
        FleetMinute(
            minute=now - timedelta(days=d),
            gpus=1,
            utilization_gpus=1,
            utilization_pct_sum=50,
            power_w_sum=300,
        )
        for d in (31, 29)
    )

    purged = telemetry_purge(now=now)

    # Whole partitions go: the hour of 03:00 (past 6 h at 10:00), the day of 5 November.
    assert "inventory_gpusample_p2026120603" in purged["inventory_gpusample"]["dropped"]
    assert "inventory_gpusample_p2026120605" not in purged["inventory_gpusample"]["dropped"]
    assert purged["inventory_gpuminute"]["dropped"][-1] == "inventory_gpuminute_p20261105"
    assert purged["inventory_fleetminute"] == {"deleted": 1}
    assert list(FleetMinute.objects.values_list("minute", flat=True)) == [now - timedelta(days=29)]
    assert set(GpuSample.objects.values_list("at", flat=True)) == {now - timedelta(hours=5)}
    assert list(GpuMinute.objects.values_list("minute", flat=True)) == [now - timedelta(days=29)]
    assert telemetry_purge(now=now) == {
        "inventory_gpusample": {"created": [], "dropped": []},
        "inventory_gpuminute": {"created": [], "dropped": []},
        "inventory_fleetminute": {"deleted": 0},
    }


def test_samples_wait_in_the_buffer_until_flushed_in_one_copy(api_client, node, secret):
    from inventory import telemetry

    api_client.post(
        URL,
        {"telemetry": nvidia("nvidia_h100_healthy.xml")},
        format="json",
        HTTP_AUTHORIZATION=f"Bearer {secret}",
    )
    assert GpuSample.objects.count() == 0
    assert telemetry._buffer().llen(telemetry.BUFFER_KEY) == 1
    assert telemetry_flush() == 8
    assert telemetry_flush() == 0
    assert GpuSample.objects.count() == 8


def test_without_redis_the_heartbeat_writes_its_own_samples(api_client, node, secret, monkeypatch):
    import redis

    from inventory import telemetry

    class Down:
        def rpush(self, *args):
            raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(telemetry, "_buffer", lambda: Down())
    response = api_client.post(
        URL,
        {"telemetry": nvidia("nvidia_h100_uncorrectable_ecc.xml")},
        format="json",
        HTTP_AUTHORIZATION=f"Bearer {secret}",
    )
    assert response.status_code == 200
    assert GpuSample.objects.count() == 8
    assert health(node)[3] == GpuHealth.FAILED


def test_a_flush_that_dies_after_taking_a_batch_loses_none_of_it(monkeypatch):
    """Killed (out of memory, a hard time limit) between taking samples from the buffer and
    committing them: the next flush, once the claim is old enough, writes them."""
    from inventory import telemetry

    node = NodeFactory(gpus=1)
    gpu = node.gpus.get()
    at = timezone.now().replace(microsecond=0)
    rows = telemetry.telemetry_rows(
        report={"gpus": [{"index": 0, "temperature_c": 50, "power_w": 300.0}]},
        gpus={0: gpu},
        now=at,
    )
    telemetry.samples_enqueue(rows)

    class Killed(BaseException):  # not an Exception: nothing in the flush catches it
        pass

    def die(rows):
        raise Killed

    monkeypatch.setattr(telemetry, "samples_copy", die)
    with pytest.raises(Killed):
        telemetry_flush()
    monkeypatch.undo()

    client = telemetry._buffer()
    assert client.llen(telemetry.BUFFER_KEY) == 0 and client.zcard(telemetry.CLAIMS_KEY) == 1
    assert telemetry_flush() == 0  # the claim is fresh: its flush may still be running
    monkeypatch.setattr(telemetry, "RECLAIM_AFTER", 0)
    assert telemetry_flush() == 1
    assert GpuSample.objects.filter(gpu=gpu).count() == 1
    assert client.zcard(telemetry.CLAIMS_KEY) == 0
