"""GPU telemetry: store what agents report, turn it into GPU health, roll it up, forget it.

- Ingest (`telemetry_record`, inside the heartbeat's transaction, the node row locked): the
  health rules applied to each GPU, the GPUs whose state changed updated in one statement, and
  the node's samples appended to a Redis list in one command. `telemetry_flush` (beat, every
  few seconds) drains that list into inventory_gpusample with one COPY per few thousand rows:
  a heartbeat costs the database no write for its samples, and the database gets them in the
  batches it writes fastest (bench/bench_telemetry.py). If Redis cannot take them, the
  heartbeat COPYs its own samples instead; a sample is lost only if Redis loses its list.
- Health (`gpu_health_evaluate`, a pure function of one reading, the rules and when the GPU
  began running hot): failed or degraded with the reason, or ok. Failed is sticky: a GPU that
  failed stays failed until staff return it (`gpu_return_to_service`); degraded comes and
  goes with the readings. A GPU that fails gets its own outage (Outage.gpu), not its node's.
- Rollup (`telemetry_rollup`, every minute): per GPU and minute, the count of samples, the
  hottest reading, mean power and utilisation, most memory used; recomputed for the last
  ROLLUP_LOOKBACK, so a late or repeated run gives the same rows.
- Retention (`telemetry_purge`, hourly): the tables are partitioned by time (hourly raw
  samples, daily minute rows; inventory.partitions): partitions past TELEMETRY_RAW_RETENTION
  and TELEMETRY_ROLLUP_RETENTION are dropped, the next day's created.
"""

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import connection, transaction
from django.utils import timezone

from config.celery import task_send
from config.errors import InvalidTransition, ValidationFailed
from config.retention import delete_in_batches
from inventory.models import (
    FleetMinute,
    Gpu,
    GpuHealth,
    GpuHealthChange,
    GpuMinute,
    GpuSample,
    HealthRules,
    Node,
    Outage,
    OutageCause,
)
from inventory.partitions import MINUTES, RAW, partitions_ensure, telemetry_partitions_maintain

__all__ = [
    "SAMPLE_COLUMNS",
    "HealthVerdict",
    "gpu_health_evaluate",
    "gpu_health_apply",
    "gpu_return_to_service",
    "gpu_mark_failed",
    "telemetry_record",
    "telemetry_rows",
    "telemetry_matched",
    "telemetry_changes_state",
    "telemetry_flush",
    "samples_enqueue",
    "telemetry_rollup",
    "telemetry_purge",
]

logger = logging.getLogger(__name__)
ROLLUP_LOOKBACK = timedelta(minutes=10)
BUFFER_KEY = "switchyard:telemetry:samples"
FLUSH_BATCH = 500  # heartbeats (of up to 64 samples each) per COPY
RULES_CACHE_SECONDS = 10.0
SAMPLE_COLUMNS = (
    "at",
    "gpu_id",
    "readable",
    "temperature_c",
    "power_w",
    "utilization_pct",
    "memory_used_mib",
    "sm_clock_mhz",
    "memory_clock_mhz",
    "throttle_reasons",
    "ecc_volatile_corrected",
    "ecc_volatile_uncorrected",
    "ecc_aggregate_corrected",
    "ecc_aggregate_uncorrected",
    "rows_remap_pending",
    "rows_remap_failure",
    "events",
)
_COPY_SQL = f"COPY {GpuSample._meta.db_table} ({', '.join(SAMPLE_COLUMNS)}) FROM STDIN"


@dataclass(frozen=True)
class HealthVerdict:
    health: str
    reason: str
    over_temp_since: datetime | None


def _round(value):
    return None if value is None else int(round(value))


