"""The heartbeat buffer: what a heartbeat need not write at once waits in Redis for a batch.

A routine heartbeat (a node in service whose GPUs keep their health) writes nothing to
PostgreSQL: its time goes into a Redis hash (node id → time) and its telemetry samples into
the telemetry list, in one MULTI. `heartbeats_flush` (beat, every 5 s) writes the hash to
inventory_node with one UPDATE per few thousand nodes, and the node tokens' last use the same
way. Everything that must act at once takes the locked path instead
(`inventory.services.node_heartbeat_accept` decides).

Why the offline sweeper cannot be fooled by the buffer, whatever Redis does (restart,
rollback to an older snapshot, data loss, outage):

- write-through: a heartbeat is buffered only while the node's last heartbeat in the database
  is at most WRITE_THROUGH_AFTER old; otherwise it is written at once. So for every node, a
  heartbeat not in the database happened within WRITE_THROUGH_AFTER of the database's value.
- the flush records in PostgreSQL, in the transaction that writes the times, how far the
  buffer is known to be written (`HeartbeatFlush.flushed_through`: when it read the hash,
  less PUSH_MARGIN for requests still on their way): every heartbeat before that is in the
  database.
- the sweeper (`inventory.services.nodes_mark_silent_offline`) takes a node's database value
  as its last heartbeat when the flush has passed that value + WRITE_THROUGH_AFTER (nothing
  can be missing), and otherwise assumes the worst (a heartbeat as late as that bound). A
  node is never declared offline for a heartbeat that sat in a buffer; if the flush stalls,
  offline detection is late by at most WRITE_THROUGH_AFTER, never early.
"""

import logging
from datetime import UTC, datetime, timedelta

import redis
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from inventory.models import HeartbeatFlush, Node, NodeStatus, NodeToken, Outage, OutageCause
from inventory.telemetry import BUFFER_KEY as SAMPLES_KEY
from inventory.telemetry import buffer_client as _buffer
from inventory.telemetry import samples_encode

logger = logging.getLogger(__name__)

LAST_SEEN_KEY = "switchyard:heartbeats:last_seen"
TOKEN_USED_KEY = "switchyard:heartbeats:token_used"
FLUSH_BATCH = 5_000  # nodes per UPDATE
# A heartbeat's time is taken before its push reaches Redis; a flush trusts only what is older
# than its read by this much (a request stalled longer than this is written at once by the
# next heartbeat's write-through anyway).
PUSH_MARGIN = timedelta(seconds=10)
_LOCK_KEY = 0x5359_4842  # pg advisory lock: one flush at a time ("SYHB")

# Deletes a field only if it still holds the value the flush wrote: a newer heartbeat that
# came in meanwhile stays for the next flush.
_DELETE_IF_UNCHANGED = """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i]); n = n + 1
  end
end
return n
"""


def write_through_after() -> timedelta:
    """How stale a node's database heartbeat may be before a heartbeat is written at once."""
    return settings.NODE_OFFLINE_AFTER / 3


def _epoch(at: datetime) -> str:
    return f"{at.timestamp():.6f}"


def _from_epoch(value: bytes | str) -> datetime:
    return datetime.fromtimestamp(float(value), tz=UTC)


def heartbeat_buffer_push(*, node_id: int, at: datetime, samples: list[tuple]) -> bool:
    """Buffer one heartbeat (its time and its telemetry samples) in one MULTI; False if Redis
    did not take it (the caller writes it at once instead)."""
    try:
        pipe = _buffer().pipeline(transaction=True)
        pipe.hset(LAST_SEEN_KEY, str(node_id), _epoch(at))
        if samples:
            pipe.rpush(SAMPLES_KEY, samples_encode(samples))
        pipe.execute()
        return True
    except (redis.RedisError, OSError) as exc:
        logger.warning("heartbeat buffer unavailable (%s); writing node %s at once", exc, node_id)
        return False


def token_use_buffer(*, token_id: int, at: datetime) -> bool:
    """Note a node token's use for the next flush; False if Redis did not take it."""
    try:
        _buffer().hset(TOKEN_USED_KEY, str(token_id), _epoch(at))
        return True
    except (redis.RedisError, OSError):
        return False


def heartbeats_buffered(node_ids: list[int]) -> dict[int, datetime]:
    """The buffered (not yet flushed) heartbeat time of these nodes; {} if Redis is down."""
    if not node_ids:
        return {}
    try:
        values = _buffer().hmget(LAST_SEEN_KEY, [str(i) for i in node_ids])
    except (redis.RedisError, OSError):
        return {}
    return {i: _from_epoch(v) for i, v in zip(node_ids, values, strict=True) if v is not None}


