"""GPU telemetry for the site agent: reads what the vendor tools report, standard library only.

Sources, per vendor:

- NVIDIA: `nvidia-smi -q -x` (XML, driver 470 to 550 layouts) and, when DCGM is installed,
  `dcgmi dmon -c 1 -e 150,155,203,252` merged over it (DCGM's readings win where both exist).
- AMD: `amd-smi metric --json` (ROCm 6), or `rocm-smi --json` on older installs (no ECC there).
- Driver error events from the kernel log: NVIDIA Xid lines (`NVRM: Xid (PCI:…): 79, …`) and
  amdgpu RAS / reset lines, mapped to a GPU by its PCI address.

Every parser returns plain dicts ready for JSON, one per GPU, with the same keys whatever the
vendor (`GPU_KEYS`; a value the tool does not report is None). Nothing here raises on bad
input: output that cannot be read becomes a report whose `unreadable` says why ("telemetry
unreadable"), and a GPU the tool could not reach (fallen off the bus) is listed with
`readable: false` and the tool's message, so the server can act on it.

Requires Python 3.9 or later.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "GPU_KEYS",
    "XID_CRITICAL",
    "parse_nvidia_smi_xml",
    "parse_dcgmi_dmon",
    "parse_rocm_smi_json",
    "parse_amd_smi_json",
    "parse_kernel_log",
    "KernelEventCursor",
    "READING_BOUNDS",
    "readings_bound",
    "telemetry_collect",
]

# The keys of every GPU entry, in the order the server documents them.
GPU_KEYS = (
    "index",
    "bus_id",
    "uuid",
    "serial",
    "product",
    "readable",
    "error",
    "temperature_c",
    "memory_temperature_c",
    "power_w",
    "power_limit_w",
    "utilization_pct",
    "memory_used_mib",
    "memory_total_mib",
    "sm_clock_mhz",
    "memory_clock_mhz",
    "throttle_reasons",
    "ecc_volatile_corrected",
    "ecc_volatile_uncorrected",
    "ecc_aggregate_corrected",
    "ecc_aggregate_uncorrected",
    "rows_remapped_corrected",
    "rows_remapped_uncorrected",
    "rows_remap_pending",
    "rows_remap_failure",
    "retired_pages",
    "retired_pages_pending",
    "events",
)

# What Switchyard takes for each reading (the server's GpuTelemetrySerializer, inventory/apis.py;
# tests/agent/test_gpu_telemetry.py holds the two equal). A tool's reading outside them (a
# sensor's 255 °C or 65535 W, NaN from amd-smi's JSON, a negative count) is no measurement:
# it is sent as None (unknown), since one such value refuses the whole heartbeat.
READING_BOUNDS: dict[str, tuple[float, float]] = {
    "temperature_c": (-40, 200),
    "power_w": (0, 5000),
    "utilization_pct": (0, 100),
    "memory_used_mib": (0, 2**31 - 1),
    "sm_clock_mhz": (0, 32767),
    "memory_clock_mhz": (0, 32767),
    "ecc_volatile_corrected": (0, 2**31 - 1),
    "ecc_volatile_uncorrected": (0, 2**31 - 1),
    "ecc_aggregate_corrected": (0, 2**31 - 1),
    "ecc_aggregate_uncorrected": (0, 2**31 - 1),
}

# Xid codes that mean the hardware is at fault (NVIDIA's Xid catalogue): double-bit ECC (48),
# row remapping event / failure (63, 64), NVLink (74), fallen off the bus (79), contained and
# uncontained ECC (94, 95). The server's rule set decides what they do; this is the default.
XID_CRITICAL = (48, 63, 64, 74, 79, 94, 95)

_MISSING = {
    "",
    "n/a",
    "[n/a]",
    "not supported",
    "[not supported]",
    "unknown error",
    "[unknown error]",
    "none",
}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _blank(index: int) -> dict[str, Any]:
    gpu: dict[str, Any] = dict.fromkeys(GPU_KEYS)
    gpu.update(index=index, readable=True, throttle_reasons=[], events=[])
    return gpu


def _number(text: str | None) -> float | None:
    """'71.34 W' → 71.34; 'N/A', '[Unknown Error]' or garbage → None."""
    if text is None:
        return None
    text = text.strip()
    if text.lower() in _MISSING or text.lower().startswith("[unknown"):
        return None
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


def _int(text: str | None) -> int | None:
    value = _number(text)
    return None if value is None else int(round(value))


def _yes(text: str | None) -> bool | None:
    if text is None or text.strip().lower() in _MISSING:
        return None
    return text.strip().lower() in {"yes", "true", "active", "1"}


def _bus_key(bus_id: str) -> tuple[int, int, int] | None:
    """'00000000:3B:00.0', '0000:3b:00' or '0000:3b:00.0' → (domain, bus, device)."""
    match = re.search(r"([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})", bus_id or "")
    if not match:
        return None
    return tuple(int(part, 16) for part in match.groups())  # type: ignore[return-value]


def _unreadable(source: str, why: str) -> dict[str, Any]:
    return {"source": source, "gpus": [], "unreadable": f"telemetry unreadable: {why}"}


# --- NVIDIA: nvidia-smi -q -x ---------------------------------------------------------------

_LOST_GPU = re.compile(
    r"Unable to determine the device handle for (?:GPU\s*)?([0-9a-fA-F:.]+):\s*(.+)", re.I
)


def _text(node: ET.Element, path: str) -> str | None:
    found = node.find(path)
    return None if found is None or found.text is None else found.text.strip()


def _first(node: ET.Element, *paths: str) -> str | None:
    for path in paths:
        value = _text(node, path)
        if value is not None and value.lower() not in _MISSING:
            return value
    return None


def _ecc_sum(node: ET.Element, section: str, kind: str) -> int | None:
    """Sum of a section's counters of one kind across SRAM and DRAM (Ampere and later), or
    of the pre-Ampere single/double-bit totals. None when ECC is off or not reported."""
    block = node.find(f"ecc_errors/{section}")
    if block is None:
        return None
    total, seen = 0, False
    for child in block:
        tag = child.tag
        if tag.startswith(("single_bit", "double_bit")):
            is_uncorrected = tag.startswith("double_bit")
            child = child.find("total") if child.find("total") is not None else child
        elif tag.endswith("correctable") or "_uncorrectable_" in tag:
            is_uncorrected = "uncorrectable" in tag
        else:
            continue  # e.g. sram_threshold_exceeded
        if is_uncorrected == (kind == "uncorrected"):
            value = _int(child.text)
            if value is not None:
                total, seen = total + value, True
    return total if seen else None


def _throttle_reasons(node: ET.Element) -> list[str]:
    block = node.find("clocks_event_reasons")
    if block is None:
        block = node.find("clocks_throttle_reasons")
    if block is None:
        return []
    reasons = []
    for child in block:
        if _yes(child.text):
            name = re.sub(r"^clocks_(?:event|throttle)_reason_", "", child.tag)
            if name != "gpu_idle":  # idle is not a slowdown
                reasons.append(name)
    return reasons


def _nvidia_gpu(node: ET.Element, index: int) -> dict[str, Any]:
    gpu = _blank(index)
    gpu.update(
        bus_id=node.get("id") or _text(node, "pci/pci_bus_id"),
        uuid=_text(node, "uuid"),
        serial=_first(node, "serial"),
        product=_text(node, "product_name"),
        temperature_c=_number(_text(node, "temperature/gpu_temp")),
        memory_temperature_c=_number(_text(node, "temperature/memory_temp")),
        power_w=_number(
            _first(
                node,
                "gpu_power_readings/instant_power_draw",
                "gpu_power_readings/power_draw",
                "gpu_power_readings/average_power_draw",
                "power_readings/power_draw",
            )
        ),
        power_limit_w=_number(
            _first(
                node,
                "gpu_power_readings/current_power_limit",
                "gpu_power_readings/power_limit",
                "power_readings/power_limit",
            )
        ),
        utilization_pct=_number(_text(node, "utilization/gpu_util")),
        memory_used_mib=_int(_text(node, "fb_memory_usage/used")),
        memory_total_mib=_int(_text(node, "fb_memory_usage/total")),
        sm_clock_mhz=_int(_text(node, "clocks/sm_clock")),
        memory_clock_mhz=_int(_text(node, "clocks/mem_clock")),
        throttle_reasons=_throttle_reasons(node),
        ecc_volatile_corrected=_ecc_sum(node, "volatile", "corrected"),
        ecc_volatile_uncorrected=_ecc_sum(node, "volatile", "uncorrected"),
        ecc_aggregate_corrected=_ecc_sum(node, "aggregate", "corrected"),
        ecc_aggregate_uncorrected=_ecc_sum(node, "aggregate", "uncorrected"),
        rows_remapped_corrected=_int(_text(node, "remapped_rows/remapped_row_corr")),
        rows_remapped_uncorrected=_int(_text(node, "remapped_rows/remapped_row_unc")),
        rows_remap_pending=_yes(_text(node, "remapped_rows/remapped_row_pending")),
        rows_remap_failure=_yes(_text(node, "remapped_rows/remapped_row_failure")),
    )
    single = _int(_text(node, "retired_pages/multiple_single_bit_retirement/retired_count"))
    double = _int(_text(node, "retired_pages/double_bit_retirement/retired_count"))
    if single is not None or double is not None:
        gpu["retired_pages"] = (single or 0) + (double or 0)
    gpu["retired_pages_pending"] = _yes(_text(node, "retired_pages/pending_retirement"))
    if _text(node, "product_name") is None and gpu["temperature_c"] is None:
        gpu.update(readable=False, error="nvidia-smi reported no readings for this GPU")
    return gpu


def parse_nvidia_smi_xml(xml_text: str, stderr: str = "") -> dict[str, Any]:
    """Parse `nvidia-smi -q -x`. GPUs are indexed in PCI bus order, as nvidia-smi numbers them;
    a GPU named in stderr as unreachable (fallen off the bus) keeps its place, unreadable."""
    source = "nvidia-smi"
    lost = {}
    for line in (stderr or "").splitlines():
        match = _LOST_GPU.search(line)
        if match and _bus_key(match.group(1)) is not None:
            lost[_bus_key(match.group(1))] = (match.group(1), match.group(2).strip())
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        if lost:  # every GPU lost: nvidia-smi printed nothing usable
            root = ET.Element("nvidia_smi_log")
        else:
            return _unreadable(source, f"nvidia-smi output is not valid XML ({exc})")
    if root.tag != "nvidia_smi_log":
        return _unreadable(source, f"unexpected root element <{root.tag}>")
    entries: list[tuple[tuple[int, int, int], Any]] = []
    for node in root.findall("gpu"):
        key = _bus_key(node.get("id") or _text(node, "pci/pci_bus_id") or "")
        if key is None:
            return _unreadable(source, "a <gpu> element has no PCI bus id")
        entries.append((key, node))
    present = {key for key, _ in entries}
    for key, (bus_id, message) in lost.items():
        if key not in present:
            entries.append((key, (bus_id, message)))
    attached = _int(_text(root, "attached_gpus"))
    if attached is not None and attached > len(entries):
        why = f"nvidia-smi lists {len(entries)} of {attached} attached GPUs"
        return _unreadable(source, why)
    gpus = []
    for index, (_key, entry) in enumerate(sorted(entries, key=lambda item: item[0])):
        if isinstance(entry, tuple):
            gpu = _blank(index)
            gpu.update(bus_id=entry[0], readable=False, error=f"nvidia-smi: {entry[1]}")
        else:
            gpu = _nvidia_gpu(entry, index)
        gpus.append(gpu)
    if not gpus:
        return _unreadable(source, "nvidia-smi listed no GPUs")
    return {
        "source": source,
        "driver_version": _text(root, "driver_version"),
        "gpus": gpus,
        "unreadable": None,
    }


# --- NVIDIA: DCGM --------------------------------------------------------------------------

# dcgmi dmon column names → our keys (field ids 150, 155, 203, 252, 251, 100, 101).
_DCGM_COLUMNS = {
    "GTMP": "temperature_c",
    "MMTMP": "memory_temperature_c",
    "POWER": "power_w",
    "GPUTL": "utilization_pct",
    "FBUSD": "memory_used_mib",
    "SMCLK": "sm_clock_mhz",
    "MMCLK": "memory_clock_mhz",
}


_INTEGER_KEYS = {"memory_used_mib", "sm_clock_mhz", "memory_clock_mhz"}


def parse_dcgmi_dmon(text: str) -> dict[int, dict[str, float]]:
    """`dcgmi dmon -c 1 -e …` → {gpu index: {key: value}}; columns it does not know are
    skipped, lines it cannot read are ignored (DCGM only refines nvidia-smi's readings)."""
    columns: list[str] = []
    readings: dict[int, dict[str, float]] = {}
    for line in (text or "").splitlines():
        words = line.split()
        if not words:
            continue
        if words[0].startswith("#"):
            names = [w for w in (words[0].lstrip("#"), *words[1:]) if w]
            columns = names[1:] if names and names[0].lower() == "entity" else names
            continue
        if len(words) >= 2 and words[0] == "GPU" and words[1].isdigit() and columns:
            values = words[2:]
            reading = {}
            # Rows may be shorter than the header (a field DCGM could not read): zip stops.
            for name, raw in zip(columns, values):  # noqa: B905 (strict= needs Python 3.10)
                key = _DCGM_COLUMNS.get(name)
                value = _number(raw)
                if key and value is not None:
                    reading[key] = int(value) if key in _INTEGER_KEYS else value
            readings[int(words[1])] = reading
    return readings


# --- AMD -----------------------------------------------------------------------------------


def _amd_value(block: Any, *keys: str) -> float | None:
    """amd-smi gives {"value": 40, "unit": "C"} (ROCm 6.1+) or a bare number or "N/A"."""
    for key in keys:
        item = block.get(key) if isinstance(block, dict) else None
        if isinstance(item, dict):
            item = item.get("value")
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            return float(item)
        if isinstance(item, str):
            number = _number(item)
            if number is not None:
                return number
    return None


def _mib(value: float | None, unit: str) -> int | None:
    if value is None:
        return None
    factor = {"B": 1 / 1048576, "KB": 1 / 1024, "MB": 1, "MIB": 1, "GB": 1024, "GIB": 1024}
    return int(round(value * factor.get(unit.upper(), 1)))


def parse_amd_smi_json(text: str, list_text: str = "") -> dict[str, Any]:
    """Parse `amd-smi metric --json` (a list of GPUs, or {"gpu_data": [...]} in ROCm 6.3+);
    `amd-smi list --json`, when given, adds each GPU's PCI address and UUID."""
    source = "amd-smi"
    try:
        data = json.loads(text)
    except (ValueError, TypeError) as exc:
        return _unreadable(source, f"amd-smi output is not valid JSON ({exc})")
    if isinstance(data, dict) and isinstance(data.get("gpu_data"), list):
        data = data["gpu_data"]
    if not isinstance(data, list) or not data or not all(isinstance(g, dict) for g in data):
        return _unreadable(source, "amd-smi output is not a list of GPUs")
    identities = {}
    try:
        listed = json.loads(list_text) if list_text else []
    except ValueError:
        listed = []  # identities are a nicety; the readings still stand
    for item in listed if isinstance(listed, list) else []:
        if isinstance(item, dict) and isinstance(item.get("gpu"), int):
            identities[item["gpu"]] = item
    gpus = []
    for position, entry in enumerate(data):
        index = entry.get("gpu", position)
        if not isinstance(index, int):
            return _unreadable(source, f"GPU entry {position} has no index")
        gpu = _blank(index)
        usage, power = entry.get("usage") or {}, entry.get("power") or {}
        temperature, clock = entry.get("temperature") or {}, entry.get("clock") or {}
        memory, ecc = entry.get("mem_usage") or {}, entry.get("ecc") or {}
        throttle = entry.get("throttle") or {}
        vram_unit = "MB"
        if isinstance(memory.get("total_vram"), dict):
            vram_unit = memory["total_vram"].get("unit") or "MB"
        gpu.update(
            bus_id=identities.get(index, {}).get("bdf"),
            uuid=identities.get(index, {}).get("uuid"),
            temperature_c=_amd_value(temperature, "hotspot", "edge"),
            memory_temperature_c=_amd_value(temperature, "mem"),
            power_w=_amd_value(power, "socket_power", "average_socket_power"),
            power_limit_w=_amd_value(power, "power_limit", "socket_power_limit"),
            utilization_pct=_amd_value(usage, "gfx_activity"),
            memory_used_mib=_mib(_amd_value(memory, "used_vram"), vram_unit),
            memory_total_mib=_mib(_amd_value(memory, "total_vram"), vram_unit),
            sm_clock_mhz=_int_or_none(_amd_value(clock.get("gfx_0") or {}, "clk")),
            memory_clock_mhz=_int_or_none(_amd_value(clock.get("mem_0") or {}, "clk")),
            ecc_volatile_corrected=_int_or_none(_amd_value(ecc, "total_correctable_count")),
            ecc_volatile_uncorrected=_int_or_none(_amd_value(ecc, "total_uncorrectable_count")),
        )
        # amd-smi's counters persist across reboots in the RAS EEPROM: they are aggregates too.
        gpu["ecc_aggregate_corrected"] = gpu["ecc_volatile_corrected"]
        gpu["ecc_aggregate_uncorrected"] = gpu["ecc_volatile_uncorrected"]
        # ROCm 6.2+: "<cause>_violation_status": "ACTIVE" | "NOT ACTIVE" per cause.
        for name, status in sorted(throttle.items()):
            if isinstance(status, dict):
                status = status.get("value")
            if name.endswith("_violation_status") and str(status).strip().upper() == "ACTIVE":
                gpu["throttle_reasons"].append(name.removesuffix("_violation_status"))
        if not gpu["throttle_reasons"] and str(power.get("throttle_status")).upper() == "THROTTLED":
            gpu["throttle_reasons"].append("throttled")  # ROCm 6.0/6.1: no cause given
        if all(gpu[k] is None for k in ("temperature_c", "power_w", "utilization_pct")):
            gpu.update(readable=False, error="amd-smi reported no readings for this GPU")
        gpus.append(gpu)
    return {"source": source, "gpus": sorted(gpus, key=lambda g: g["index"]), "unreadable": None}


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(round(value))


def parse_rocm_smi_json(text: str) -> dict[str, Any]:
    """Parse `rocm-smi --showtemp --showpower --showuse --showmeminfo vram --showclocks
    --showbus --json` ({"card0": {...}, ...}; values are strings). No ECC counts here: use
    amd-smi where it is installed."""
    source = "rocm-smi"
    try:
        data = json.loads(text)
    except (ValueError, TypeError) as exc:
        return _unreadable(source, f"rocm-smi output is not valid JSON ({exc})")
    if not isinstance(data, dict):
        return _unreadable(source, "rocm-smi output is not an object of cards")
    cards = sorted(
        (int(name[4:]), value)
        for name, value in data.items()
        if re.fullmatch(r"card\d+", name) and isinstance(value, dict)
    )
    if not cards:
        return _unreadable(source, "rocm-smi listed no cards")
    gpus = []
    for index, card in cards:
        gpu = _blank(index)

        def field(*names: str, card=card) -> str | None:
            for name in names:
                if name in card:
                    return str(card[name])
            return None

        used = _number(field("VRAM Total Used Memory (B)"))
        total = _number(field("VRAM Total Memory (B)"))
        gpu.update(
            bus_id=field("PCI Bus"),
            serial=field("Serial Number"),
            product=field("Card Series", "Card series", "Card Model"),
            temperature_c=_number(
                field("Temperature (Sensor junction) (C)", "Temperature (Sensor edge) (C)")
            ),
            memory_temperature_c=_number(field("Temperature (Sensor memory) (C)")),
            power_w=_number(
                field(
                    "Current Socket Graphics Package Power (W)",
                    "Average Graphics Package Power (W)",
                )
            ),
            power_limit_w=_number(field("Max Graphics Package Power (W)")),
            utilization_pct=_number(field("GPU use (%)")),
            memory_used_mib=_mib(used, "B"),
            memory_total_mib=_mib(total, "B"),
            sm_clock_mhz=_int(field("sclk clock speed:")),
            memory_clock_mhz=_int(field("mclk clock speed:")),
        )
        if all(gpu[k] is None for k in ("temperature_c", "power_w", "utilization_pct")):
            gpu.update(readable=False, error="rocm-smi reported no readings for this card")
        gpus.append(gpu)
    return {"source": source, "gpus": gpus, "unreadable": None}


# --- Kernel log: Xid and amdgpu events -------------------------------------------------------

_XID = re.compile(r"NVRM: Xid \(PCI:(?P<bus>[0-9a-fA-F:.]+)\): (?P<code>\d+),\s*(?P<detail>.*)$")
_AMDGPU = re.compile(
    r"amdgpu (?P<bus>[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.\d): (?P<msg>.*)$"
)
_AMD_EVENTS = (
    (
        re.compile(r"uncorrectable hardware error|uncorrectable .*error", re.I),
        "amd_ras_uncorrectable",
    ),
    (re.compile(r"correctable hardware error", re.I), "amd_ras_correctable"),
    (re.compile(r"GPU reset begin|GPU reset\(\d+\) succeeded", re.I), "amd_gpu_reset"),
    (re.compile(r"ring \S+ timeout", re.I), "amd_ring_timeout"),
)
# dmesg: "[ 8412.123456] …"; dmesg --time-format iso / journalctl -o short-iso: an ISO time first.
_MONOTONIC = re.compile(r"^\[\s*(\d+\.\d+)\]")
_ISO = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[.,]?\d*(?:[+-]\d{2}:?\d{2}|Z)?)")


