"""Automatic recharge becomes opt-in and bounded like a top-up.

Existing accounts: one without a saved card could never be recharged, so its switch goes off
(it only looked on). One with a saved card keeps it on: its owners may rely on it to keep
on-demand work running, and switching it off silently could get that work released when the
balance runs out; every automatic charge is now e-mailed with its reason, and the switch is on
the Billing page. Amounts and thresholds above the top-up cap (100,000.00) come down to it.
"""

from django.db import migrations, models
from django.db.models import F, Value
from django.db.models.functions import Least

# 100,000.00 in minor units: two-decimal currencies, and zero-decimal ones (billing.money).
_CAP_MINOR = {"two_decimal": 10_000_000, "zero_decimal": 100_000}
_ZERO_DECIMAL = ["bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx",
                 "vnd", "vuv", "xaf", "xof", "xpf"]  # fmt: skip


def opt_in_and_cap(apps, schema_editor):
    BillingAccount = apps.get_model("billing", "BillingAccount")
    BillingAccount.objects.filter(default_payment_method_id="").update(auto_recharge_enabled=False)
    for accounts, cap in (
        (BillingAccount.objects.exclude(currency__in=_ZERO_DECIMAL), _CAP_MINOR["two_decimal"]),
        (BillingAccount.objects.filter(currency__in=_ZERO_DECIMAL), _CAP_MINOR["zero_decimal"]),
    ):
        accounts.update(
            recharge_amount_minor=Least(F("recharge_amount_minor"), Value(cap)),
            recharge_threshold_minor=Least(F("recharge_threshold_minor"), Value(cap)),
        )


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0005_hold"),
    ]

    operations = [
        migrations.AddField(
            model_name="topup",
            name="reason",
            field=models.TextField(blank=True, help_text="Why an automatic recharge was started."),
        ),
        migrations.AlterField(
            model_name="billingaccount",
            name="auto_recharge_enabled",
            field=models.BooleanField(default=False),
        ),
        migrations.RunPython(opt_in_and_cap, migrations.RunPython.noop),
    ]
