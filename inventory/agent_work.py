"""Whether work waits for a node's agent: the condition the heartbeat's answer carries as
`work_waiting`, so that an idle agent leases only when told to instead of polling.

The work lives in two apps: burn-ins here, agent jobs in the marketplace, which inventory does
not import. So each owner registers an SQL `EXISTS (…)` over its own table, with `{node_id}`
where the node's id goes; the marketplace registers its agent jobs at start-up
(marketplace.apps.MarketplaceConfig.ready). The heartbeat's statements are built once, at
their first use, with every condition registered by then: registering later is an error, not
a condition silently left out.

Each condition must be backed by an index on (node, status), since every heartbeat runs it.
"""

from inventory.models import BurnIn, BurnInStatus

__all__ = ["agent_work_register", "agent_work_waiting_sql"]

_conditions: list[str] = []
_used = False


def agent_work_register(exists_sql: str) -> None:
    """Add `exists_sql`, an SQL boolean (an `EXISTS (…)` with `{node_id}` for the node's id
    and no parameters), to what makes work wait for a node's agent."""
    if "{node_id}" not in exists_sql:
        raise ValueError("the condition must name the node's id as {node_id}")
    if _used:
        raise RuntimeError(
            "agent work registered after the heartbeat's statements were built; "
            "register it in an AppConfig.ready()"
        )
    _conditions.append(exists_sql)


def agent_work_waiting_sql(node_id: str) -> str:
    """The SQL boolean true when work waits for the agent of the node whose id is `node_id`
    (an SQL expression: a column or a placeholder)."""
    global _used
    _used = True
    return "(" + " OR ".join(c.replace("{node_id}", node_id) for c in _conditions) + ")"


# A queued burn-in: the agent leases it when it runs nothing else. Backed by the partial
# unique index burn_in_one_open_per_node (node_id, status queued or running).
agent_work_register(
    f"EXISTS (SELECT 1 FROM {BurnIn._meta.db_table} b"
    f" WHERE b.node_id = {{node_id}} AND b.status = '{BurnInStatus.QUEUED.value}')"
)
