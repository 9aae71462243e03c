"""The agent's telemetry parsers against outputs written to the real tools' formats.

Fixtures (tests/agent/fixtures/telemetry): `nvidia-smi -q -x` of an 8-GPU HGX H100 (driver
550, nvsmi v12 layout) and an 8-GPU A100 SXM4 node (driver 525, v11 layout), `amd-smi metric
--json` / `amd-smi list --json` and `rocm-smi --json` of an 8-GPU MI300X node, `dcgmi dmon`,
and kernel log excerpts (dmesg and ISO timestamps) with Xid and amdgpu RAS lines.
"""

import json
from pathlib import Path

import pytest

from agent import gpu_telemetry as t

FIXTURES = Path(__file__).parent / "fixtures" / "telemetry"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_h100_healthy_reads_every_field_of_every_gpu():
    report = t.parse_nvidia_smi_xml(fixture("nvidia_h100_healthy.xml"))
    assert report["unreadable"] is None
    assert report["driver_version"] == "550.90.07"
    assert [g["index"] for g in report["gpus"]] == list(range(8))
    busy, idle = report["gpus"][0], report["gpus"][5]
    assert busy == {
        "index": 0,
        "bus_id": "00000000:18:00.0",
        "uuid": "GPU-6f2c1e7a-3b9d-4c1e-a8f0-2d4b7c9e1a03",
        "serial": "1652923012345",
        "product": "NVIDIA H100 80GB HBM3",
        "readable": True,
        "error": None,
        "temperature_c": 61.0,
        "memory_temperature_c": 71.0,
        "power_w": 612.87,
        "power_limit_w": 700.0,
        "utilization_pct": 98.0,
        "memory_used_mib": 74211,
        "memory_total_mib": 81559,
        "sm_clock_mhz": 1980,
        "memory_clock_mhz": 2619,
        "throttle_reasons": [],
        "ecc_volatile_corrected": 0,
        "ecc_volatile_uncorrected": 0,
        "ecc_aggregate_corrected": 0,
        "ecc_aggregate_uncorrected": 0,
        "rows_remapped_corrected": 0,
        "rows_remapped_uncorrected": 0,
        "rows_remap_pending": False,
        "rows_remap_failure": False,
        "retired_pages": None,  # N/A on Hopper: row remapping replaced page retirement
        "retired_pages_pending": None,
        "events": [],
    }
    assert set(busy) == set(t.GPU_KEYS)
    # Idle is not a slowdown: an idle GPU reports no throttle reason.
    assert (idle["utilization_pct"], idle["power_w"], idle["throttle_reasons"]) == (0.0, 71.34, [])


def test_h100_uncorrectable_ecc_counts_volatile_and_aggregate_apart():
    gpus = t.parse_nvidia_smi_xml(fixture("nvidia_h100_uncorrectable_ecc.xml"))["gpus"]
    bad = gpus[3]
    assert bad["bus_id"] == "00000000:5D:00.0"
    assert (bad["ecc_volatile_corrected"], bad["ecc_volatile_uncorrected"]) == (4, 2)
    assert (bad["ecc_aggregate_corrected"], bad["ecc_aggregate_uncorrected"]) == (17, 2)
    assert (bad["rows_remapped_uncorrected"], bad["rows_remap_pending"]) == (1, True)
    assert bad["rows_remap_failure"] is False
    assert all(g["ecc_aggregate_uncorrected"] == 0 for g in gpus if g["index"] != 3)