def _stamp(line: str) -> str | None:
    match = _MONOTONIC.search(line) or _ISO.search(line)
    return match.group(1) if match else None


def parse_kernel_log(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Driver error events in kernel log lines, oldest first: {bus_id, code, detail, stamp}.

    NVIDIA codes are Xid numbers (int); amdgpu events get a name (`amd_ras_uncorrectable`, …).
    Lines that are not driver errors are ignored, as are lines too mangled to read.
    """
    events = []
    for raw in lines:
        line = raw.rstrip("\n")
        match = _XID.search(line)
        if match:
            events.append(
                {
                    "bus_id": match.group("bus"),
                    "code": int(match.group("code")),
                    "detail": match.group("detail").strip()[:300],
                    "stamp": _stamp(line),
                }
            )
            continue
        match = _AMDGPU.search(line)
        if match:
            for pattern, code in _AMD_EVENTS:
                if pattern.search(match.group("msg")):
                    events.append(
                        {
                            "bus_id": match.group("bus"),
                            "code": code,
                            "detail": match.group("msg").strip()[:300],
                            "stamp": _stamp(line),
                        }
                    )
                    break
    return events


def _stamp_order(stamp: str | None) -> tuple[int, Any]:
    if stamp is None:
        return (0, "")
    try:
        return (1, float(stamp))
    except ValueError:
        return (2, stamp)


class KernelEventCursor:
    """Remembers the last kernel log event reported, so each report carries only new ones.

    Stamps are compared as dmesg's seconds since boot or as ISO times; a line without a stamp
    is new only if it was not in the previous read (the log can be re-read whole each time).
    """

    def __init__(self) -> None:
        self.last: tuple[int, Any] | None = None
        self.unstamped_seen: set[str] = set()

    def new_events(self, lines: Iterable[str]) -> list[dict[str, Any]]:
        events = parse_kernel_log(lines)
        fresh, unstamped = [], set()
        for event in events:
            order = _stamp_order(event["stamp"])
            if event["stamp"] is None:
                key = f"{event['bus_id']}|{event['code']}|{event['detail']}"
                unstamped.add(key)
                if key not in self.unstamped_seen:
                    fresh.append(event)
            elif self.last is None or order > self.last:
                fresh.append(event)
        stamped = [_stamp_order(e["stamp"]) for e in events if e["stamp"] is not None]
        if stamped:
            self.last = max([*stamped, *([self.last] if self.last else [])])
        self.unstamped_seen = unstamped
        return fresh


def attach_events(report: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    """Put each event on the GPU with its PCI address; events for unknown GPUs are kept on the
    report (`unmatched_events`) rather than lost."""
    by_bus = {_bus_key(g["bus_id"] or ""): g for g in report.get("gpus", [])}
    unmatched = []
    for event in events:
        gpu = by_bus.get(_bus_key(event["bus_id"]))
        entry = {"code": event["code"], "detail": event["detail"]}
        if gpu is None:
            unmatched.append({**entry, "bus_id": event["bus_id"]})
        else:
            gpu["events"].append(entry)
    if unmatched:
        report["unmatched_events"] = unmatched
    return report


# --- Collection (what the agent calls) -------------------------------------------------------


def readings_bound(report: dict[str, Any]) -> dict[str, Any]:
    """The report with every reading outside READING_BOUNDS (or not a finite number) as None."""
    for gpu in report.get("gpus") or []:
        for key, (low, high) in READING_BOUNDS.items():
            value = gpu.get(key)
            # The range test fails NaN too; a bool is not a reading.
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not low <= value <= high
            ):
                gpu[key] = None
    return report


Runner = Callable[[list], "tuple[int, str, str]"]


def _run(args: list, timeout: float = 20.0) -> tuple[int, str, str]:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return done.returncode, done.stdout, done.stderr


def telemetry_collect(
    *,
    cursor: KernelEventCursor,
    run: Runner = _run,
    which: Callable[[str], str | None] = shutil.which,
) -> dict[str, Any]:
    """One telemetry report for this node: the vendor tool found on PATH, DCGM if present, and
    kernel log events since the last call. Never raises; a node with no GPU tool says so."""
    report: dict[str, Any]
    if which("nvidia-smi"):
        code, out, err = run(["nvidia-smi", "-q", "-x"])
        report = parse_nvidia_smi_xml(out, err)
        if which("dcgmi") and not report["unreadable"]:
            code, out, _err = run(["dcgmi", "dmon", "-c", "1", "-e", "150,155,203,252,100,101"])
            if code == 0:
                for index, reading in parse_dcgmi_dmon(out).items():
                    for gpu in report["gpus"]:
                        if gpu["index"] == index and gpu["readable"]:
                            gpu.update(reading)
                report["source"] = "nvidia-smi+dcgm"
    elif which("amd-smi"):
        code, out, err = run(["amd-smi", "metric", "--json"])
        _code, listed, _err = run(["amd-smi", "list", "--json"])
        report = parse_amd_smi_json(out, listed) if code == 0 else _unreadable("amd-smi", err)
    elif which("rocm-smi"):
        args = ["rocm-smi", "--showtemp", "--showpower", "--showuse", "--showmeminfo", "vram"]
        code, out, err = run([*args, "--showclocks", "--showbus", "--json"])
        report = parse_rocm_smi_json(out) if code == 0 else _unreadable("rocm-smi", err.strip())
    else:
        return _unreadable("none", "no nvidia-smi, amd-smi or rocm-smi on PATH")
    code, out, _err = run(["dmesg", "--time-format", "iso"])
    if code == 0:
        attach_events(report, cursor.new_events(out.splitlines()))
    report["read_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return readings_bound(report)
