"""The heartbeat's fast validation gives exactly what DRF's serializer gives, or steps aside:
for every recorded tool output and thousands of mutations of them, either the fast path
returns None (DRF then validates and words the error) or its result equals DRF's."""

import copy
import math
import random
from pathlib import Path

import pytest

from agent import gpu_telemetry as t
from inventory.apis import HeartbeatApi
from inventory.heartbeat_input import heartbeat_fast_validate

FIXTURES = Path(__file__).resolve().parent.parent / "agent" / "fixtures" / "telemetry"
INDEXES = set(range(8))


def reports() -> list[dict]:
    out = []
    for path in sorted(FIXTURES.glob("*.xml")):
        out.append(t.parse_nvidia_smi_xml(path.read_text()))
    listing = (FIXTURES / "amd_mi300x_list.json").read_text()
    for name in ("healthy", "thermal_throttle", "uncorrectable_ecc"):
        out.append(
            t.parse_amd_smi_json((FIXTURES / f"amd_mi300x_{name}.json").read_text(), listing)
        )
    out.append(t.parse_rocm_smi_json((FIXTURES / "rocm_smi_mi300x_healthy.json").read_text()))
    return [r for r in out if r.get("gpus")]


def drf(data: dict):
    serializer = HeartbeatApi.InputSerializer(data=data, context={"gpu_indexes": INDEXES})
    return serializer.validated_data if serializer.is_valid() else None


def as_plain(value):
    """DRF's OrderedDicts and ReturnLists as plain dicts and lists, for comparison."""
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_plain(v) for v in value]
    return value


def test_every_recorded_report_takes_the_fast_path_with_drf_s_result():
    bodies = [{"agent_version": "2.0", "telemetry": r} for r in reports()]
    assert len(bodies) >= 4
    for body in bodies:
        fast = heartbeat_fast_validate(body, gpu_indexes=INDEXES)
        assert fast is not None
        assert fast == as_plain(drf(body))
    assert heartbeat_fast_validate({}, gpu_indexes=INDEXES) == as_plain(drf({})) == {}


ODD_VALUES = [
    None, True, False, 0, -1, 1, 255, 256, 2**31, -40, 200.5, 5000.1, 100, 100.0001, 0.5,
    math.nan, math.inf, "", " ", " 61 ", "61", "x" * 61, "x" * 301, "ok", "a\x00b", "é", [],
    {}, [1], {"code": "79"}, 1e308, -0.0,
]  # fmt: skip


def mutations(body: dict, rng: random.Random):
    """The body with one value somewhere replaced, removed or added."""
    for _ in range(60):
        mutated = copy.deepcopy(body)
        parent, key = None, None
        node = mutated
        while isinstance(node, dict | list) and len(node) and (key is None or rng.random() < 0.7):
            parent = node
            key = rng.choice(list(node) if isinstance(node, dict) else range(len(node)))
            node = parent[key]
        if parent is None:
            continue
        action = rng.random()
        if action < 0.75:
            parent[key] = rng.choice(ODD_VALUES)
        elif isinstance(parent, dict) and action < 0.9:
            del parent[key]
        elif isinstance(parent, dict):
            extra = rng.choice(["gpus", "metrics", "extra", "index", "events", "readable"])
            parent[extra] = rng.choice(ODD_VALUES)
        yield mutated


@pytest.mark.parametrize("seed", range(6))
def test_mutated_bodies_get_drf_s_answer_or_go_to_drf(seed):
    rng = random.Random(seed)
    fast_taken = 0
    for report in reports():
        body = {"agent_version": "2.0", "telemetry": report}
        for mutated in mutations(body, rng):
            fast = heartbeat_fast_validate(mutated, gpu_indexes=INDEXES)
            if fast is None:
                continue
            fast_taken += 1
            expected = drf(mutated)
            assert expected is not None, mutated
            assert fast == as_plain(expected), mutated
    assert fast_taken > 0  # some mutations (an ignored key, a value in range) stay fast


def test_bodies_drf_refuses_never_pass_the_fast_path():
    body = {"agent_version": "2.0", "telemetry": reports()[0]}
    refused = []
    for change in (
        lambda b: b["telemetry"]["gpus"][0].update(index=9),  # not on this node
        lambda b: b["telemetry"]["gpus"][1].update(index=0),  # twice
        lambda b: b["telemetry"]["gpus"][0].update(utilization_pct=101),
        lambda b: b["telemetry"]["gpus"][0].update(temperature_c="hot"),
        lambda b: b["telemetry"]["gpus"][0].update(events=[{"detail": "no code"}]),
        lambda b: b.update(agent_version=""),
        lambda b: b.update(gpus=[{"index": 0, "health": "failed"}]),
    ):
        mutated = copy.deepcopy(body)
        change(mutated)
        refused.append(heartbeat_fast_validate(mutated, gpu_indexes=INDEXES))
    assert refused == [None] * len(refused)