def test_h100_fallen_off_the_bus_keeps_its_index_and_gets_its_xid():
    report = t.parse_nvidia_smi_xml(
        fixture("nvidia_h100_fallen_off_bus.xml"), fixture("nvidia_h100_fallen_off_bus.stderr")
    )
    assert report["unreadable"] is None
    lost = report["gpus"][2]
    assert (lost["index"], lost["readable"]) == (2, False)
    assert lost["error"] == "nvidia-smi: Unknown Error"
    assert lost["temperature_c"] is None
    # The GPUs after it keep nvidia-smi's numbering (PCI bus order), not shifted by one.
    assert report["gpus"][3]["bus_id"] == "00000000:5D:00.0"

    events = t.KernelEventCursor().new_events(fixture("kernel_h100_xid79.log").splitlines())
    t.attach_events(report, events)
    assert lost["events"] == [
        {"code": 79, "detail": "pid='<unknown>', name=<unknown>, GPU has fallen off the bus."}
    ]
    assert all(g["events"] == [] for g in report["gpus"] if g["index"] != 2)


def test_a_gpu_missing_without_an_explanation_makes_the_report_unreadable():
    report = t.parse_nvidia_smi_xml(fixture("nvidia_h100_fallen_off_bus.xml"), stderr="")
    assert report["gpus"] == []
    assert report["unreadable"] == "telemetry unreadable: nvidia-smi lists 7 of 8 attached GPUs"


def test_a100_thermal_throttling_names_the_reasons():
    gpu = t.parse_nvidia_smi_xml(fixture("nvidia_a100_thermal_throttle.xml"))["gpus"][5]
    assert gpu["product"] == "NVIDIA A100-SXM4-80GB"
    assert (gpu["temperature_c"], gpu["memory_temperature_c"]) == (91.0, 93.0)
    assert gpu["throttle_reasons"] == ["hw_slowdown", "hw_thermal_slowdown", "sw_thermal_slowdown"]
    assert (gpu["sm_clock_mhz"], gpu["power_w"], gpu["power_limit_w"]) == (1005, 241.07, 400.0)


def test_a100_row_remap_failure_and_pending():
    failed = t.parse_nvidia_smi_xml(fixture("nvidia_a100_row_remap_failure.xml"))["gpus"][1]
    assert failed["rows_remap_failure"] is True
    assert (failed["rows_remapped_corrected"], failed["rows_remapped_uncorrected"]) == (3, 7)
    pending = t.parse_nvidia_smi_xml(fixture("nvidia_a100_remap_pending.xml"))["gpus"][6]
    assert (pending["rows_remap_pending"], pending["rows_remap_failure"]) == (True, False)
    assert (pending["ecc_volatile_corrected"], pending["ecc_aggregate_corrected"]) == (31, 43)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Failed to initialize NVML: Driver/library version mismatch\n",
        "<nvidia_smi_log><attached_gpus>1</attached_gpus><gpu><product_name>",
        '<?xml version="1.0" ?><other/>',
        "<nvidia_smi_log><attached_gpus>0</attached_gpus></nvidia_smi_log>",
        "<nvidia_smi_log><gpu><temperature><gpu_temp>40 C</gpu_temp></temperature></gpu>"
        "</nvidia_smi_log>",
    ],
)
def test_malformed_nvidia_smi_output_is_unreadable_not_a_crash(text):
    report = t.parse_nvidia_smi_xml(text)
    assert report["gpus"] == []
    assert report["unreadable"].startswith("telemetry unreadable: ")


def test_truncated_nvidia_smi_output_is_unreadable():
    report = t.parse_nvidia_smi_xml(fixture("nvidia_h100_truncated.xml"))
    assert report["gpus"] == []
    assert report["unreadable"].startswith("telemetry unreadable: nvidia-smi output is not valid")


def test_garbage_values_are_none_not_errors():
    xml = fixture("nvidia_h100_healthy.xml").replace("612.87 W", "[Unknown Error]", 1)
    xml = xml.replace("<gpu_util>98 %</gpu_util>", "<gpu_util>N/A</gpu_util>", 1)
    gpu = t.parse_nvidia_smi_xml(xml)["gpus"][0]
    assert (gpu["power_w"], gpu["utilization_pct"], gpu["temperature_c"]) == (612.47, None, 61.0)


