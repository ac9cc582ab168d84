"""A live worker's presence: one Redis connection its main process keeps open, subscribed to
a channel of its own (``keys.presence_channels`` + its worker id) and named after it.

The kernel closes a process's sockets the moment it dies (SIGKILL, OOM), and Redis drops the
subscription with it; the lease only notices a death when it runs out. When a broker
redelivers a message at once because its consumer went away (RabbitMQ closes a dead
consumer's channel), the worker that receives it asks whether the holder is still present:
absent, the redelivery is taken over and runs now instead of after the holder's lease
(inflight.py). Present, it is a duplicate, as before: a live holder never loses a task to it.
A subscription rather than the name alone, because a script sees it (PUBSUB NUMSUB): the
receipt of a redelivery checks whether its holder lives and takes it over in one atomic step
(receipt.lua). The name is for operators reading CLIENT LIST.

Pool processes close their copy of the socket after a fork, so a pool child that outlives its
main process does not keep the worker looking present (it would only delay a takeover).
"""

from __future__ import annotations

import os
import time
import weakref
from typing import TYPE_CHECKING, Any

import redis

from relier_celery.store.cluster import home_connection

if TYPE_CHECKING:
    from relier_celery.store.client import Store

__all__ = ["Presence", "PresenceCache"]

# On a Redis Cluster, how long a worker seen absent stays absent without asking every primary
# again: a burst of redeliveries of one dead worker's messages asks once, not once per message
# (receipt.py). Safe because a worker id names one process start (install.new_worker_id): a
# dead worker never comes back. Kept short all the same: a live worker whose connection Redis
# dropped (a restart) looks absent until its heartbeat reconnects it (the takeover's marker
# fences it: receipt.lua).
ABSENT_FOR = 0.5
# A holder seen present when its message is redelivered is asked again for this long before
# the copy counts as a duplicate (a live holder costs its redeliveries this much, once each).
SETTLE = 0.3
# The waits between two askings: short first, since a dead holder's connection is often
# closed a moment after the broker redelivered (its process was still closing its sockets),
# then doubling up to SETTLE_STEP (a fixed 50 ms step: docs/rabbitmq-recovery.md).
SETTLE_FIRST = 0.002
SETTLE_STEP = 0.05

_open: weakref.WeakSet[Presence] = weakref.WeakSet()


def _forget_in_child() -> None:
    for presence in list(_open):
        presence.forget()


os.register_at_fork(after_in_child=_forget_in_child)


class Presence:
    """The named connection of one worker (opened with its lease, closed with it)."""

    def __init__(self, store: Store, worker: str) -> None:
        self.store = store
        self.name = store.keys.presence(worker)
        self.channel = store.keys.presence_channels + worker
        self._client: redis.Redis | None = None
        self._conn: Any = None
        self._subscribed: Any = None  # the connection subscribed (again on each reconnect)

    def open(self) -> None:
        """Connect under the name, subscribed, now (raises StoreUnavailable)."""
        self._client = self.store.named_client(self.name)
        self._conn = self._client.connection_pool.get_connection()
        _open.add(self)
        self.touch()

    def _subscribe(self, conn: Any) -> None:
        """On every (re)connect of ``conn`` (redis-py calls it back): subscribe again."""
        conn.send_command("SUBSCRIBE", self.channel)
        conn.read_response(push_request=True)  # RESP3 confirms it as a push

    def touch(self) -> None:
        """One PING on the held connection; it reconnects, under the same name and subscribed,
        after Redis dropped it (a restart, a failover), and follows relier's slot on Redis
        Cluster."""
        if self._conn is None:
            return
        conn = self._conn = home_connection(self._client, self._conn, self.store.client)

        def ping(_main: redis.Redis) -> None:
            try:
                if self._subscribed is not conn:
                    # A new connection (open, or home_connection moved it): connected already.
                    conn.register_connect_callback(self._subscribe)
                    self._subscribe(conn)
                    self._subscribed = conn
                conn.send_command("PING")  # subscribed: "PONG" (RESP3) or ["pong", ""]
                conn.read_response()
            except Exception:
                conn.disconnect()
                raise

        self.store.call(ping)  # Redis errors as StoreUnavailable

    def forget(self) -> None:
        """In a forked child: close this process's copy of the socket only (redis-py shuts a
        socket down only in the process that opened it)."""
        conn, self._conn, self._client = self._conn, None, None
        if conn is not None:
            conn.disconnect()

    def close(self) -> None:
        conn, client = self._conn, self._client
        self._conn, self._client = None, None
        _open.discard(self)
        if conn is not None:
            conn.disconnect()
        if client is not None:
            client.close()


class PresenceCache:
    """Which workers are present, asked of Redis at most once per ABSENT_FOR per absent one."""

    def gone(self, worker: str, within: float = SETTLE) -> bool:
        """Whether ``worker`` is absent, or becomes absent within ``within`` seconds: the
        broker may notice a death (and redeliver) a moment before Redis drops the dead
        process's connection."""
        deadline = time.monotonic() + within
        step = SETTLE_FIRST
        while self.present(worker):
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(min(step, deadline - now))
            step = min(step * 2, SETTLE_STEP)
        return True

    def __init__(self, store: Store) -> None:
        self.store = store
        self._absent: dict[str, float] = {}

    def recently_gone(self, but: str) -> str | None:
        """The worker seen absent last, less than ABSENT_FOR ago, other than ``but``: the
        likely holder of the next redelivery, since a dead worker's come in a burst."""
        now = time.monotonic()
        for worker in reversed(self._absent):
            if worker != but and now - self._absent[worker] < ABSENT_FOR:
                return worker
        return None

    def present(self, worker: str) -> bool:
        now = time.monotonic()
        if now - self._absent.get(worker, -ABSENT_FOR) < ABSENT_FOR:
            return False
        if self.store.present(worker):
            self._absent.pop(worker, None)
            return True
        self._absent = {w: t for w, t in self._absent.items() if now - t < ABSENT_FOR}
        self._absent[worker] = now
        return False
