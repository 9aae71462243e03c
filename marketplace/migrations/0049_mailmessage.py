from django.db import migrations, models


class Migration(migrations.Migration):
    # The mail outbox (marketplace.mail): every e-mail is a row first, sent by a task after
    # commit and swept again if its task is lost.
    dependencies = [
        ("marketplace", "0048_user_session"),
    ]

    operations = [
        migrations.CreateModel(
            name="MailMessage",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("task", models.CharField(max_length=100)),
                ("args", models.JSONField()),
                (
                    "status",
                    models.CharField(
                        choices=[("pending", "Pending"), ("sent", "Sent"), ("failed", "Failed")],
                        default="pending",
                        max_length=10,
                    ),
                ),
                ("attempts", models.PositiveIntegerField(default=0)),
                ("next_attempt_at", models.DateTimeField()),
                ("queued_at", models.DateTimeField(blank=True, null=True)),
                ("last_error", models.TextField(blank=True)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("sent_at", models.DateTimeField(blank=True, null=True)),
            ],
            options={
                "ordering": ["-id"],
                "indexes": [
                    models.Index(
                        condition=models.Q(("status", "pending")),
                        fields=["next_attempt_at"],
                        name="mail_pending_due_idx",
                    ),
                    models.Index(
                        condition=models.Q(("status", "sent")),
                        fields=["sent_at"],
                        name="mail_sent_at_idx",
                    ),
                    models.Index(
                        condition=models.Q(("status", "failed")),
                        fields=["id"],
                        name="mail_failed_idx",
                    ),
                ],
            },
        ),
    ]
