"""inventory_gpu.busy is declared by inventory (see Gpu's docstring for what keeps it).

It was added by marketplace's migration 0009 before inventory declared it: a database
migrated then has it already (ADD COLUMN IF NOT EXISTS), and on a new database whichever of
the two runs first adds it. Not a Django field: Django has no multirange field, and no query
through the ORM needs it.
"""

from django.db import migrations

FORWARD = """
ALTER TABLE inventory_gpu ADD COLUMN IF NOT EXISTS busy tstzmultirange NOT NULL DEFAULT '{}';
-- busy changes with every booking of the GPU: room on each page keeps those updates HOT
-- (no index entries, pruned in place), and vacuum comes sooner than the default 20 %.
ALTER TABLE inventory_gpu SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.05);
"""

# Kept when going back: marketplace's triggers (migration 0009) write it.
REVERSE = migrations.RunSQL.noop


class Migration(migrations.Migration):
    dependencies = [
        ("inventory", "0007_verbose_names"),
    ]

    operations = [migrations.RunSQL(FORWARD, REVERSE)]