def gpu_health_evaluate(
    reading: dict, *, rules: HealthRules, over_temp_since: datetime | None, now: datetime
) -> HealthVerdict:
    """The health one reading earns under `rules` (no database access)."""
    failed: list[str] = []
    if not reading.get("readable", True) and rules.fail_on_unreachable:
        failed.append(f"unreachable ({reading.get('error') or 'no readings'})")
    codes = rules.failing_event_codes()
    bad_events = sorted({str(e["code"]) for e in reading.get("events", [])} & codes)
    if bad_events:
        failed.append(f"driver event {', '.join(bad_events)}")
    if rules.fail_on_uncorrectable_ecc and (reading.get("ecc_volatile_uncorrected") or 0) > 0:
        failed.append(f"{reading['ecc_volatile_uncorrected']} uncorrectable ECC error(s)")
    if rules.fail_on_row_remap_failure and reading.get("rows_remap_failure"):
        failed.append("row remapping failure")
    temperature = reading.get("temperature_c")
    thermal = [r for r in reading.get("throttle_reasons", []) if "thermal" in r]
    hot = (temperature is not None and temperature >= rules.over_temp_c) or bool(thermal)
    since = (over_temp_since or now) if hot else None
    if hot and now - since >= timedelta(minutes=rules.over_temp_minutes):
        what = f"{temperature:g} °C" if temperature is not None else "temperature"
        slowdown = f", {', '.join(thermal)}" if thermal else ""
        failed.append(f"over temperature ({what}{slowdown}) since {since:%H:%M:%S} UTC")
    if failed:
        return HealthVerdict(GpuHealth.FAILED, "; ".join(failed), since)
    degraded = []
    if rules.degrade_on_pending_remap and reading.get("rows_remap_pending"):
        degraded.append("row remap pending (needs a reset)")
    corrected = reading.get("ecc_volatile_corrected") or 0
    if rules.degraded_corrected_errors and corrected >= rules.degraded_corrected_errors:
        degraded.append(f"{corrected} corrected ECC errors since the last reset")
    if degraded:
        return HealthVerdict(GpuHealth.DEGRADED, "; ".join(degraded), since)
    return HealthVerdict(GpuHealth.OK, "", since)


def gpu_health_apply(
    *, gpu: Gpu, health: str, reason: str, actor_label: str, now: datetime, save: bool = True
) -> bool:
    """Move a GPU (row locked by the caller) to `health`; returns whether it changed.

    Failed is sticky: only gpu_return_to_service brings a failed GPU back. Failing opens an
    outage for this GPU alone (unless one is open) from `now`.
    """
    if gpu.health == health or gpu.health == GpuHealth.FAILED:
        return False
    GpuHealthChange.objects.create(
        gpu=gpu, from_health=gpu.health, to_health=health, actor_label=actor_label, reason=reason
    )
    gpu.health, gpu.health_reason = health, reason
    if health == GpuHealth.FAILED and not Outage.objects.filter(gpu=gpu, ended_at=None).exists():
        Outage.objects.create(
            node_id=gpu.node_id,
            gpu=gpu,
            started_at=now,
            cause=OutageCause.GPU_FAILURE,
            detail=f"GPU {gpu.index}: {reason}"[:2000],
        )
    if save:
        gpu.save(update_fields=["health", "health_reason"])
    if health == GpuHealth.FAILED:
        _after_gpu_failure(gpu.pk)
    return True


def _after_gpu_failure(gpu_id: int) -> None:
    """Ask the marketplace to move or end the work on the GPU, once this commits. The periodic
    sweep (marketplace.tasks.gpu_failures_handle) finds it anyway if the broker is down."""
    transaction.on_commit(
        lambda: task_send(
            "marketplace.tasks.gpu_failures_handle",
            [],
            about=f"failed GPU {gpu_id}",
            then="the 30 s sweep will handle it",
        )
    )


@transaction.atomic
def gpu_return_to_service(
    *, gpu: Gpu, actor: AbstractBaseUser | None, reason: str, actor_label: str | None = None
) -> Gpu:
    """Staff return a failed or degraded GPU to sale, with a reason; its outage ends now."""
    if not reason or not reason.strip():
        raise ValidationFailed("Returning a GPU to service needs a reason.", field="reason")
    locked = Gpu.objects.select_for_update().get(pk=gpu.pk)
    if locked.health == GpuHealth.OK:
        raise InvalidTransition(f"GPU {locked} is already ok.", field="health")
    now = timezone.now()
    GpuHealthChange.objects.create(
        gpu=locked,
        from_health=locked.health,
        to_health=GpuHealth.OK,
        actor_label=actor_label or (actor.get_username() if actor else "staff"),
        reason=reason.strip(),
    )
    locked.health, locked.health_reason, locked.over_temp_since = GpuHealth.OK, "", None
    locked.save(update_fields=["health", "health_reason", "over_temp_since"])
    Outage.objects.filter(gpu=locked, ended_at=None, started_at__lt=now).update(ended_at=now)
    return locked


_rules_cache: tuple[float, HealthRules] | None = None


def _rules() -> HealthRules:
    """The rule set, read at most every RULES_CACHE_SECONDS per process (an admin edit takes
    effect within that); the heartbeat path saves a query."""
    global _rules_cache
    now = time.monotonic()
    if _rules_cache is None or now - _rules_cache[0] > RULES_CACHE_SECONDS:
        _rules_cache = (now, HealthRules.current())
    return _rules_cache[1]


