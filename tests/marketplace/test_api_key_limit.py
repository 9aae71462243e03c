"""An organisation has a bounded number of API keys in use, counted under its row lock."""

import pytest

from config.errors import ValidationFailed
from marketplace.models import ApiKey
from marketplace.services import api_keys
from marketplace.services.api_keys import api_key_create, api_key_revoke
from tests.factories import OrganizationFactory
from tests.races import run_together

pytestmark = pytest.mark.django_db


def test_an_organisation_has_a_bounded_number_of_keys_in_use(monkeypatch):
    monkeypatch.setattr(api_keys, "MAX_ACTIVE_KEYS", 2)
    org = OrganizationFactory()
    first, _ = api_key_create(organization=org, name="a", scopes=["read"], created_by=None)
    api_key_create(organization=org, name="b", scopes=["read"], created_by=None)

    with pytest.raises(ValidationFailed) as refused:
        api_key_create(organization=org, name="c", scopes=["read"], created_by=None)

    assert (refused.value.status_code, refused.value.code) == (400, "too_many_api_keys")
    assert ApiKey.objects.filter(organization=org).count() == 2
    # A revoked key no longer counts.
    api_key_revoke(api_key=first)
    api_key_create(organization=org, name="c", scopes=["read"], created_by=None)


@pytest.mark.django_db(transaction=True)
def test_two_keys_made_at_once_for_the_last_place_make_one(monkeypatch):
    monkeypatch.setattr(api_keys, "MAX_ACTIVE_KEYS", 2)
    org = OrganizationFactory()
    api_key_create(organization=org, name="a", scopes=["read"], created_by=None)

    def create(name):
        return lambda: api_key_create(organization=org, name=name, scopes=["read"], created_by=None)

    outcomes = run_together(create("b"), create("c"), create("d"))

    assert sorted(outcomes) == ["ok", "too_many_api_keys", "too_many_api_keys"]
    assert ApiKey.objects.filter(organization=org).count() == 2
