"""The one module that talks to Redis.

Every Lua script under ``scripts/`` is loaded once per process and called by SHA (redis-py's
``Script`` reloads it on NOSCRIPT, for instance after a Redis restart). Connection problems
surface as :class:`StoreUnavailable`, never as a silent no-op.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.commands.core import Script

from . import redis_cluster
from .errors import StoreUnavailable
from .keys import Keys
from .record import Generation

__all__ = ["Receipt", "Store", "connect", "parse_sentinel_url", "script_text"]

_SCRIPTS = (
    "idem_claim",
    "idem_store",
    "idem_release",
    "lease_renew",
    "receipt",
    "complete",
    "claim",
    "claim_finish",
    "dlq_put",
    "retire",
    "admit",
    "requeue",
    "take_over",
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
# Drain accounting stays readable for a day.
DRAIN_RECORD_TTL = 86400
# Recovery-time samples kept (the live view's p50/p95 read the last hour of them).
RECOVERY_SAMPLES = 1000
# Fail fast: a hung Redis call in the consumer would stall every task of the worker.
SOCKET_TIMEOUT = 5.0

T = TypeVar("T")
# redis-py's Sentinel client has no type hints.
_Sentinel: Any = importlib.import_module("redis.sentinel").Sentinel
_MasterNotFound: Any = importlib.import_module("redis.sentinel").MasterNotFoundError


@dataclass(frozen=True)
class Receipt:
    """What the receipt script decided for one delivery."""

    recorded: bool
    reason: str = ""
    detail: str = ""


def script_text(name: str) -> str:
    """The source of one of relier's Lua scripts (fetch.py sends ``fetch`` on kombu's own
    connection)."""
    return _script_text(name)


@functools.cache
def _script_text(name: str) -> str:
    return resources.files("relier_celery").joinpath(f"scripts/{name}.lua").read_text()


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
    url: str, options: Mapping[str, Any] | None = None, cluster: Keys | None = None
) -> redis.Redis:
    """A client of relier's Redis: a plain URL, the master behind Sentinel (it follows a
    failover: each new connection asks the sentinels where the master is now), or, with
    ``cluster`` (relier's keys), the Redis Cluster behind a seed node (redis_cluster.py)."""
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        "health_check_interval": 30,
    }
    extra = dict(options or {})
    if cluster is not None:
        return redis_cluster.connect_cluster(url, extra, cluster, **common)
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


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