def rules_cache_clear() -> None:
    global _rules_cache
    _rules_cache = None


@transaction.atomic
def gpu_mark_failed(
    *, gpu: Gpu, actor: AbstractBaseUser | None, reason: str, actor_label: str | None = None
) -> Gpu:
    """Staff take a GPU out of sale by hand (a fault the rules did not see)."""
    if not reason or not reason.strip():
        raise ValidationFailed("Marking a GPU failed needs a reason.", field="reason")
    locked = Gpu.objects.select_for_update().get(pk=gpu.pk)
    if locked.health == GpuHealth.FAILED:
        raise InvalidTransition(f"GPU {locked} is already failed.", field="health")
    gpu_health_apply(
        gpu=locked,
        health=GpuHealth.FAILED,
        reason=f"marked failed by staff: {reason.strip()}",
        actor_label=actor_label or (actor.get_username() if actor else "staff"),
        now=timezone.now(),
    )
    return locked


def _sample_row(gpu_id: int, reading: dict, at: datetime) -> tuple:
    return (
        at,
        gpu_id,
        reading.get("readable", True),
        _round(reading.get("temperature_c")),
        reading.get("power_w"),
        _round(reading.get("utilization_pct")),
        reading.get("memory_used_mib"),
        reading.get("sm_clock_mhz"),
        reading.get("memory_clock_mhz"),
        ",".join(reading.get("throttle_reasons", []))[:200],
        reading.get("ecc_volatile_corrected"),
        reading.get("ecc_volatile_uncorrected"),
        reading.get("ecc_aggregate_corrected"),
        reading.get("ecc_aggregate_uncorrected"),
        reading.get("rows_remap_pending"),
        reading.get("rows_remap_failure"),
        ",".join(str(e["code"]) for e in reading.get("events", []))[:200],
    )


_redis = None


def buffer_client():
    """The Redis client of the telemetry and heartbeat buffers (REDIS_URL, 1 s timeouts)."""
    return _buffer()


def _buffer():
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=1.0, socket_connect_timeout=1.0
        )
    return _redis


def samples_encode(rows: list[tuple]) -> bytes:
    return json.dumps([[row[0].isoformat(), *row[1:]] for row in rows]).encode()


def samples_enqueue(rows: list[tuple]) -> bool:
    """Append one heartbeat's samples to the buffer; False (and COPY now) if Redis fails."""
    try:
        _buffer().rpush(BUFFER_KEY, samples_encode(rows))
        return True
    except (redis.RedisError, OSError) as exc:
        logger.warning("telemetry buffer unavailable (%s); writing %d samples now", exc, len(rows))
        samples_copy(rows)
        return False


# A flush claims a batch by moving it, in one step, from the buffer to a list of its own
# (registered with the time it was claimed), and drops that list once the COPY committed. A
# flush that died in between (killed, out of memory, a hard time limit) leaves its list: the
# next flush puts it back at the buffer's head after RECLAIM_AFTER, so no sample is lost (one
# that died after its commit and before the drop writes its batch twice: rare, and harmless
# to the per-minute averages, where a loss would leave a gap).
CLAIMS_KEY = "switchyard:telemetry:claims"
RECLAIM_AFTER = 120  # seconds: far longer than a batch's COPY takes
_CLAIM_LUA = """
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #items == 0 then return items end
redis.call('LTRIM', KEYS[1], #items, -1)
redis.call('RPUSH', KEYS[2], unpack(items))
redis.call('ZADD', KEYS[3], ARGV[2], KEYS[2])
return items
"""
_RECLAIM_LUA = """
local items = redis.call('LRANGE', KEYS[2], 0, -1)
if #items > 0 then
  for i = #items, 1, -1 do redis.call('LPUSH', KEYS[1], items[i]) end
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], KEYS[2])
return #items
"""


