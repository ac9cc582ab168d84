"""The connection to Redis every command module shares: one client per process (a forked pool
child never reuses its parent's sockets), every Lua script under ``scripts/`` loaded once and
called by SHA (redis-py's ``Script`` reloads it on NOSCRIPT, for instance after a Redis
restart), and one error mapping: connection problems and refused writes surface as
:class:`StoreUnavailable`, never as a silent no-op.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from importlib import resources
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.commands.core import Script

from relier_celery.core.errors import RelierError, StoreUnavailable
from relier_celery.core.keys import Keys
from relier_celery.store import cluster as redis_cluster

__all__ = [
    "Connection",
    "connect",
    "list_lengths",
    "ms",
    "no_master",
    "parse_sentinel_url",
    "script_text",
]

_SCRIPTS = (
    "idem_claim",
    "idem_store",
    "idem_release",
    "lease_renew",
    "receipt",
    "complete",
    "claim",
    "claim_finish",
    "expired",
    "dlq_put",
    "retire",
    "admit",
    "requeue",
)
# Error replies that mean "Redis could not take the write now", not "relier has a bug".
_UNAVAILABLE_ERRORS = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)
# Inside a script the reply comes wrapped ("Error running script ...: -OOM command ...").
_UNAVAILABLE_REPLY = re.compile(
    r"(^|-)(OOM|READONLY|LOADING|BUSY|MASTERDOWN|CLUSTERDOWN|TRYAGAIN|NOREPLICAS) "
)
# Fail fast: a hung Redis call in the consumer would stall every task of the worker.
SOCKET_TIMEOUT = 5.0

T = TypeVar("T")
# redis-py's Sentinel client has no type hints.
_Sentinel: Any = importlib.import_module("redis.sentinel").Sentinel
_MasterNotFound: Any = importlib.import_module("redis.sentinel").MasterNotFoundError
_ClusterError = redis.exceptions.ClusterError


def script_text(name: str) -> str:
    """The source of one of relier's Lua scripts (fetch.py sends ``fetch`` on kombu's own
    connection)."""
    return _script_text(name)


@functools.cache
def _script_text(name: str) -> str:
    return resources.files("relier_celery").joinpath(f"store/scripts/{name}.lua").read_text()


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """kombu's Sentinel spelling, ``sentinel://[user:password@]host:port[/db];sentinel://...``:
    the sentinels, and the master's credentials and database (from the first URL naming them)."""
    nodes: list[tuple[str, int]] = []
    master: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in url.split(";"))):
        parsed = urlsplit(part)
        if parsed.scheme != "sentinel" or not parsed.hostname:
            raise ValueError(f"not a sentinel://host:port URL: {part.split('@')[-1]!r}")
        nodes.append((parsed.hostname, parsed.port or 26379))
        if parsed.password is not None:
            master.setdefault("password", unquote(parsed.password))
        if parsed.username:
            master.setdefault("username", unquote(parsed.username))
        db = parsed.path.strip("/")
        if db:
            master.setdefault("db", int(db))
    return nodes, master


def no_master(masked_url: str, options: Mapping[str, Any], exc: Exception) -> str:
    """One line for redis-py's MasterNotFoundError: which sentinels, which master name, why,
    and the two settings to check."""
    name = options.get("master_name")
    errors = re.findall(r"(?:Error \d+ connecting to|Timeout connecting to) [^,>]*", str(exc))
    why = (
        f"no sentinel answered ({'; '.join(e.strip() for e in errors)})"
        if errors
        else f"the sentinels that answered know no master {name!r}, or it is down"
    )
    return (
        f"relier cannot reach Redis through the sentinels of relier_redis_url {masked_url!r}: "
        f"{why}. Check relier_redis_url and relier_redis_options['master_name'] (or the "
        "broker's URL and broker_transport_options['master_name'] when relier shares it)"
    )


