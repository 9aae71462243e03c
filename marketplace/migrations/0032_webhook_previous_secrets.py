"""Each secret a rotation replaces keeps its own expiry: the one previous secret and its
expiry become a list."""

from django.db import migrations, models


def to_list(apps, schema_editor):
    WebhookEndpoint = apps.get_model("marketplace", "WebhookEndpoint")
    for endpoint in WebhookEndpoint.objects.exclude(previous_secret="").exclude(
        previous_secret_expires_at=None
    ):
        endpoint.previous_secrets = [
            {
                "secret": endpoint.previous_secret,
                "expires_at": endpoint.previous_secret_expires_at.isoformat(),
            }
        ]
        endpoint.save(update_fields=["previous_secrets"])


def to_one(apps, schema_editor):
    """Back to one previous secret: the one that signs longest."""
    from django.utils.dateparse import parse_datetime

    WebhookEndpoint = apps.get_model("marketplace", "WebhookEndpoint")
    for endpoint in WebhookEndpoint.objects.exclude(previous_secrets=[]):
        last = max(endpoint.previous_secrets, key=lambda kept: kept["expires_at"])
        endpoint.previous_secret = last["secret"]
        endpoint.previous_secret_expires_at = parse_datetime(last["expires_at"])
        endpoint.save(update_fields=["previous_secret", "previous_secret_expires_at"])


class Migration(migrations.Migration):
    dependencies = [("marketplace", "0031_listing_expired")]

    operations = [
        migrations.AddField(
            model_name="webhookendpoint",
            name="previous_secrets",
            field=models.JSONField(blank=True, default=list),
        ),
        migrations.RunPython(to_list, to_one),
        migrations.RemoveField(model_name="webhookendpoint", name="previous_secret"),
        migrations.RemoveField(model_name="webhookendpoint", name="previous_secret_expires_at"),
    ]