def telemetry_flush(*, max_batches: int = 200) -> int:
    """Drain the buffer into inventory_gpusample, FLUSH_BATCH heartbeats per COPY; returns the
    rows written. A batch whose COPY fails, or whose flush died, goes back to the buffer's
    head (CLAIMS_KEY above)."""
    written = 0
    client = _buffer()
    claim_batch, reclaim = client.register_script(_CLAIM_LUA), client.register_script(_RECLAIM_LUA)
    now = time.time()
    for stale in client.zrangebyscore(CLAIMS_KEY, "-inf", now - RECLAIM_AFTER):
        reclaim(keys=[BUFFER_KEY, stale, CLAIMS_KEY])
    for _ in range(max_batches):
        claimed = f"switchyard:telemetry:flushing:{uuid.uuid4().hex}"
        items = claim_batch(keys=[BUFFER_KEY, claimed, CLAIMS_KEY], args=[FLUSH_BATCH, now])
        if not items:
            break
        try:
            rows = [row for item in items for row in json.loads(item)]
            with transaction.atomic():
                samples_copy(rows)
        except Exception:
            reclaim(keys=[BUFFER_KEY, claimed, CLAIMS_KEY])
            raise
        client.pipeline().delete(claimed).zrem(CLAIMS_KEY, claimed).execute()
        written += len(rows)
    return written


def samples_copy(rows: list[tuple]) -> None:
    """Write sample rows (SAMPLE_COLUMNS order) with one COPY, into their hours' partitions
    (created first if the partition job has not yet)."""
    if not rows:
        return
    # Rows from the buffer carry their time as ISO text (UTC, one format, so text order is
    # time order); rows made here carry datetimes.
    first, last = min(row[0] for row in rows), max(row[0] for row in rows)
    if isinstance(first, str):
        first, last = datetime.fromisoformat(first), datetime.fromisoformat(last)
    partitions_ensure(RAW, first, last + RAW.step)
    with connection.cursor() as cursor, cursor.copy(_COPY_SQL) as copy:
        for row in rows:
            copy.write_row(row)


# What a GPU the driver no longer lists reads as: unreachable (fail_on_unreachable).
_NOT_LISTED = "not listed by the driver (fallen off the bus?)"


def telemetry_matched(*, report: dict, gpus: dict[int, Gpu]) -> dict:
    """The report with each reading on the GPU its serial number names, when every reading
    names one of this node's GPUs, each once; else as the tool numbered them.

    nvidia-smi numbers GPUs by their order on the PCI bus, so when one drops off the bus
    entirely, every GPU after it moves down one index and its readings would be judged as its
    neighbour's. Matched by serial, a GPU a readable report leaves out is read as unreachable:
    the health rules fail it (docs/health.md), as for one the tool lists but cannot reach."""
    readings = report.get("gpus") or []
    by_serial = {gpu.serial: index for index, gpu in gpus.items() if gpu.serial}
    serials = [reading.get("serial") for reading in readings]
    if (
        not readings
        or len(set(serials)) != len(serials)
        or not all(serial in by_serial for serial in serials)
    ):
        return report
    matched = [{**reading, "index": by_serial[reading["serial"]]} for reading in readings]
    if not report.get("unreadable"):
        listed = {reading["index"] for reading in matched}
        matched += [
            {"index": index, "serial": gpus[index].serial, "readable": False, "error": _NOT_LISTED}
            for index in sorted(set(gpus) - listed)
        ]
    return {**report, "gpus": matched}


def telemetry_rows(*, report: dict, gpus: dict[int, Gpu], now: datetime) -> list[tuple]:
    """The report's sample rows (SAMPLE_COLUMNS order), for the buffer or a COPY."""
    return [_sample_row(gpus[r["index"]].pk, r, now) for r in report.get("gpus") or []]


def telemetry_changes_state(
    *, node: Node, report: dict, gpus: dict[int, Gpu], now: datetime
) -> bool:
    """Whether storing this report changes more than samples: the node's unreadable reason, a
    GPU's health or the start of its over-temperature run. Read without locks from rows as
    loaded; a True sends the heartbeat down the locked path, which judges again under lock."""
    if (report.get("unreadable") or "")[:300] != node.telemetry_error:
        return True
    rules = _rules()
    for reading in report.get("gpus") or []:
        gpu = gpus[reading["index"]]
        verdict = gpu_health_evaluate(
            reading, rules=rules, over_temp_since=gpu.over_temp_since, now=now
        )
        if verdict.over_temp_since != gpu.over_temp_since:
            return True
        if verdict.health != gpu.health and gpu.health != GpuHealth.FAILED:
            return True
    return False


