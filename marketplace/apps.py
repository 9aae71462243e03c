from django.apps import AppConfig
from django.contrib.auth.signals import user_logged_in


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "Marketplace"

    def ready(self) -> None:
        # In ready(): these modules import models, which exist only once the apps are loaded.
        from inventory.agent_work import agent_work_register
        from inventory.node_bookings import node_bookings_register
        from marketplace.provisioning.agent_jobs import AGENT_JOB_WAITING_SQL
        from marketplace.selectors.staff import node_bookings_ahead
        from marketplace.sessions import session_signed_in

        # The heartbeat (inventory) tells an idle agent when a job waits for it; inventory
        # does not import the marketplace, so the marketplace says what its jobs are.
        agent_work_register(AGENT_JOB_WAITING_SQL)
        # Staff taking nodes out of service (inventory's admin) see whose bookings they touch.
        node_bookings_register(node_bookings_ahead)
        # Every sign-in (portal, admin, sign-up) starts its session's lifetime and idle clocks.
        user_logged_in.connect(session_signed_in, dispatch_uid="marketplace.session_signed_in")
