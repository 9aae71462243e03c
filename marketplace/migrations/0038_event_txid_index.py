"""The forward feed's index, built concurrently: marketplace_event takes writes from every
change (an outbox), and a plain CREATE INDEX would block them while it builds."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("marketplace", "0037_event_txid"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="event",
            index=models.Index(fields=["organization", "txid", "id"], name="event_org_txid"),
        ),
    ]
