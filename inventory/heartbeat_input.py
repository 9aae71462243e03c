"""The heartbeat's body, validated without DRF's field machinery when it is well formed.

DRF validates a heartbeat with 8 GPUs' readings field by field in about 1.7 ms of Python, a
third of what the whole request may cost at fleet scale (docs/benchmarks.md). A body from
the agent is almost always exactly well formed, so `heartbeat_fast_validate` checks that case
with plain type and range tests and builds the same validated data DRF would; anything else
(a wrong type, a value out of range or at an edge DRF would coerce, an unknown GPU, a
duplicate, an older agent's health reports) returns None and DRF validates the body, so every
error keeps its exact wording and shape. tests/inventory/test_heartbeat_input.py holds the
two to the same answers.
"""

__all__ = ["heartbeat_fast_validate"]

_READINGS = {  # float fields: (min, max)
    "temperature_c": (-40, 200),
    "power_w": (0, 5000),
    "utilization_pct": (0, 100),
}
_INTS = {  # integer fields: max (min 0)
    "memory_used_mib": 2**31 - 1,
    "sm_clock_mhz": 32767,
    "memory_clock_mhz": 32767,
    "ecc_volatile_corrected": 2**31 - 1,
    "ecc_volatile_uncorrected": 2**31 - 1,
    "ecc_aggregate_corrected": 2**31 - 1,
    "ecc_aggregate_uncorrected": 2**31 - 1,
}
_FLAGS = ("rows_remap_pending", "rows_remap_failure")


class _Unusual(Exception):
    """Not the plain well-formed case: let DRF validate (and word any error)."""


def _text(value, *, max_length: int, blank: bool, null: bool = False):
    if value is None and null:
        return None
    # Plain printable ASCII with no surrounding blanks: DRF would keep it as it is.
    if not isinstance(value, str) or len(value) > max_length or value != value.strip():
        raise _Unusual
    if not value:
        if blank:
            return ""
        raise _Unusual
    if not (value.isascii() and value.isprintable()):
        raise _Unusual
    return value


def _int(value, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _Unusual
    return value


def _gpu(item) -> dict:
    if not isinstance(item, dict):
        raise _Unusual
    out = {"index": _int(item.get("index"), 0, 255)}
    out["serial"] = _text(item.get("serial"), max_length=64, blank=True, null=True)
    readable = item.get("readable", True)
    if type(readable) is not bool:
        raise _Unusual
    out["readable"] = readable
    out["error"] = _text(item.get("error"), max_length=300, blank=True, null=True)
    for name, (low, high) in _READINGS.items():
        value = item.get(name)
        if value is not None:
            # The range first: NaN and infinities fail it, and so does an integer too large
            # for a float (math.isfinite would raise OverflowError on it).
            if type(value) not in (int, float) or not low <= value <= high:
                raise _Unusual
            value = float(value)
        out[name] = value
    for name, high in _INTS.items():
        value = item.get(name)
        out[name] = None if value is None else _int(value, 0, high)
    reasons = item.get("throttle_reasons", [])
    if not isinstance(reasons, list) or len(reasons) > 16:
        raise _Unusual
    out["throttle_reasons"] = [_text(r, max_length=60, blank=False) for r in reasons]
    for name in _FLAGS:
        value = item.get(name)
        if value is not None and type(value) is not bool:
            raise _Unusual
        out[name] = value
    events = item.get("events", [])
    if not isinstance(events, list) or len(events) > 50:
        raise _Unusual
    out["events"] = []
    for event in events:
        if not isinstance(event, dict):
            raise _Unusual
        out["events"].append(
            {
                "code": _text(event.get("code"), max_length=40, blank=False),
                "detail": _text(event.get("detail", ""), max_length=300, blank=True),
            }
        )
    return out


def heartbeat_fast_validate(data, *, gpu_indexes: set[int]) -> dict | None:
    """The validated heartbeat (as HeartbeatApi.InputSerializer would give it), or None when
    the body is not the plain well-formed case and DRF must look at it."""
    try:
        if not isinstance(data, dict) or "gpus" in data or "metrics" in data:
            raise _Unusual
        out = {}
        if "agent_version" in data:
            out["agent_version"] = _text(data["agent_version"], max_length=40, blank=False)
        if "telemetry" in data:
            report = data["telemetry"]
            if not isinstance(report, dict):
                raise _Unusual
            gpus = report.get("gpus", [])
            if not isinstance(gpus, list) or len(gpus) > 64:
                raise _Unusual
            readings = [_gpu(item) for item in gpus]
            indexes = [r["index"] for r in readings]
            if len(set(indexes)) != len(indexes) or not set(indexes) <= gpu_indexes:
                raise _Unusual
            out["telemetry"] = {
                "source": _text(report.get("source", ""), max_length=40, blank=True),
                "unreadable": _text(
                    report.get("unreadable"), max_length=500, blank=True, null=True
                ),
                "gpus": readings,
            }
        return out
    except _Unusual:
        return None