def test_dcgm_dmon_readings_by_gpu():
    readings = t.parse_dcgmi_dmon(fixture("dcgmi_dmon_h100.txt"))
    assert sorted(readings) == list(range(8))
    assert readings[3] == {
        "temperature_c": 62.0,
        "memory_temperature_c": 72.0,
        "power_w": 618.117,
        "utilization_pct": 99.0,
        "memory_used_mib": 74211,
        "sm_clock_mhz": 1980,
        "memory_clock_mhz": 2619,
    }
    assert t.parse_dcgmi_dmon("Error: unable to connect to host engine\n") == {}


def test_mi300x_amd_smi_healthy_with_identities():
    report = t.parse_amd_smi_json(
        fixture("amd_mi300x_healthy.json"), fixture("amd_mi300x_list.json")
    )
    assert report["unreadable"] is None
    gpu, idle = report["gpus"][0], report["gpus"][7]
    assert gpu["bus_id"] == "0000:05:00.0"
    assert (gpu["temperature_c"], gpu["memory_temperature_c"], gpu["power_w"]) == (
        78.0,
        64.0,
        712.0,
    )
    assert (gpu["utilization_pct"], gpu["memory_used_mib"], gpu["memory_total_mib"]) == (
        100.0,
        174112,
        196592,
    )
    assert (gpu["sm_clock_mhz"], gpu["memory_clock_mhz"]) == (2091, 1300)
    assert (gpu["ecc_aggregate_corrected"], gpu["ecc_aggregate_uncorrected"]) == (0, 0)
    assert gpu["throttle_reasons"] == []
    assert (idle["utilization_pct"], idle["power_w"]) == (0.0, 139.0)


def test_mi300x_uncorrectable_ecc_and_ras_events():
    report = t.parse_amd_smi_json(
        fixture("amd_mi300x_uncorrectable_ecc.json"), fixture("amd_mi300x_list.json")
    )
    events = t.KernelEventCursor().new_events(fixture("kernel_mi300x_ras.log").splitlines())
    t.attach_events(report, events)
    bad = report["gpus"][4]
    assert (bad["ecc_volatile_corrected"], bad["ecc_volatile_uncorrected"]) == (3, 1)
    assert [e["code"] for e in bad["events"]] == [
        "amd_ras_correctable",
        "amd_ras_uncorrectable",
        "amd_gpu_reset",
        "amd_gpu_reset",
    ]


def test_mi300x_thermal_throttle():
    gpu = t.parse_amd_smi_json(fixture("amd_mi300x_thermal_throttle.json"))["gpus"][2]
    assert (gpu["temperature_c"], gpu["memory_temperature_c"]) == (104.0, 96.0)
    assert gpu["throttle_reasons"] == ["hbm_thermal", "socket_thermal"]
    assert gpu["bus_id"] is None  # no `amd-smi list` given


def test_mi300x_truncated_and_malformed_are_unreadable():
    assert t.parse_amd_smi_json(fixture("amd_mi300x_truncated.json"))["unreadable"].startswith(
        "telemetry unreadable: amd-smi output is not valid JSON"
    )
    for text in ("{}", "[]", "[1, 2]", '"ok"', "null"):
        report = t.parse_amd_smi_json(text)
        assert (report["gpus"], report["unreadable"][:22]) == ([], "telemetry unreadable: ")


def test_mi300x_rocm_smi():
    report = t.parse_rocm_smi_json(fixture("rocm_smi_mi300x_healthy.json"))
    assert [g["index"] for g in report["gpus"]] == list(range(8))
    gpu = report["gpus"][7]
    assert gpu["product"] == "AMD Instinct MI300X OAM"
    assert (gpu["bus_id"], gpu["temperature_c"], gpu["power_w"]) == ("0000:e5:00.0", 41.0, 139.0)
    assert (gpu["memory_used_mib"], gpu["memory_total_mib"]) == (283, 196592)
    assert (gpu["sm_clock_mhz"], gpu["memory_clock_mhz"]) == (132, 900)
    assert gpu["ecc_aggregate_uncorrected"] is None  # rocm-smi does not say: unknown, not 0
    text = fixture("rocm_smi_mi300x_healthy.json")
    assert t.parse_rocm_smi_json(text[:700])["unreadable"].startswith("telemetry unreadable")
    assert t.parse_rocm_smi_json('{"system": {}}')["unreadable"] == (
        "telemetry unreadable: rocm-smi listed no cards"
    )