class Store:
    """Relier's state in Redis, under one key prefix."""

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
                    client = connect(self.url, self.options, self.cluster)
                    self._scripts = {n: client.register_script(_script_text(n)) for n in _SCRIPTS}
                    self._client = client
                    self._pid = os.getpid()
        return self._client

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        client = self.client
        with self._errors():
            return self._scripts[name](keys=keys, args=args, client=client)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except _MasterNotFound as exc:  # a ConnectionError whose text repeats every client
            raise StoreUnavailable(no_master(self._masked, self.options, exc)) from exc
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError) as exc:
            # ClusterError: Redis Cluster redirected or refused (TRYAGAIN) past redis-py's retries.
            raise StoreUnavailable(f"relier cannot reach Redis at {self._masked}: {exc}") from exc
        except redis.ResponseError as exc:
            # A full (OOM), read-only (failover), loading or busy Redis did not store the
            # write: that is "not recorded", never "done". redis-py raises some of these as
            # their own classes (Redis 7), others only in the message (Redis 6 scripts).
            if isinstance(exc, _UNAVAILABLE_ERRORS) or _UNAVAILABLE_REPLY.search(str(exc)):
                raise StoreUnavailable(f"Redis at {self._masked} refused the write: {exc}") from exc
            raise

    @property
    def _masked(self) -> str:
        from .config import mask_url

        return mask_url(self.url)

    def call(self, fn: Callable[[redis.Redis], T]) -> T:
        """Run a plain command with the same error mapping as the scripts."""
        client = self.client
        with self._errors():
            return fn(client)

    def named_client(self, name: str) -> redis.Redis:
        """A client whose connections carry ``name`` (CLIENT SETNAME), for presence.py."""
        return connect(self.url, {**self.options, "client_name": name}, self.cluster)

    def connection_names(self) -> set[str]:
        """The names of the connections Redis has now (CLIENT LIST; one round trip)."""
        clients = self.call(lambda c: c.client_list(_type="normal"))
        return {str(c.get("name", "")) for c in clients}

    # -- leases -------------------------------------------------------------------------
    def renew_lease(self, worker: str, ttl: float) -> tuple[int, int]:
        """Renew a lease; return (previous deadline ms, -1 without one, or -2 when a delivery
        was taken over from this worker; server time ms)."""
        prev, now = self._run(
            "lease_renew", [self.keys.leases, self.keys.taken(worker)], [worker, _ms(ttl)]
        )
        return int(prev), int(now)

    def retire(self, worker: str) -> int:
        """A worker stops: forget it, or expire its lease at once if it still holds records."""
        return int(self._run("retire", [self.keys.leases, self.keys.held(worker)], [worker]))

    def expired_workers(self) -> list[str]:
        """Workers whose lease deadline has passed, by the Redis server's clock."""

        def scan(c: redis.Redis) -> list[str]:
            secs, micros = c.time()
            now = secs * 1000 + micros // 1000
            return cast(list[str], c.zrangebyscore(self.keys.leases, "-inf", f"({now}"))

        return self.call(scan)

    def expired_leases(self) -> dict[str, float]:
        """Workers whose lease deadline has passed, with that deadline (ms)."""

        def scan(c: redis.Redis) -> list[tuple[str, float]]:
            secs, micros = c.time()
            now = secs * 1000 + micros // 1000
            return cast(
                list[tuple[str, float]],
                c.zrangebyscore(self.keys.leases, "-inf", f"({now}", withscores=True),
            )

        return dict(self.call(scan))

    def leases(self) -> dict[str, float]:
        """Every known worker with its lease deadline in ms."""
        pairs = self.call(lambda c: c.zrange(self.keys.leases, 0, -1, withscores=True))
        return dict(cast(list[tuple[str, float]], pairs))

    # -- the inflight registry ----------------------------------------------------------
    def record(self, delivery: str, worker: str, gen: Generation, record: str) -> Receipt:
        """Record a received delivery under ``worker``, unless it is a duplicate. ``delivery``
        is its delivery id (:func:`~relier_celery.record.delivery_id`): the task id and its
        publication id, so a new publication under the same task id is never a duplicate."""
        k = self.keys
        out = self._run(
            "receipt",
            [k.owners, k.done(delivery), k.held(worker)],
            [delivery, worker, gen.retries, gen.resurrections, record],
        )
        if int(out[0]) == 1:
            return Receipt(True)
        return Receipt(False, str(out[1]), str(out[2]))

    def take_over(
        self, delivery: str, seen: str, worker: str, gen: Generation, record: str, ttl: float
    ) -> bool:
        """Move a delivery from a holder that is gone (``seen``: its owners entry) to
        ``worker``; False when it is a duplicate after all (take_over.lua). ``ttl``: how long
        the holder's marker waits for a renewal that fences it (a few leases)."""
        holder = seen.rsplit("|", 2)[0]
        k = self.keys
        out = self._run(
            "take_over",
            [k.owners, k.held(holder), k.claim(holder), k.held(worker), k.taken(holder)],
            [delivery, seen, worker, gen.retries, gen.resurrections, record, _ms(ttl)],
        )
        return bool(out)

    def complete(
        self, delivery: str, worker: str, gen: Generation, done_ttl: float, finished: bool = True
    ) -> bool:
        """Remove a delivery's record; return whether it was still held. ``finished=False``
        when the broker gets the message back (so its redelivery is not a duplicate)."""
        k = self.keys
        removed = self._run(
            "complete",
            [k.owners, k.done(delivery), k.held(worker)],
            [
                delivery,
                worker,
                gen.retries,
                gen.resurrections,
                _ms(done_ttl),
                "1" if finished else "0",
            ],
        )
        return bool(removed)

    def ack(self, worker: str, field: str) -> bool:
        """A fetched delivery reached a final state: drop its record (the reliable fetch's
        acknowledgement, one round trip; nothing about it outlives it)."""
        return bool(self.call(lambda c: c.hdel(self.keys.held(worker), field)))

    def ack_many(self, worker: str, fields: list[str]) -> int:
        """Drop many fetched records in one round trip (absent ones are no-ops)."""
        return int(self.call(lambda c: c.hdel(self.keys.held(worker), *fields)))

    def requeue(self, worker: str, field: str, queue_key: str, envelope: str, head: bool) -> bool:
        """Move a fetched delivery back into its queue list (at the head, or the tail), in one
        step with dropping its record; False if the worker no longer held it."""
        out = self._run(
            "requeue",
            [self.keys.held(worker), queue_key],
            [field, envelope, "head" if head else "tail"],
        )
        return bool(out)

    def known(self, deliveries: set[str]) -> set[str]:
        """The delivery ids some worker holds or recently finished (one pipelined round
        trip)."""
        ids = sorted(deliveries)
        if not ids:
            return set()

        def ask(c: redis.Redis) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            for delivery in ids:
                pipe.hexists(self.keys.owners, delivery)
                pipe.exists(self.keys.done(delivery))
            return list(pipe.execute())

        flags = self.call(ask)
        return {t for i, t in enumerate(ids) if flags[2 * i] or flags[2 * i + 1]}

    def held(self, worker: str) -> dict[str, str]:
        """Every record a worker holds, by ``delivery_id|retries|resurrections`` (receipt) or
        fetch field."""
        return cast(dict[str, str], self.call(lambda c: c.hgetall(self.keys.held(worker))))

    # -- resurrection -------------------------------------------------------------------
    def claim(self, dead: str, scanner: str, ttl: float) -> dict[str, str]:
        """Claim a dead worker's records for one scanner; empty if alive or already claimed."""
        k = self.keys
        flat = self._run(
            "claim", [k.leases, k.held(dead), k.claim(dead)], [dead, scanner, _ms(ttl)]
        )
        return dict(zip(flat[::2], flat[1::2], strict=True))

    def take(self, worker: str, field: str) -> bool:
        """Remove one record after it was republished."""
        return bool(self.call(lambda c: c.hdel(self.keys.held(worker), field)))

    def claim_finish(self, dead: str, scanner: str) -> int:
        """End a claim; return how many records are left."""
        k = self.keys
        return int(
            self._run("claim_finish", [k.leases, k.held(dead), k.claim(dead)], [dead, scanner])
        )

    def save_progress(self, task_id: str, data: str, ttl: float) -> None:
        self.call(lambda c: c.set(self.keys.progress(task_id), data, px=_ms(ttl)))

    def load_progress(self, task_id: str) -> str | None:
        return cast(str | None, self.call(lambda c: c.get(self.keys.progress(task_id))))

    # -- idempotency --------------------------------------------------------------------
    def idem_claim(
        self, key: str, lease: str, owner: str, args_hash: str, ttl: float, on_crash: str = "rerun"
    ) -> list[Any]:
        k = self.keys
        return list(
            self._run(
                "idem_claim",
                [k.idempotency(key), k.leases, k.fence],
                [lease, owner, args_hash, _ms(ttl), on_crash],
            )
        )

    def idem_store(self, key: str, token: str, result: str, ttl: float) -> bool:
        out = self._run("idem_store", [self.keys.idempotency(key)], [token, result, _ms(ttl)])
        return bool(out)

    def idem_release(self, key: str, token: str) -> bool:
        return bool(self._run("idem_release", [self.keys.idempotency(key)], [token]))

    # -- admission ----------------------------------------------------------------------
    def admit(self, buckets: list[tuple[str, int, int]], cost: int = 1) -> tuple[int, ...]:
        """One GCRA decision over ``(key, interval_us, burst)`` buckets, all or nothing; return
        (allowed 0/1, retry_after_ms, remaining, reset_ms, index of the refusing bucket)."""
        keys = [key for key, _, _ in buckets]
        args: list[Any] = [cost]
        for _, interval_us, burst in buckets:
            args += [interval_us, burst]
        return tuple(int(x) for x in self._run("admit", keys, args))

    def drain_update(self, worker: str, fields: dict[str, Any]) -> None:
        key = self.keys.drain(worker)

        def write(c: redis.Redis) -> None:
            pipe = c.pipeline(transaction=False)
            pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
            pipe.expire(key, DRAIN_RECORD_TTL)
            pipe.execute()

        self.call(write)

    def drain_status(self, worker: str) -> dict[str, str]:
        return cast(dict[str, str], self.call(lambda c: c.hgetall(self.keys.drain(worker))))

    def mark_scan(self) -> None:
        self.call(lambda c: c.set(self.keys.scan_stamp, c.time()[0]))

    # -- visibility (relier_celery/inspect.py, activity.py, counters.py) -----------------
    def set_running(
        self,
        worker: str,
        started: dict[str, float],
        ttl: float,
        process: Mapping[str, str] | None = None,
    ) -> None:
        """Replace the set of tasks a worker's pool runs (task id -> start time, s), and its
        process record (``process``: pid, host, start, completed), in one round trip (MULTI,
        so a reader never sees it half written)."""
        key = self.keys.running(worker)

        def write(c: redis.Redis) -> None:
            pipe = c.pipeline(transaction=True)
            pipe.delete(key)
            # "@": when the set was written, so an empty set still says "nothing runs".
            fields: dict[str | bytes, str | float] = {"@": time.time()}
            fields.update(started)
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.pexpire(key, _ms(ttl))
            if process:
                proc = self.keys.process(worker)
                pipe.hset(proc, mapping=dict(process))  # type: ignore[arg-type]
                pipe.pexpire(proc, _ms(ttl))
            pipe.execute()

        self.call(write)

    def add_recovery(self, last_alive_ms: float, count: int) -> None:
        """Record ``count`` tasks republished now from a worker last alive at
        ``last_alive_ms`` (Redis clock): one sample each, the list capped."""
        if count <= 0:
            return
        now = self.now_ms()
        sample = f"{now}:{max(int(now - last_alive_ms), 0)}"

        def write(c: redis.Redis) -> None:
            pipe = c.pipeline(transaction=False)
            pipe.lpush(self.keys.recovery, *([sample] * count))
            pipe.ltrim(self.keys.recovery, 0, RECOVERY_SAMPLES - 1)
            pipe.execute()

        self.call(write)

    def add_counters(self, increments: dict[str, int]) -> None:
        """Add to the fleet-wide event counters (one pipelined round trip)."""

        def write(c: redis.Redis) -> None:
            pipe = c.pipeline(transaction=False)
            for name, n in increments.items():
                pipe.hincrby(self.keys.counters, name, n)
            pipe.execute()

        if increments:
            self.call(write)

    def counters(self) -> dict[str, int]:
        raw = cast(dict[str, str], self.call(lambda c: c.hgetall(self.keys.counters)))
        return {k: int(v) for k, v in raw.items()}

    def overview(self) -> dict[str, Any]:
        """What a registry snapshot starts from, in one pipelined round trip: the server time
        (s), every lease (worker -> deadline ms), the last scan time, the counters and the
        recovery samples ((at, delay) in s)."""

        def read(c: redis.Redis) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            pipe.time()
            pipe.zrange(self.keys.leases, 0, -1, withscores=True)
            pipe.get(self.keys.scan_stamp)
            pipe.hgetall(self.keys.counters)
            pipe.lrange(self.keys.recovery, 0, -1)
            return list(pipe.execute())

        (secs, micros), leases, scan, counters, recovery = self.call(read)
        samples = []
        for item in recovery:
            at, _, delay = str(item).partition(":")
            try:
                samples.append((int(at) / 1000.0, int(delay) / 1000.0))
            except ValueError:
                continue
        return {
            "now": secs + micros / 1e6,
            "leases": dict(leases),
            "last_scan": float(scan) if scan else None,
            "counters": {k: int(v) for k, v in counters.items()},
            "recovery": samples,
        }

    def workers_detail(self, workers: list[str]) -> dict[str, dict[str, Any]]:
        """Per worker: its records, running set, drain progress, scanner claim and process
        record, for every worker in one pipelined round trip."""

        def read(c: redis.Redis) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            for w in workers:
                pipe.hgetall(self.keys.held(w))
                pipe.hgetall(self.keys.running(w))
                pipe.hgetall(self.keys.drain(w))
                pipe.get(self.keys.claim(w))
                pipe.hgetall(self.keys.process(w))
            return list(pipe.execute())

        flat = self.call(read) if workers else []
        n = 5
        return {
            w: {
                "held": flat[n * i],
                "running": {k: float(v) for k, v in flat[n * i + 1].items()},
                "drain": flat[n * i + 2],
                "claim": flat[n * i + 3],
                "process": flat[n * i + 4],
            }
            for i, w in enumerate(workers)
        }

    # -- dead letter queue --------------------------------------------------------------
    def dlq_put(
        self,
        entry_id: str,
        entry: str,
        at_ms: int,
        delivery: str,
        gen: Generation,
        done_ttl: float,
        worker: str | None = None,
        field: str | None = None,
    ) -> None:
        """Write a DLQ entry and, in the same step, drop the record it came from (and, by its
        delivery id, its owner entry; its done record makes a late copy a duplicate)."""
        k = self.keys
        self._run(
            "dlq_put",
            [k.dlq, k.dlq_index, k.held(worker or "-"), k.done(delivery), k.owners],
            [
                entry_id,
                entry,
                at_ms,
                field or "",
                f"{gen.retries}|{gen.resurrections}",
                _ms(done_ttl),
                delivery,
                f"{worker}|{gen.retries}|{gen.resurrections}" if worker else "",
            ],
        )

    def dlq_entries(self) -> dict[str, str]:
        return cast(dict[str, str], self.call(lambda c: c.hgetall(self.keys.dlq)))

    def dlq_get(self, entry_id: str) -> str | None:
        return cast(str | None, self.call(lambda c: c.hget(self.keys.dlq, entry_id)))

    def dlq_remove(self, entry_ids: list[str]) -> int:
        """Remove entries (after a release or a purge); return how many were there."""
        if not entry_ids:
            return 0
        k = self.keys

        def remove(c: redis.Redis) -> int:
            pipe = c.pipeline(transaction=True)
            pipe.hdel(k.dlq, *entry_ids)
            pipe.zrem(k.dlq_index, *entry_ids)
            return int(pipe.execute()[0])

        return self.call(remove)

    def dlq_older_than(self, at_ms: int, limit: int = 1000) -> list[str]:
        """Ids of entries quarantined before ``at_ms`` (oldest first)."""
        return cast(
            list[str],
            self.call(
                lambda c: c.zrangebyscore(self.keys.dlq_index, "-inf", at_ms, start=0, num=limit)
            ),
        )

    def forget_done(self, delivery: str) -> None:
        """Drop a delivery id's done record, so a released copy is not taken for a
        duplicate."""
        self.call(lambda c: c.delete(self.keys.done(delivery)))

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
