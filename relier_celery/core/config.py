"""Relier's settings: ``relier_*`` keys of the Celery config, parsed once into a frozen dataclass.

Every field has a default and a docstring. An unknown ``relier_*`` key, a wrong type or an
inconsistent pair (a lease that does not outlive the heartbeat) raises :class:`ConfigError`
naming the key and the fix, so a typo stops the worker instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from relier_celery.core.errors import ConfigError
from relier_celery.core.rates import parse_queue_rules
from relier_celery.core.urls import SENTINEL, check_cluster, cluster_seeds, mask_url

__all__ = [
    "RelierConfig",
    "check_timeouts",
    "mask_url",
]

# Defaults are chosen to meet G2 (recovery p50 <= 5 s, p99 <= 10 s): a dead worker's lease
# runs out LEASE_TTL - HEARTBEAT_INTERVAL to LEASE_TTL after its last renewal, and a scanner
# looks every SCAN_INTERVAL, so recovery takes 3 to 5 s plus a republish. A 6 s lease measured
# p50 6.0 s. A live worker paused longer than LEASE_TTL is taken for dead (docs/settings.md).
HEARTBEAT_INTERVAL = 1.0
LEASE_TTL = 4.0
SCAN_INTERVAL = 1.0
# A scanner that claimed a dead worker's tasks and died before republishing them leaves the
# claim to run out after this long; another scanner then takes the tasks again.
CLAIM_TTL = 30.0
MAX_RESURRECTIONS = 3
# Kept longer than the Redis transport's default visibility timeout (3600 s), so a late broker
# redelivery of a finished task is still recognised.
COMPLETED_TTL = 3900.0
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Kubernetes gives a pod 30 s between SIGTERM and SIGKILL: 25 s of drain leaves 5 s to hand off
# what still runs and exit.
DRAIN_TIMEOUT = 25.0
# DLQ entries are kept two weeks: long enough to come back from a holiday and release them.
DLQ_RETENTION = 14 * 24 * 3600.0
# A message from a newer deploy waits 15 s between tries for a worker that knows its schema,
# 20 times (5 minutes: a rolling deploy), before it is quarantined.
SCHEMA_REQUEUE_DELAY = 15.0
SCHEMA_MAX_REQUEUES = 20
# The URL scheme of a Redis behind Sentinel, as kombu spells it.


@dataclasses.dataclass(frozen=True)
class RelierConfig:
    """The effective relier settings of one Celery app."""

    redis_url: str
    """Where relier keeps its state. Defaults to the broker URL when the broker is Redis."""

    redis_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Extra keyword arguments of relier's Redis client. With a ``sentinel://`` URL (kombu's
    spelling, ``sentinel://h1:26379;sentinel://h2:26379``) ``master_name`` is required, and
    ``sentinel_kwargs`` and ``min_other_sentinels`` go to the Sentinel client."""

    redis_cluster: bool = False
    """Whether ``relier_redis_url`` is a seed node of a Redis Cluster (relier's state then sits
    in the one slot of its ``{prefix}`` hash tag; the broker must be another one, e.g.
    RabbitMQ). See docs/redis-cluster.md."""

    prefix: str = "rl"
    """Prefix (and Redis Cluster hash tag) of every relier key."""

    heartbeat_interval: float = HEARTBEAT_INTERVAL
    """Seconds between two renewals of a worker's lease."""

    lease_ttl: float = LEASE_TTL
    """Seconds a lease lives without renewal. A live worker paused longer than this (GC,
    swap, SIGSTOP) is taken for dead and its tasks run again elsewhere."""

    scan_interval: float = SCAN_INTERVAL
    """Seconds between two scans for dead workers by each worker's scanner."""

    scanner_enabled: bool = True
    """Whether each worker runs a scanner. Turn off only if a standalone resurrector runs."""

    reliable_fetch: bool = True
    """Whether a worker on the Redis broker takes each message from its queue into its held
    record in one atomic step (relier_celery/wiring/fetch.py), instead of kombu's BRPOP and unacked
    hash. Needs relier's state in the broker's Redis; off, relier records what kombu hands it."""

    unacked_sweep: bool = True
    """Whether scanners return to their queue the broker deliveries of a worker that died
    before recording them (only for workers without the reliable fetch; see
    relier_celery/recovery/orphans.py)."""

    claim_ttl: float = CLAIM_TTL
    """Seconds a scanner's claim on a dead worker's tasks lasts before another may retake it."""

    max_resurrections: int = MAX_RESURRECTIONS
    """Resurrections a task gets before it is quarantined in the dead letter queue."""

    completed_ttl: float = COMPLETED_TTL
    """Seconds a completion record is kept to recognise late broker redeliveries (the reliable
    fetch off: it keeps none). Keep it above the broker's visibility timeout."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Largest message body relier records at receipt (the reliable fetch off). A larger one runs
    unprotected, with an error log."""

    drain_timeout: float = DRAIN_TIMEOUT
    """Seconds running tasks get to finish when the worker drains (SIGTERM, relier drain);
    what still runs then is handed off to another worker."""

    soft_timeout: float | None = None
    """Default soft timeout of every task (seconds): its on_soft_timeout hook runs then."""

    hard_timeout: float | None = None
    """Default hard timeout of every task (seconds): the task is stopped and fails then."""

    dlq_on_failure: bool = True
    """Whether a task that fails for good (its retries, if any, exhausted) is quarantined in
    the DLQ with its message and traceback. The ``dlq_on_failure`` task option overrides it."""

    dlq_retention: float = DLQ_RETENTION
    """Seconds a DLQ entry is kept before the scanners expire it (with a ``dlq.expired``
    event). Nothing leaves the DLQ earlier unless an operator releases or purges it."""

    schema_requeue_delay: float = SCHEMA_REQUEUE_DELAY
    """Seconds a message with a newer ``relier_schema`` than this worker knows waits before it
    is requeued for a newer worker."""

    schema_max_requeues: int = SCHEMA_MAX_REQUEUES
    """Requeues a message from a newer schema gets before it is quarantined (schema_too_new)."""

    admission: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Admission limits per queue: ``{"emails": "10/s"}`` or ``{"emails": {"rate": "10/s",
    "burst": 20, "max_queue_depth": 10000}}`` (see docs/admission.md)."""

    admission_fail_open: bool = False
    """Whether a dispatch goes through when admission cannot decide (Redis down): False
    refuses it with AdmissionUnavailable, True publishes it with an admission.fail_open event."""

    otel_enabled: bool = False
    """Whether relier exports its events as OpenTelemetry spans and counters (OTLP, configured
    by the standard OTEL_* environment variables; needs the ``otel`` extra). Off: relier does
    not import OpenTelemetry at all."""

    huge_pages: bool = True
    """Whether a worker's main process maps its heap with 2 MB pages once it is ready (Linux
    6.1+): a SIGKILLed worker's memory is freed before its sockets close, faster in 2 MB pages,
    so its broker redelivers and relier takes over sooner (wiring/huge_pages.py)."""

    @classmethod
    def from_app(cls, app: Any) -> RelierConfig:
        """Read and validate the ``relier_*`` settings of a Celery app."""
        conf = app.conf
        settings = {k: conf[k] for k in conf if isinstance(k, str) and k.startswith("relier_")}
        broker = conf.broker_url or ""
        if broker.startswith(SENTINEL) and settings.get("relier_redis_url") is None:
            # Relier's state on the broker's Sentinel-managed Redis: the same master by default.
            transport = conf.broker_transport_options or {}
            options = dict(settings.get("relier_redis_options") or {})
            for name in ("master_name", "sentinel_kwargs", "min_other_sentinels"):
                if name in transport:
                    options.setdefault(name, transport[name])
            settings["relier_redis_options"] = options
        return cls.from_mapping(settings, broker_url=broker)

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], broker_url: str = "") -> RelierConfig:
        """Build a config from ``relier_*`` keys; raise :class:`ConfigError` on any problem."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in settings.items():
            name = key.removeprefix("relier_")
            if name not in fields:
                known = [f"relier_{n}" for n in fields]
                hint = difflib.get_close_matches(key, known, n=1)
                fix = f"did you mean {hint[0]!r}?" if hint else f"known keys: {', '.join(known)}"
                raise ConfigError(f"unknown setting {key!r}: {fix}")
            values[name] = _coerce(key, fields[name], raw)
        if "redis_url" not in values or values["redis_url"] is None:
            if not broker_url.startswith(("redis://", "rediss://", "unix://", SENTINEL)):
                raise ConfigError(
                    "relier_redis_url is not set and the broker is not Redis "
                    f"({mask_url(broker_url) or 'unset'}): set relier_redis_url = 'redis://host:6379/0'"
                )
            values["redis_url"] = broker_url
        config = cls(**values)
        config._check(broker_url)
        return config

    def _check(self, broker_url: str = "") -> None:
        for name in (
            "drain_timeout",
            "heartbeat_interval",
            "lease_ttl",
            "scan_interval",
            "claim_ttl",
            "completed_ttl",
            "dlq_retention",
            "schema_requeue_delay",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"relier_{name} must be above 0, got {getattr(self, name)!r}")
        if self.lease_ttl <= self.heartbeat_interval:
            raise ConfigError(
                f"relier_lease_ttl ({self.lease_ttl} s) must be above relier_heartbeat_interval "
                f"({self.heartbeat_interval} s), or every worker looks dead between heartbeats: "
                f"raise relier_lease_ttl to at least {3 * self.heartbeat_interval} s"
            )
        if self.max_resurrections < 0:
            raise ConfigError(
                f"relier_max_resurrections must be 0 or more, got {self.max_resurrections}"
            )
        check_timeouts(
            "relier_soft_timeout", "relier_hard_timeout", self.soft_timeout, self.hard_timeout
        )
        if self.schema_max_requeues < 0:
            raise ConfigError(
                f"relier_schema_max_requeues must be 0 or more, got {self.schema_max_requeues}"
            )
        if self.max_message_bytes <= 0:
            raise ConfigError(
                f"relier_max_message_bytes must be above 0, got {self.max_message_bytes}"
            )
        parse_queue_rules(self.admission)
        if self.redis_cluster:
            check_cluster(self.redis_url, broker_url)
        cluster_seeds(self.redis_options, self.redis_cluster)
        if self.redis_url.startswith(SENTINEL) and not self.redis_options.get("master_name"):
            raise ConfigError(
                f"relier_redis_url {mask_url(self.redis_url)!r} is a Sentinel URL: set "
                "relier_redis_options = {'master_name': '<the monitored master>'} (or "
                "broker_transport_options['master_name'] when it is the broker's)"
            )
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.prefix):
            raise ConfigError(
                f"relier_prefix {self.prefix!r} may hold only letters, digits, '_', '.' and '-'"
            )

    def describe(self) -> dict[str, Any]:
        """The effective settings as ``relier_*`` keys, passwords masked, for printing."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "redis_url":
                value = mask_url(value)
            elif f.name == "redis_options":
                value = {k: "***" if "password" in k else v for k, v in value.items()}
            out[f"relier_{f.name}"] = value
        return out


def _coerce(key: str, field: dataclasses.Field[Any], raw: Any) -> Any:
    """Turn a raw config value into the field's type, or raise naming the key."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if kind.endswith(" | None"):
        if raw is None:
            return None
        kind = kind.removesuffix(" | None")
    if kind == "float":
        if isinstance(raw, timedelta):
            return raw.total_seconds()
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{key} must be a number of seconds or a timedelta, got {raw!r}")
        return float(raw)
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{key} must be an integer, got {raw!r}")
        return raw
    if kind.startswith("Mapping"):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{key} must be a dict, got {raw!r}")
        return dict(raw)
    if kind == "bool":
        if not isinstance(raw, bool):
            raise ConfigError(f"{key} must be True or False, got {raw!r}")
        return raw
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{key} must be a non-empty string, got {raw!r}")
    return raw


def check_timeouts(soft_name: str, hard_name: str, soft: Any, hard: Any) -> None:
    for name, limit in ((soft_name, soft), (hard_name, hard)):
        if limit is not None and limit <= 0:
            raise ConfigError(f"{name} must be above 0, got {limit!r}")
    if soft is not None and hard is not None and hard <= soft:
        raise ConfigError(
            f"{hard_name} ({hard} s) must be above {soft_name} ({soft} s): the soft timeout "
            "warns before the hard one stops the task"
        )
