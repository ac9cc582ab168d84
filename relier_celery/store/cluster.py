"""Relier's state on Redis Cluster (``relier_redis_cluster = True``).

Every relier key carries the hash tag ``{<prefix>}`` (keys.py), so all of relier's state lives
in one slot: each script and each MULTI touches one slot, and the client below routes what has
no key (TIME, PING, CONFIG GET, the presence connection) to the primary that owns that slot
now, so every clock relier compares is the clock of the node its scripts run on. When the slot
moves (a resharding), redis-py follows MOVED and ASK; the next command re-homes the keyless
ones. A node that received the slot has not loaded relier's scripts: redis-py's ``Script``
reloads them on NOSCRIPT. A seed that cannot be reached, or that is no cluster node, stops the
worker at start with one line naming the setting. A process forked from one that already met
the cluster (a pool process) is seeded with every node its parent knew as well: the seed may be
the primary that died in a failover.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from relier_celery.core.errors import ConfigError, StoreUnavailable
from relier_celery.core.keys import Keys
from relier_celery.core.urls import cluster_seeds

__all__ = [
    "BROKER_IN_CLUSTER",
    "SlotCluster",
    "check_start",
    "connect_cluster",
    "home_connection",
    "known_nodes",
]

BROKER_IN_CLUSTER = (
    "relier_redis_cluster is True but the broker's Redis ({where}) is in that cluster: kombu "
    "has no Redis Cluster transport and the reliable fetch needs the queues in one Redis with "
    "relier's records. Use RabbitMQ (or a Redis outside the cluster) as the broker, or set "
    "relier_redis_cluster = False and point relier_redis_url at the broker's Redis"
)


# redis-py's cluster client has no annotations: its calls below carry type: ignore.
class SlotCluster(RedisCluster):
    """A cluster client whose keyless commands go to the owner of one slot (relier's)."""

    def __init__(self, *args: Any, home_slot: int = 0, **kwargs: Any) -> None:
        self.home_slot = home_slot
        super().__init__(*args, **kwargs)
        self._home()

    def home_node(self) -> Any:
        """The primary that owns relier's slot, as this client last learned it."""
        return self.nodes_manager.get_node_from_slot(self.home_slot)

    def _home(self) -> None:
        # redis-py sends keyless commands to its "default node" (a random primary after a
        # topology refresh); relier's is the node its scripts run on.
        try:
            node = self.home_node()
        except Exception:  # slot not covered yet: redis-py raises its own error next
            return
        if self.nodes_manager.default_node is not node:
            self.nodes_manager.default_node = node

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self._home()
        return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        self._home()  # the pipeline shares this client's nodes manager
        pipe = super().pipeline(transaction=transaction, shard_hint=shard_hint)  # type: ignore[no-untyped-call]
        # redis-py refuses keyless commands in a cluster pipeline, as it cannot know which
        # node's answer is wanted; relier's is its slot's owner, the default node here (the
        # store reads the clock its lease deadlines were written with in the same round trip).
        pipe.time = functools.partial(pipe.execute_command, "TIME")
        return pipe

    @property
    def connection_pool(self) -> redis.ConnectionPool:
        """The pool of the node that owns relier's slot (presence.py holds one of its
        connections)."""
        self._home()
        return cast(redis.ConnectionPool, self.home_node().redis_connection.connection_pool)


def known_nodes(client: Any) -> list[tuple[str, int]]:
    """The nodes, primaries and replicas, a cluster client has met (none for a plain one)."""
    if not isinstance(client, SlotCluster):
        return []
    return [(n.host, n.port) for n in client.get_nodes()]  # type: ignore[no-untyped-call]


def connect_cluster(
    url: str,
    options: Mapping[str, Any],
    keys: Keys,
    seeds: list[tuple[str, int]] | None = None,
    **common: Any,
) -> redis.Redis:
    """A client of the cluster behind the seed node ``url``, or any of ``seeds`` (the nodes
    a parent process knew) or of ``options["startup_nodes"]`` (the operator's further
    seeds). Typed as ``redis.Redis``: it answers every command the store sends (keyed ones by
    their slot)."""
    further = cluster_seeds(options, cluster=True)  # relier_redis_options["startup_nodes"]
    options = {k: v for k, v in options.items() if k != "startup_nodes"}
    nodes = [ClusterNode(h, p) for h, p in [*(seeds or []), *further]]  # type: ignore[no-untyped-call]
    try:
        client = SlotCluster.from_url(
            url,
            home_slot=key_slot(keys.leases.encode()),
            startup_nodes=nodes,
            **{**common, **options},
        )
    except RedisClusterException as exc:
        where = _address(url)
        if "can only be 0" in str(exc):  # redis-py: "A ``db`` ... can only be 0 in cluster mode"
            raise ConfigError(
                f"relier_redis_url {where}: a Redis Cluster has only database 0 "
                "(relier_redis_cluster = True): end the URL with /0 or no database"
            ) from exc
        if "not enabled" in str(exc):
            raise ConfigError(
                f"relier_redis_cluster is True but relier_redis_url ({where}) is not a Redis "
                "Cluster node (cluster_enabled:0): point it at a cluster node, or set "
                "relier_redis_cluster = False"
            ) from exc
        also = "".join(f", nor at {h}:{p}" for h, p in further)
        raise StoreUnavailable(
            f"relier_redis_url: no Redis Cluster node answers at {where}{also} "
            f"(relier_redis_cluster = True): {exc}".replace("\n", " ")
        ) from exc
    except redis.RedisError as exc:
        raise StoreUnavailable(
            f"relier_redis_url: the Redis Cluster seed {_address(url)} failed: {exc}"
        ) from exc
    return cast(redis.Redis, client)


def home_connection(client: Any, conn: Any, main: Any) -> Any:
    """The connection presence.py should hold now: ``conn`` while it is on the node that owns
    relier's slot as ``main`` (the store's client, which follows MOVED) knows it, else a new
    one of ``client`` (the named one) on that node. Plain clients keep ``conn``."""
    if not isinstance(client, SlotCluster) or not isinstance(main, SlotCluster):
        return conn
    try:
        home = main.home_node()
        node = client.get_node(host=home.host, port=home.port)  # type: ignore[no-untyped-call]
        if node is None:  # a node the named client has not met yet
            client.nodes_manager.initialize()
            node = client.get_node(host=home.host, port=home.port)  # type: ignore[no-untyped-call]
    except RedisClusterException:  # the slot is not covered now: keep pinging the old node
        return conn
    if node is None or (conn is not None and (conn.host, conn.port) == (node.host, node.port)):
        return conn
    if conn is not None:
        conn.disconnect()
    return node.redis_connection.connection_pool.get_connection()


def check_start(client: Any, cluster: bool, broker_url: str) -> None:
    """At a worker's start: raise :class:`ConfigError` when the broker's Redis is a node of
    relier's cluster (kombu has no cluster transport, and the reliable fetch needs the queues
    beside relier's records in one Redis), or when a plain ``relier_redis_url`` is a cluster
    node (its scripts would fail with MOVED as soon as the slot is another node's)."""
    if not cluster:
        try:
            enabled = int(client.info("cluster").get("cluster_enabled", 0))
        except redis.ResponseError:  # INFO refused (an ACL): nothing to tell
            return
        if enabled:
            raise ConfigError(
                "relier_redis_url is a Redis Cluster node but relier_redis_cluster is False: set "
                "relier_redis_cluster = True (and a broker outside the cluster, e.g. RabbitMQ)"
            )
        return
    if broker_url.startswith(("redis://", "rediss://")) and isinstance(client, SlotCluster):
        target = _address(broker_url)
        if any(f"{n.host}:{n.port}" == target for n in client.get_nodes()):  # type: ignore[no-untyped-call]
            raise ConfigError(BROKER_IN_CLUSTER.format(where=target))


def _address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}"