def flushed_through() -> datetime | None:
    """Every heartbeat older than this is in inventory_node (None: no flush has run)."""
    row = HeartbeatFlush.objects.filter(pk=1).values_list("flushed_through", flat=True).first()
    return row


_UPDATE_NODES = f"""
UPDATE {Node._meta.db_table} AS n SET last_heartbeat_at = v.at
  FROM unnest(%s::bigint[], %s::timestamptz[]) AS v(id, at)
 WHERE n.id = v.id AND (n.last_heartbeat_at IS NULL OR n.last_heartbeat_at < v.at)
"""
# A node heard while a silence outage is open and it is not offline (staff moved it on) ends
# that outage at the heartbeat, as the locked path does; an offline node is resumed by its
# next heartbeat, which always takes the locked path.
_CLOSE_OUTAGES = f"""
UPDATE {Outage._meta.db_table} AS o SET ended_at = v.at
  FROM unnest(%s::bigint[], %s::timestamptz[]) AS v(id, at), {Node._meta.db_table} AS n
 WHERE o.node_id = v.id AND n.id = v.id AND n.status <> %s AND o.gpu_id IS NULL
   AND o.ended_at IS NULL AND o.cause = %s AND o.started_at < v.at
"""
_UPDATE_TOKENS = f"""
UPDATE {NodeToken._meta.db_table} AS t SET last_used_at = v.at
  FROM unnest(%s::bigint[], %s::timestamptz[]) AS v(id, at)
 WHERE t.id = v.id AND (t.last_used_at IS NULL OR t.last_used_at < v.at)
"""
_MARK_FLUSHED = f"""
INSERT INTO {HeartbeatFlush._meta.db_table} (id, flushed_through) VALUES (1, %s)
ON CONFLICT (id) DO UPDATE SET flushed_through = GREATEST(
    {HeartbeatFlush._meta.db_table}.flushed_through, EXCLUDED.flushed_through)
"""


def _entries(raw: dict) -> list[tuple[int, datetime, bytes, bytes]]:
    return sorted((int(k), _from_epoch(v), k, v) for k, v in raw.items())


def heartbeats_flush() -> int:
    """Write the buffered heartbeat times (and node tokens' last use) to PostgreSQL; returns
    the nodes written. Idempotent and safe to run concurrently (one runs, others return 0)."""
    client = _buffer()
    read_at = timezone.now()
    nodes = _entries(client.hgetall(LAST_SEEN_KEY))
    tokens = _entries(client.hgetall(TOKEN_USED_KEY))
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [_LOCK_KEY])
        if not cursor.fetchone()[0]:
            return 0  # another flush is writing; it will record its own progress
        for start in range(0, len(nodes), FLUSH_BATCH):
            chunk = nodes[start : start + FLUSH_BATCH]
            ids, times = [e[0] for e in chunk], [e[1] for e in chunk]
            cursor.execute(_UPDATE_NODES, [ids, times])
            cursor.execute(
                _CLOSE_OUTAGES, [ids, times, NodeStatus.OFFLINE, OutageCause.HEARTBEAT_MISSED]
            )
        if tokens:
            cursor.execute(_UPDATE_TOKENS, [[e[0] for e in tokens], [e[1] for e in tokens]])
        cursor.execute(_MARK_FLUSHED, [read_at - PUSH_MARGIN])
    # Committed: forget what was written, unless a newer value arrived meanwhile. A crash
    # here leaves the entries for the next flush, which writes them again harmlessly.
    script = client.register_script(_DELETE_IF_UNCHANGED)
    for key, entries in ((LAST_SEEN_KEY, nodes), (TOKEN_USED_KEY, tokens)):
        for start in range(0, len(entries), FLUSH_BATCH):
            args = [x for e in entries[start : start + FLUSH_BATCH] for x in (e[2], e[3])]
            script(keys=[key], args=args)
    return len(nodes)


def node_last_heard_bound(
    node: Node, *, through: datetime | None, buffered: datetime | None
) -> tuple[datetime | None, datetime | None]:
    """(known, latest possible) last heartbeat of a node as the sweeper may assume it.

    `known` is the latest heartbeat we can see (database or buffer); `latest possible` adds
    what may be missing: nothing when the last flush covered the database value plus the
    write-through bound, else a heartbeat as late as that bound.
    """
    last = node.last_heartbeat_at
    if last is None:
        return buffered, buffered
    known = max(last, buffered) if buffered else last
    bound = last + write_through_after()
    if through is not None and through >= bound:
        return known, known
    return known, max(known, bound)
