"""The ledger is append-only in Python and in the database; its keys make writers repeatable."""

import pytest
from django.db import IntegrityError, connection, transaction

from billing.models import LedgerEntry, LedgerImmutable, LedgerKind
from billing.services.ledger import ledger_entry_add

pytestmark = pytest.mark.django_db


def add(org, key="k1", amount=500, kind=LedgerKind.CREDIT):
    return ledger_entry_add(organization=org, kind=kind, amount_minor=amount, currency="usd",
                            idempotency_key=key)  # fmt: skip


def test_the_same_key_twice_returns_the_first_entry_and_adds_nothing(org):
    first, created = add(org)
    again, created_again = add(org, amount=900)

    assert (created, created_again) == (True, False)
    assert again.pk == first.pk and again.amount_minor == 500
    assert LedgerEntry.objects.count() == 1


def test_an_entry_cannot_be_changed_or_deleted_from_python(org):
    entry, _ = add(org)
    entry.amount_minor = 1
    with pytest.raises(LedgerImmutable):
        entry.save()
    with pytest.raises(LedgerImmutable):
        entry.delete()
    assert LedgerEntry.objects.get().amount_minor == 500


def test_the_database_refuses_update_and_delete_of_an_entry(org):
    entry, _ = add(org)
    with pytest.raises(IntegrityError), transaction.atomic():
        LedgerEntry.objects.filter(pk=entry.pk).update(amount_minor=1)
    with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM billing_ledgerentry WHERE id = %s", [entry.pk])
    assert list(LedgerEntry.objects.values_list("amount_minor", flat=True)) == [500]


def test_a_credit_cannot_take_money_and_a_charge_cannot_give_it(org):
    with pytest.raises(ValueError):
        add(org, key="a", amount=-5, kind=LedgerKind.CREDIT)
    with pytest.raises(ValueError):
        add(org, key="b", amount=5, kind=LedgerKind.RESERVED_CHARGE)
    assert not LedgerEntry.objects.exists()
