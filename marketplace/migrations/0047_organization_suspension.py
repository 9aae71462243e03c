from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("marketplace", "0046_demand_response_previous_secret"),
    ]

    operations = [
        migrations.AddField(
            model_name="organization",
            name="suspended_at",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name="organization",
            name="suspension_reason",
            field=models.TextField(blank=True, default="", editable=False),
        ),
    ]
