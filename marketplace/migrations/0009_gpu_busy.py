"""inventory_gpu.busy: the union of the GPU's live allocation periods, kept by the database.

The column is inventory's (declared by its migration 0008, documented on inventory.models.Gpu);
this migration added it before inventory declared it, hence IF NOT EXISTS, and leaves it in
place when reversed. What is marketplace's here: the triggers on its allocations that keep it.

Availability then asks of each GPU `NOT busy && window`, a cost that follows the GPUs of the
model instead of the allocations in the window (a 14-day window in the booked period reads
~25,000 of them at the benchmark's scale). The column is not a Django field (Django has no
multirange field); the selectors read it in SQL, and nothing writes it but these triggers.

Every statement that changes allocations (insert, update, delete; the allocation service, the
state machine, raw SQL) refreshes the GPUs it touched, locking their rows in id order first so
that two writers never wait on each other in opposite orders. Placement still re-reads the
allocations themselves under its node locks, and the exclusion constraint still decides; busy
only serves the searches.
"""

from django.db import migrations

FORWARD = """
ALTER TABLE inventory_gpu ADD COLUMN IF NOT EXISTS busy tstzmultirange NOT NULL DEFAULT '{}';
-- busy changes with every booking of the GPU: room on each page keeps those updates HOT
-- (no index entries, pruned in place), and vacuum comes sooner than the default 20 %.
ALTER TABLE inventory_gpu SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.05);

UPDATE inventory_gpu g SET busy = live.busy
FROM (SELECT gpu_id, range_agg(period) AS busy
      FROM marketplace_allocation WHERE is_live GROUP BY gpu_id) live
WHERE g.id = live.gpu_id;

CREATE FUNCTION marketplace_gpu_busy_refresh(gpu_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM inventory_gpu WHERE id = ANY(gpu_ids) ORDER BY id FOR NO KEY UPDATE;
    UPDATE inventory_gpu g
    SET busy = coalesce(
        (SELECT range_agg(a.period) FROM marketplace_allocation a
         WHERE a.gpu_id = g.id AND a.is_live),
        '{}')
    WHERE g.id = ANY(gpu_ids);
END $$;

CREATE FUNCTION marketplace_allocation_busy_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM marketplace_gpu_busy_refresh(ARRAY(SELECT DISTINCT gpu_id FROM changed));
    RETURN NULL;
END $$;

CREATE FUNCTION marketplace_allocation_busy_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM marketplace_gpu_busy_refresh(ARRAY(
        SELECT gpu_id FROM before UNION SELECT gpu_id FROM after));
    RETURN NULL;
END $$;

CREATE TRIGGER marketplace_allocation_busy_insert
    AFTER INSERT ON marketplace_allocation REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION marketplace_allocation_busy_inserted();
CREATE TRIGGER marketplace_allocation_busy_update
    AFTER UPDATE ON marketplace_allocation REFERENCING OLD TABLE AS before NEW TABLE AS after
    FOR EACH STATEMENT EXECUTE FUNCTION marketplace_allocation_busy_updated();
CREATE TRIGGER marketplace_allocation_busy_delete
    AFTER DELETE ON marketplace_allocation REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION marketplace_allocation_busy_inserted();
"""

REVERSE = """
DROP TRIGGER IF EXISTS marketplace_allocation_busy_delete ON marketplace_allocation;
DROP TRIGGER IF EXISTS marketplace_allocation_busy_update ON marketplace_allocation;
DROP TRIGGER IF EXISTS marketplace_allocation_busy_insert ON marketplace_allocation;
DROP FUNCTION IF EXISTS marketplace_allocation_busy_updated();
DROP FUNCTION IF EXISTS marketplace_allocation_busy_inserted();
DROP FUNCTION IF EXISTS marketplace_gpu_busy_refresh(bigint[]);
"""


class Migration(migrations.Migration):
    dependencies = [
        ("inventory", "0002_node_status_changed_at_agent_version"),
        ("marketplace", "0008_curtailment"),
    ]

    operations = [migrations.RunSQL(FORWARD, REVERSE)]