def telemetry_record(
    *,
    node: Node,
    report: dict,
    gpus: dict[int, Gpu],
    now: datetime,
    actor_label: str,
    rules: HealthRules | None = None,
) -> list[Gpu]:
    """Store one node's telemetry and apply the health rules; returns the GPUs whose health
    changed. `gpus` are the node's Gpu rows by index, loaded under the node's lock; the
    report has been validated (inventory.apis) so every index is one of them."""
    unreadable = (report.get("unreadable") or "")[:300]
    if unreadable != node.telemetry_error:
        Node.objects.filter(pk=node.pk).update(telemetry_error=unreadable)
        node.telemetry_error = unreadable
    readings = report.get("gpus") or []
    if not readings:
        return []  # nothing readable: the GPUs keep their state; staff see the error
    rules = rules or _rules()
    rows, changed, touched = [], [], []
    for reading in readings:
        gpu = gpus[reading["index"]]
        rows.append(_sample_row(gpu.pk, reading, now))
        verdict = gpu_health_evaluate(
            reading, rules=rules, over_temp_since=gpu.over_temp_since, now=now
        )
        dirty = verdict.over_temp_since != gpu.over_temp_since
        gpu.over_temp_since = verdict.over_temp_since
        if gpu_health_apply(
            gpu=gpu,
            health=verdict.health,
            reason=verdict.reason,
            actor_label=actor_label,
            now=now,
            save=False,
        ):
            changed.append(gpu)
            dirty = True
        if dirty:
            touched.append(gpu)
    samples_enqueue(rows)
    if touched:
        Gpu.objects.bulk_update(touched, ["health", "health_reason", "over_temp_since"])
    return changed


# The GPUs' minutes, and the fleet's minutes summed from exactly those rows: every GPU-minute
# of a minute in the window is recomputed here, so each fleet minute is whole and idempotent.
_ROLLUP_SQL = f"""
WITH rolled AS (
INSERT INTO {GpuMinute._meta.db_table} AS m
       (gpu_id, minute, samples, temperature_c_max, power_w_avg, utilization_pct_avg,
        memory_used_mib_max)
SELECT gpu_id, date_trunc('minute', at), count(*), max(temperature_c), avg(power_w),
       avg(utilization_pct), max(memory_used_mib)
  FROM {GpuSample._meta.db_table}
 WHERE at >= %(since)s AND at < %(until)s
 GROUP BY 1, 2
ON CONFLICT (gpu_id, minute) DO UPDATE
   SET samples = EXCLUDED.samples, temperature_c_max = EXCLUDED.temperature_c_max,
       power_w_avg = EXCLUDED.power_w_avg, utilization_pct_avg = EXCLUDED.utilization_pct_avg,
       memory_used_mib_max = EXCLUDED.memory_used_mib_max
RETURNING minute, power_w_avg, utilization_pct_avg
), fleet AS (
INSERT INTO {FleetMinute._meta.db_table} AS f
       (minute, gpus, utilization_gpus, utilization_pct_sum, power_w_sum)
SELECT minute, count(*), count(utilization_pct_avg), coalesce(sum(utilization_pct_avg), 0),
       coalesce(sum(power_w_avg), 0)
  FROM rolled GROUP BY minute
ON CONFLICT (minute) DO UPDATE
   SET gpus = EXCLUDED.gpus, utilization_gpus = EXCLUDED.utilization_gpus,
       utilization_pct_sum = EXCLUDED.utilization_pct_sum, power_w_sum = EXCLUDED.power_w_sum
)
SELECT count(*) FROM rolled
"""


def telemetry_rollup(*, now: datetime | None = None, lookback: timedelta = ROLLUP_LOOKBACK) -> int:
    """Roll the completed minutes of the last `lookback` up into GpuMinute; returns rows written.

    Each run recomputes those minutes from the raw samples (still kept), so it is idempotent
    and picks up samples that arrived late."""
    now = now or timezone.now()
    until = now.replace(second=0, microsecond=0)
    with transaction.atomic(), connection.cursor() as cursor:
        partitions_ensure(MINUTES, until - lookback, until)
        cursor.execute(_ROLLUP_SQL, {"since": until - lookback, "until": until})
        return cursor.fetchone()[0]


def telemetry_purge(*, now: datetime | None = None) -> dict[str, dict]:
    """Raw samples and minute rows past their retention go with their partitions (whole hours
    and days: a row is kept at most one partition's span longer than its window), the next
    day's partitions are created, and the fleet's minutes past the rollup's retention are
    deleted. Returns what was created, dropped and deleted per table."""
    now = now or timezone.now()
    result = telemetry_partitions_maintain(now=now)
    fleet = FleetMinute.objects.filter(minute__lt=now - settings.TELEMETRY_ROLLUP_RETENTION)
    result[FleetMinute._meta.db_table] = {"deleted": delete_in_batches(fleet)}
    return result
