"""The per-process reference cache: edits saved here apply at once, others within the TTL."""

from decimal import Decimal

import pytest

from marketplace.models import PricingPolicy, RateCard
from marketplace.selectors import reference
from marketplace.services.pricing import current_policy
from tests.factories import GpuModelFactory, SiteFactory
from tests.marketplace.market_helpers import make_policy, make_rate

pytestmark = pytest.mark.django_db


def test_a_rate_card_saved_in_this_process_applies_at_once():
    site, gpu_model = SiteFactory(), GpuModelFactory()
    card = make_rate(gpu_model, "2.00")
    assert reference.rate_card_for(site_id=site.pk, gpu_model_id=gpu_model.pk) == card
    override = make_rate(gpu_model, "3.00", site=site)
    got = reference.rate_card_for(site_id=site.pk, gpu_model_id=gpu_model.pk)
    assert (got.pk, got.price_per_gpu_hour) == (override.pk, Decimal("3.0000"))
    override.delete()
    assert reference.rate_card_for(site_id=site.pk, gpu_model_id=gpu_model.pk).pk == card.pk


def test_a_change_made_elsewhere_applies_once_the_ttl_has_passed(monkeypatch):
    policy = make_policy()
    assert current_policy() == policy
    # A queryset update sends no signal, as an edit in another worker process would not.
    PricingPolicy.objects.filter(pk=policy.pk).update(interruptible_discount_pct=Decimal("40"))
    assert current_policy().interruptible_discount_pct == policy.interruptible_discount_pct
    later = reference.time.monotonic() + reference.REFERENCE_TTL_SECONDS + 0.1
    monkeypatch.setattr(reference.time, "monotonic", lambda: later)
    assert current_policy().interruptible_discount_pct == Decimal("40")


def test_unknown_slugs_and_missing_cards_are_none():
    site, gpu_model = SiteFactory(), GpuModelFactory()
    assert reference.site_by_slug("nowhere") is None
    assert reference.gpu_model_by_slug("no-such-gpu") is None
    assert reference.rate_card_for(site_id=site.pk, gpu_model_id=gpu_model.pk) is None
    assert not RateCard.objects.exists()


def test_each_table_is_read_once_per_ttl_whatever_rows_are_asked_for(django_assert_num_queries):
    sites = SiteFactory.create_batch(3)
    models = [GpuModelFactory(), GpuModelFactory(slug="l40s-48gb", name="NVIDIA L40S 48GB")]
    for gpu_model in models:
        make_rate(gpu_model, "2.00")
    make_rate(models[0], "2.50", site=sites[1])
    reference.reference_cache_clear()

    with django_assert_num_queries(3):  # rate cards, sites, GPU models: one query each
        for site in sites:
            for gpu_model in models:
                assert reference.rate_card_for(site_id=site.pk, gpu_model_id=gpu_model.pk)
                assert reference.sites_by_id([site.pk]) == {site.pk: site}
                assert reference.gpu_model_by_slug(gpu_model.slug) == gpu_model
    with django_assert_num_queries(0):
        override = reference.rate_card_for(site_id=sites[1].pk, gpu_model_id=models[0].pk)
        assert override.price_per_gpu_hour == Decimal("2.5000")
        assert reference.gpu_models_by_id([models[1].pk, -1]) == {models[1].pk: models[1]}
