"""Marketplace models, one module per area; Django finds them all through this package."""

from marketplace.models.audit import *  # noqa: F403
from marketplace.models.core import *  # noqa: F403
from marketplace.models.curtailment import *  # noqa: F403
from marketplace.models.events import *  # noqa: F403
from marketplace.models.idempotency import *  # noqa: F403
from marketplace.models.mail import *  # noqa: F403
from marketplace.models.pricing import *  # noqa: F403
from marketplace.models.provisioning import *  # noqa: F403
from marketplace.models.resale import *  # noqa: F403
from marketplace.models.sessions import *  # noqa: F403
from marketplace.models.signup import *  # noqa: F403
from marketplace.models.webhooks import *  # noqa: F403
