"""A reserved term's refund for time it did not get gets a kind of its own, `term_refund`.

Until now it was a `credit`, as a staff goodwill credit is: a statement, its CSV, the API and
the staff dashboard could not tell them apart but by the description. The existing lines are
found by the keys their writers gave them (billing.services.credits: `cancel:<id>`,
`curtail:<id>:refund`, `resale-return:<listing>`) and given the new kind. Only the kind
changes: no amount, no line added or removed, so no balance moves (the balance trigger
counts inserts only). The ledger refuses UPDATE by a trigger; it is set aside for this one
statement, in this migration's transaction.
"""

from django.db import migrations, models

KINDS = [
    "usage",
    "reserved_charge",
    "top_up",
    "credit",
    "term_refund",
    "sla_credit",
    "refund",
    "adjustment",
    "resale_proceeds",
    "resale_fee",
]

TERM_REFUND_KEYS = """(
    idempotency_key LIKE 'cancel:%'
    OR idempotency_key LIKE 'curtail:%:refund'
    OR idempotency_key LIKE 'resale-return:%'
)"""


def _retag(old: str, new: str) -> str:
    return f"""
ALTER TABLE billing_ledgerentry DISABLE TRIGGER billing_ledger_append_only;
UPDATE billing_ledgerentry SET kind = '{new}' WHERE kind = '{old}' AND {TERM_REFUND_KEYS};
ALTER TABLE billing_ledgerentry ENABLE TRIGGER billing_ledger_append_only;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0015_invoice_payment_failed_at"),
    ]

    operations = [
        migrations.RemoveConstraint(model_name="ledgerentry", name="ledger_kind_valid"),
        migrations.AlterField(
            model_name="ledgerentry",
            name="kind",
            field=models.CharField(
                choices=[
                    ("usage", "Usage"),
                    ("reserved_charge", "Reserved-term charge"),
                    ("top_up", "Top-up"),
                    ("credit", "Credit"),
                    ("term_refund", "Reserved-term refund"),
                    ("sla_credit", "SLA credit"),
                    ("refund", "Refund"),
                    ("adjustment", "Adjustment"),
                    ("resale_proceeds", "Resale proceeds"),
                    ("resale_fee", "Resale fee"),
                ],
                max_length=20,
            ),
        ),
        migrations.AddConstraint(
            model_name="ledgerentry",
            constraint=models.CheckConstraint(
                condition=models.Q(kind__in=KINDS), name="ledger_kind_valid"
            ),
        ),
        migrations.RunSQL(_retag("credit", "term_refund"), _retag("term_refund", "credit")),
    ]
