"""Redis URLs as the settings give them: a password hidden for printing, and the checks of a
Sentinel or Redis Cluster URL that need no connection (the worker checks the rest at start).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from relier_celery.core.errors import ConfigError

__all__ = ["SENTINEL", "check_cluster", "cluster_seeds", "mask_url"]

# kombu's spelling of a Sentinel URL (each of its ``;``-separated nodes starts with it).
SENTINEL = "sentinel://"


def mask_url(url: str) -> str:
    """Hide the password of a URL (of each of kombu's ``;``-separated URLs) for printing."""
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def check_cluster(url: str, broker_url: str) -> None:
    """A Redis Cluster for relier's state cannot be reached through Sentinel, nor hold the
    Redis broker's queues (the worker also compares the broker with the cluster's nodes)."""
    if url.startswith(SENTINEL):
        raise ConfigError(
            f"relier_redis_cluster is True but relier_redis_url {mask_url(url)!r} is a Sentinel "
            "URL: Redis Cluster fails over by itself; give one cluster node, redis://host:port"
        )
    if broker_url.startswith(("redis://", "rediss://", "unix://", SENTINEL)) and (
        url == broker_url or urlsplit(url).netloc == urlsplit(broker_url).netloc
    ):
        raise ConfigError(
            "relier_redis_cluster is True but relier_redis_url is the Redis broker's "
            f"({mask_url(broker_url)}): kombu has no Redis Cluster transport, and the reliable "
            "fetch needs the queues in one Redis with relier's records. Use RabbitMQ (or a Redis "
            "outside the cluster) as the broker, or set relier_redis_cluster = False"
        )


def cluster_seeds(options: Mapping[str, Any], cluster: bool) -> list[tuple[str, int]]:
    """The further seed nodes of ``relier_redis_options["startup_nodes"]`` ("host:port" each),
    tried besides relier_redis_url's node: a process that starts while that node is down (a
    failover) still finds the cluster."""
    value = options.get("startup_nodes")
    if value is None:
        return []
    if not cluster:
        raise ConfigError(
            "relier_redis_options['startup_nodes'] is for a Redis Cluster: set "
            "relier_redis_cluster = True, or remove it"
        )
    seeds = []
    for node in value if isinstance(value, (list, tuple)) else [value]:
        host, _, port = str(node).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"relier_redis_options['startup_nodes']: {node!r} is not host:port; give a "
                "list such as ['10.0.0.2:7000', '10.0.0.3:7000']"
            )
        seeds.append((host, int(port)))
    return seeds