def test_kernel_cursor_reports_each_event_once():
    cursor = t.KernelEventCursor()
    log = fixture("kernel_h100_ecc.log").splitlines()
    first = cursor.new_events(log[:3])
    assert [e["code"] for e in first] == [94]
    assert first[0]["bus_id"] == "0000:5d:00"
    assert first[0]["detail"] == "pid=48211, name=python3, Contained: SM (0x1). RST: No, D-RST: No"
    # The whole log again, with one more line: only the new event.
    assert [e["code"] for e in cursor.new_events(log)] == [63]
    assert cursor.new_events(log) == []


def test_collect_uses_the_tool_on_path_and_never_raises():
    calls = []

    def run(args):
        calls.append(args[0])
        if args[0] == "nvidia-smi":
            return (
                0,
                fixture("nvidia_h100_fallen_off_bus.xml"),
                fixture("nvidia_h100_fallen_off_bus.stderr"),
            )
        if args[0] == "dmesg":
            return 0, fixture("kernel_h100_xid79.log"), ""
        raise AssertionError(args)

    def which(name):
        return "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None

    report = t.telemetry_collect(cursor=t.KernelEventCursor(), run=run, which=which)
    assert calls == ["nvidia-smi", "dmesg"]
    assert report["gpus"][2]["events"][0]["code"] == 79
    nothing = t.telemetry_collect(cursor=t.KernelEventCursor(), run=run, which=lambda n: None)
    assert nothing["unreadable"] == (
        "telemetry unreadable: no nvidia-smi, amd-smi or rocm-smi on PATH"
    )


def test_collect_survives_a_tool_that_hangs_or_vanishes(tmp_path):
    # A real subprocess: a "tool" that does not exist behaves like one removed mid-run.
    code, out, err = t._run([str(tmp_path / "nvidia-smi"), "-q", "-x"])
    assert (code, out) == (127, "")
    code, _out, err = t._run(["sleep", "5"], timeout=0.2)
    assert code == 127 and "timed out" in err


def test_readings_outside_what_switchyard_takes_are_sent_as_unknown():
    """amd-smi's JSON may hold NaN (Python's json reads it), a sensor 255 °C or 65535 W."""
    metric = json.loads(fixture("amd_mi300x_healthy.json"))
    first = metric[0] if isinstance(metric, list) else metric["gpu_data"][0]
    first["temperature"]["hotspot"] = {"value": float("nan"), "unit": "C"}
    first["temperature"]["edge"] = {"value": 255, "unit": "C"}
    first["power"]["socket_power"] = {"value": 65535, "unit": "W"}
    report = t.parse_amd_smi_json(json.dumps(metric))
    healthy = t.parse_amd_smi_json(fixture("amd_mi300x_healthy.json"))

    bounded = t.readings_bound(report)

    assert (bounded["gpus"][0]["temperature_c"], bounded["gpus"][0]["power_w"]) == (None, None)
    assert bounded["gpus"][0]["utilization_pct"] == healthy["gpus"][0]["utilization_pct"]
    assert bounded["gpus"][1:] == healthy["gpus"][1:]
    assert json.dumps(bounded, allow_nan=False)  # what the agent sends is strict JSON


def test_the_reading_bounds_are_the_ones_switchyard_takes():
    from inventory.apis import GpuTelemetrySerializer

    fields = GpuTelemetrySerializer().fields
    assert {
        name: (fields[name].min_value, fields[name].max_value) for name in t.READING_BOUNDS
    } == t.READING_BOUNDS
