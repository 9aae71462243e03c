from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    verbose_name = "Billing"

    def ready(self) -> None:
        # Fill in the marketplace's money question with billing's answer (see
        # marketplace/funding.py): the marketplace never imports billing.
        # Importing these registers their outbox handlers.
        import billing.services.postpaid  # noqa: F401
        import billing.services.refunds  # noqa: F401
        import billing.services.top_up_payments  # noqa: F401

        # Registers billing's tasks in every process, so one sent by name (config.celery's
        # task_enqueue) runs inline where tasks run eagerly, as the tests ask.
        import billing.tasks  # noqa: F401

        # In ready(): these modules import models, which exist only once the apps are loaded.
        from billing.portal import commitment_funding, overview_panel
        from billing.services.funding import BillingFundingGate
        from marketplace.funding import funding_gate_register
        from marketplace.portal.nav import (
            portal_funding_register,
            portal_nav_register,
            portal_overview_panel_register,
        )

        funding_gate_register(BillingFundingGate())
        portal_nav_register(
            label="Billing",
            url_name="portal-billing:overview",
            order=50,
            sections=("portal-billing:",),
        )
        portal_overview_panel_register(
            template_name="portal/billing/_overview_panel.html", context=overview_panel, order=10
        )
        portal_funding_register(commitment_funding)
