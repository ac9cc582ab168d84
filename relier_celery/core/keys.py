"""Every Redis key relier uses, built in one place.

All keys carry the same hash tag, ``{<prefix>}``, so every Lua script touches keys of a single
Redis Cluster slot. Relier's own load is small (a few commands per task), so one slot is
enough; the trade-off is written down in docs/design.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_CALLER_KEY", "Keys", "caller_key"]

# A caller's key (an idempotency key, an admission key) becomes part of a Redis key name.
MAX_CALLER_KEY = 256


def caller_key(value: Any, what: str, error: type[Exception]) -> str:
    """Check a caller-provided key before it goes into a Redis key name; raise ``error``
    naming ``what`` if it is not a non-empty string of at most MAX_CALLER_KEY characters."""
    if not isinstance(value, str) or not value:
        raise error(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_CALLER_KEY:
        raise error(f"{what} may be {MAX_CALLER_KEY} characters at most, got {len(value)}")
    return value


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix."""

    prefix: str = "rl"

    @property
    def base(self) -> str:
        """What every key starts with, hash tag included (receipt.lua builds a holder's
        ``held``, ``claim`` and ``taken`` keys from it)."""
        return f"{self.prefix}:{{{self.prefix}}}"

    @property
    def leases(self) -> str:
        """ZSET: worker id -> lease deadline (ms since the epoch)."""
        return f"{self.base}:leases"

    @property
    def owners(self) -> str:
        """HASH: delivery id (task id and publication, record.delivery_id) ->
        ``worker|retries|resurrections`` of the delivery that holds it."""
        return f"{self.base}:owners"

    def held(self, worker: str) -> str:
        """HASH per worker: ``delivery_id|retries|resurrections`` -> the message record (receipt),
        or a fetch field -> the envelope as taken from its queue (the reliable fetch)."""
        return f"{self.base}:held:{worker}"

    def nap(self, worker: str) -> str:
        """LIST that never exists: a worker that may not fetch blocks on it for a moment."""
        return f"{self.base}:nap:{worker}"

    def claim(self, worker: str) -> str:
        """STRING with a TTL: a scanner's claim on a dead worker's tasks."""
        return f"{self.base}:claim:{worker}"

    def done(self, delivery: str) -> str:
        """STRING with a TTL: newest finished generation of a delivery id (one publication of
        a task), ``retries|resurrections``."""
        return f"{self.base}:done:{delivery}"

    @property
    def dlq(self) -> str:
        """HASH: DLQ entry id -> entry (JSON)."""
        return f"{self.base}:dlq"

    @property
    def dlq_index(self) -> str:
        """ZSET: DLQ entry id -> quarantine time (ms), oldest first."""
        return f"{self.base}:dlq:index"

    def progress(self, task_id: str) -> str:
        """STRING with a TTL: partial results a task saved (JSON), e.g. from a timeout hook."""
        return f"{self.base}:progress:{task_id}"

    def idempotency(self, key: str) -> str:
        """HASH with a TTL: an idempotency key's claim or stored result."""
        return f"{self.base}:idem:{key}"

    @property
    def fence(self) -> str:
        """STRING: the fencing-token counter of idempotency claims."""
        return f"{self.base}:idem-fence"

    def drain(self, worker: str) -> str:
        """HASH with a TTL: a worker's drain progress and accounting."""
        return f"{self.base}:drain:{worker}"

    @property
    def scan_stamp(self) -> str:
        """STRING: time (s since the epoch) of the last completed scan, for visibility."""
        return f"{self.base}:scan"

    def admission_task(self, task_name: str, key: str | None = None) -> str:
        """STRING with a TTL: GCRA theoretical arrival time (us) of a task's rate limit, or of
        one caller's key (tenant, user) of it."""
        if key is None:
            return f"{self.base}:adm:task:{task_name}"
        # The name's length keeps (name, key) pairs apart when names hold ':'.
        return f"{self.base}:adm:key:{len(task_name)}:{task_name}:{key}"

    def admission_queue(self, queue: str) -> str:
        """STRING with a TTL: GCRA theoretical arrival time (us) of a queue's rate limit."""
        return f"{self.base}:adm:queue:{queue}"

    def running(self, worker: str) -> str:
        """HASH with a TTL: task id -> start time (s), the tasks a worker's pool is running,
        rewritten by its heartbeat when the set changes (see relier_celery/observe/activity.py)."""
        return f"{self.base}:running:{worker}"

    @property
    def counters(self) -> str:
        """HASH: counter name -> how often a rare event happened, fleet-wide (counters.py)."""
        return f"{self.base}:counters"

    def process(self, worker: str) -> str:
        """HASH with a TTL: the worker's main process (pid, host, start time; proc.py),
        rewritten with its running set, and how many tasks it completed since it started."""
        return f"{self.base}:proc:{worker}"

    def taken(self, worker: str) -> str:
        """STRING with a TTL: another worker took over a delivery of this one while it looked
        gone (receipt.lua); its next renewal reads it as a lost lease (lease_renew.lua)."""
        return f"{self.base}:taken:{worker}"

    def presence(self, worker: str) -> str:
        """Not a key: the CLIENT SETNAME of the connection a live worker's main process keeps
        open (presence.py), for operators reading CLIENT LIST."""
        return f"{self.prefix}:presence:" + "".join("_" if c.isspace() else c for c in worker)

    @property
    def presence_channels(self) -> str:
        """Not a key: the prefix of the channel a live worker's presence connection is
        subscribed to, its worker id appended. Redis drops the subscription the moment that
        process dies, and a script sees it (PUBSUB NUMSUB): receipt.lua."""
        return f"{self.prefix}:presence:"

    @property
    def recovery(self) -> str:
        """LIST, capped: ``<at ms>:<delay ms>`` per task a scan republished from a dead worker,
        the delay from the worker's last heartbeat to the republish (newest first)."""
        return f"{self.base}:recovery"
