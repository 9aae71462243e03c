"""allocation.gpu_model goes, with the triggers that kept it (two of them on inventory's
tables) and its index: only a search strategy kept for tests and the benchmark read it."""

from django.db import migrations

DROP_TRIGGERS = """
DROP TRIGGER IF EXISTS marketplace_gpu_node_follow ON inventory_gpu;
DROP FUNCTION IF EXISTS marketplace_gpu_node_follow();
DROP TRIGGER IF EXISTS marketplace_node_model_follow ON inventory_node;
DROP FUNCTION IF EXISTS marketplace_node_model_follow();
DROP TRIGGER IF EXISTS marketplace_allocation_gpu_model ON marketplace_allocation;
DROP FUNCTION IF EXISTS marketplace_allocation_set_gpu_model();
"""

# Back as migration 0007 made them.
CREATE_TRIGGERS = """
UPDATE marketplace_allocation a SET gpu_model_id = n.gpu_model_id
FROM inventory_gpu g JOIN inventory_node n ON n.id = g.node_id
WHERE g.id = a.gpu_id;

CREATE FUNCTION marketplace_allocation_set_gpu_model() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT n.gpu_model_id INTO NEW.gpu_model_id
    FROM inventory_gpu g JOIN inventory_node n ON n.id = g.node_id
    WHERE g.id = NEW.gpu_id;
    RETURN NEW;
END $$;
CREATE TRIGGER marketplace_allocation_gpu_model
    BEFORE INSERT OR UPDATE OF gpu_id, gpu_model_id ON marketplace_allocation
    FOR EACH ROW EXECUTE FUNCTION marketplace_allocation_set_gpu_model();

CREATE FUNCTION marketplace_node_model_follow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE marketplace_allocation a SET gpu_model_id = NEW.gpu_model_id
    FROM inventory_gpu g WHERE g.node_id = NEW.id AND a.gpu_id = g.id;
    RETURN NULL;
END $$;
CREATE TRIGGER marketplace_node_model_follow
    AFTER UPDATE OF gpu_model_id ON inventory_node
    FOR EACH ROW WHEN (OLD.gpu_model_id IS DISTINCT FROM NEW.gpu_model_id)
    EXECUTE FUNCTION marketplace_node_model_follow();

CREATE FUNCTION marketplace_gpu_node_follow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE marketplace_allocation a SET gpu_model_id = n.gpu_model_id
    FROM inventory_node n WHERE n.id = NEW.node_id AND a.gpu_id = NEW.id;
    RETURN NULL;
END $$;
CREATE TRIGGER marketplace_gpu_node_follow
    AFTER UPDATE OF node_id ON inventory_gpu
    FOR EACH ROW WHEN (OLD.node_id IS DISTINCT FROM NEW.node_id)
    EXECUTE FUNCTION marketplace_gpu_node_follow();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("marketplace", "0020_verbose_names"),
    ]

    operations = [
        migrations.RemoveIndex(model_name="allocation", name="alloc_live_model_period_idx"),
        migrations.RunSQL(DROP_TRIGGERS, CREATE_TRIGGERS),
        migrations.RemoveField(model_name="allocation", name="gpu_model"),
    ]