def connect(
    url: str,
    options: Mapping[str, Any] | None = None,
    cluster: Keys | None = None,
    seeds: list[tuple[str, int]] | None = None,
) -> redis.Redis:
    """A client of relier's Redis: a plain URL, the master behind Sentinel (it follows a
    failover: each new connection asks the sentinels where the master is now), or, with
    ``cluster`` (relier's keys), the Redis Cluster behind a seed node or any of ``seeds``
    (cluster.py)."""
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        "health_check_interval": 30,
    }
    extra = dict(options or {})
    if cluster is not None:
        return redis_cluster.connect_cluster(url, extra, cluster, seeds, **common)
    if not url.startswith("sentinel://"):
        return redis.Redis.from_url(url, **{**common, **extra})
    nodes, master = parse_sentinel_url(url)
    name = extra.pop("master_name")
    sentinels = _Sentinel(
        nodes,
        min_other_sentinels=int(extra.pop("min_other_sentinels", 0)),
        sentinel_kwargs=extra.pop("sentinel_kwargs", None)
        or {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": SOCKET_TIMEOUT},
    )
    return cast(
        redis.Redis,
        sentinels.master_for(name, redis_class=redis.Redis, **{**common, **master, **extra}),
    )


def ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


class Connection:
    """A Redis connection of this process under one key prefix, with relier's scripts loaded
    and its error mapping; the command modules of this package extend it."""

    def __init__(
        self,
        url: str,
        keys: Keys,
        options: Mapping[str, Any] | None = None,
        cluster: bool = False,
        broker_url: str = "",
    ) -> None:
        self.url = url
        self.keys = keys
        self.options = dict(options or {})
        self.cluster = keys if cluster else None  # relier_redis_cluster
        self.broker_url = broker_url
        self._lock = threading.Lock()
        self._pid = -1
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Script] = {}

    @property
    def client(self) -> redis.Redis:
        """A client of this process (a forked pool child never reuses its parent's sockets)."""
        if self._pid != os.getpid() or self._client is None:
            with self._lock:
                if self._pid != os.getpid() or self._client is None:
                    # A pool process: its parent's client knows the whole cluster, and the
                    # URL's node may be a primary that died in a failover since.
                    seeds = redis_cluster.known_nodes(self._client)
                    client = connect(self.url, self.options, self.cluster, seeds)
                    self._scripts = {n: client.register_script(_script_text(n)) for n in _SCRIPTS}
                    self._client = client
                    self._pid = os.getpid()
        return self._client

    def meet_cluster(self) -> None:
        """On a Redis Cluster, connect now, before a worker's pool forks: a pool process seeds
        its own client with every node this one met. Best effort: the worker's start reports
        a failure, with the same error."""
        if self.cluster is not None:
            with suppress(RelierError):
                _ = self.client  # the property connects

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        client = self.client
        with self._errors():
            return self._scripts[name](keys=keys, args=args, client=client)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            mapped = self.mapped_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    def mapped_error(self, exc: Exception) -> Exception:
        """Relier's error for a redis-py one: StoreUnavailable when Redis could not be reached
        or could not take the write; any other error as it is."""
        if isinstance(exc, _MasterNotFound):  # a ConnectionError whose text repeats every client
            return StoreUnavailable(no_master(self._masked, self.options, exc))
        # ClusterError: Redis Cluster redirected or refused (TRYAGAIN) past redis-py's retries.
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError | _ClusterError):
            return StoreUnavailable(f"relier cannot reach Redis at {self._masked}: {exc}")
        if isinstance(exc, redis.ResponseError) and (
            # A full (OOM), read-only (failover), loading or busy Redis did not store the
            # write: that is "not recorded", never "done". redis-py raises some of these as
            # their own classes (Redis 7), others only in the message (Redis 6 scripts).
            isinstance(exc, _UNAVAILABLE_ERRORS) or _UNAVAILABLE_REPLY.search(str(exc))
        ):
            return StoreUnavailable(f"Redis at {self._masked} refused the write: {exc}")
        return exc

    @property
    def _masked(self) -> str:
        from relier_celery.core.config import mask_url

        return mask_url(self.url)

    def call(self, fn: Callable[[redis.Redis], T]) -> T:
        """Run a plain command with the same error mapping as the scripts."""
        client = self.client
        with self._errors():
            return fn(client)

    def named_client(self, name: str) -> redis.Redis:
        """A client whose connections carry ``name`` (CLIENT SETNAME), for presence.py."""
        seeds = redis_cluster.known_nodes(self._client)
        return connect(self.url, {**self.options, "client_name": name}, self.cluster, seeds)

    def now_ms(self) -> int:
        """Redis's clock in ms (every process compares ages against the same clock)."""
        sec, usec = self.call(lambda c: c.time())
        return int(sec) * 1000 + int(usec) // 1000

    # -- startup ------------------------------------------------------------------------
    def self_check(self) -> list[str]:
        """Ping Redis (raising StoreUnavailable) and return warnings about its configuration."""
        warnings: list[str] = []
        self.call(lambda c: c.ping())
        self.call(lambda c: redis_cluster.check_start(c, self.cluster is not None, self.broker_url))
        try:
            conf = self.call(
                lambda c: (
                    c.config_get("maxmemory-policy")
                    | c.config_get("appendonly")
                    | c.config_get("save")
                )
            )
        except redis.ResponseError:
            return [
                "relier could not read the Redis config (CONFIG GET refused); check by hand "
                "that maxmemory-policy is noeviction and persistence is on"
            ]
        policy = conf.get("maxmemory-policy", "")
        if policy and policy != "noeviction":
            warnings.append(
                f"Redis maxmemory-policy is {policy!r}: under memory pressure Redis may evict "
                "relier's records and lose in-flight tasks. Set maxmemory-policy noeviction."
            )
        if conf.get("appendonly") != "yes":
            warnings.append(
                "Redis runs without AOF (appendonly no): a Redis restart loses relier's records "
                "(and the broker's queues if they share it). For the guarantees to survive a "
                "Redis restart, set appendonly yes and appendfsync everysec."
            )
        return warnings


def list_lengths(client: redis.Redis, names: list[str]) -> list[int]:
    """LLEN of each list, in one pipelined round trip: the broker's queue depths (kombu's Redis
    transport keeps a queue, and each of its priority levels, as one list)."""
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return [int(n) for n in pipe.execute()]
