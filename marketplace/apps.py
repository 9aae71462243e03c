from django.apps import AppConfig


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "Marketplace"

    def ready(self) -> None:
        # In ready(): these modules import models, which exist only once the apps are loaded.
        from inventory.agent_work import agent_work_register
        from marketplace.provisioning.agent_jobs import AGENT_JOB_WAITING_SQL

        # The heartbeat (inventory) tells an idle agent when a job waits for it; inventory
        # does not import the marketplace, so the marketplace says what its jobs are.
        agent_work_register(AGENT_JOB_WAITING_SQL)
