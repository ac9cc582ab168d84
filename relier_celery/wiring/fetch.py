"""The reliable fetch: relier owns the delivery on the Redis broker.

kombu's Redis transport takes a message with ``BRPOP`` (out of Redis, into a socket buffer)
and writes it to its ``unacked`` hash in a second round trip; a worker killed in between loses
the message without a trace, and the ``unacked`` hash later redelivers, after its visibility
timeout, whatever relier already resurrected or finished. Here, for the consumer's own
connection only:

- **fetch**: one ``EVALSHA`` of ``fetch.lua`` moves the next message from the worker's queue
  lists (kombu's keys, priority steps and rotation, unchanged) into the worker's held hash,
  under its lease. When every list is empty the channel blocks on ``BLMOVE q q RIGHT RIGHT``
  (a no-op move that returns as soon as the list has a message) and fetches again.
- **ack**: Celery's ack is local for a task relier tracks; the record goes when the task
  reaches a final state (``Inflight``: one ``HDEL``). Anything acked without relier taking it
  over (a message Celery drops) loses its record at the ack, as with kombu.
- **reject(requeue=True)**: the record moves back to its queue's tail (as kombu does it) in one
  step (``requeue.lua``). Resurrections and hand-offs move it to the head (``Resurrector``).
- no ``unacked`` hash and no visibility timeout for these deliveries: nothing redelivers them.

Publishing and the queue layout are kombu's own, so publishers and workers without relier
keep working on the same queues. fetch_transport.py gives the consumer's connection this
channel.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import secrets
import time
from dataclasses import dataclass
from queue import Empty
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from relier_celery.core import events
from relier_celery.core.headers import FETCH_EPOCH, FETCH_QUEUE, PROTECTED
from relier_celery.core.headers import FETCH_FIELD as FIELD
from relier_celery.core.record import FETCHED_MARK
from relier_celery.store.client import script_text
from relier_celery.wiring import kombu_guard

__all__ = ["FIELD", "RelierChannel", "RelierQoS", "kombu_redis"]

logger = logging.getLogger("relier_celery")

# Typed as Any: this subclasses kombu's internals, which its type hints do not describe.
kombu_redis: Any = importlib.import_module("kombu.transport.redis")
virtual: Any = importlib.import_module("kombu.transport.virtual")

# With several queues the channel can block on one list only: it waits this long on one, then
# fetches across all of them again, so an idle worker picks up any queue's message within it.
MULTI_QUEUE_WAIT = 0.1
# A worker whose lease is missing or being claimed fetches nothing; it looks again after this.
LEASE_NAP = 0.5

# Fields of one worker incarnation's held hash (its worker id is unique per process).
_fields = itertools.count(1)


@dataclass(frozen=True)
class _Fetched:
    field: str
    queue_key: str
    envelope: str


class RelierQoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's QoS with relier's held hash in place of the ``unacked`` hash."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        if FIELD in (message.delivery_info or {}):
            virtual.QoS.append(self, message, delivery_tag)  # already held in Redis
        else:
            super().append(message, delivery_tag)

    def _take(self, delivery_tag: Any) -> tuple[_Fetched | None, bool]:
        fetched = self.channel.rl_fetched.pop(delivery_tag, None)
        message = self._delivered.get(delivery_tag)
        protected = bool(message is not None and (message.delivery_info or {}).get(PROTECTED))
        return fetched, protected

    def ack(self, delivery_tag: Any) -> None:
        fetched, protected = self._take(delivery_tag)
        if fetched is None:
            return super().ack(delivery_tag)  # type: ignore[no-any-return]
        if not protected:
            with self.channel.conn_or_acquire() as client:
                client.hdel(self.channel.rl_held_key, fetched.field)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        fetched, protected = self._take(delivery_tag)
        if fetched is None:
            return super().reject(delivery_tag, requeue)  # type: ignore[no-any-return]
        if requeue:
            self.channel.rl_runtime.store.requeue(
                self.channel.rl_runtime.worker_id,
                fetched.field,
                fetched.queue_key,
                marked_redelivered(fetched.envelope),
                head=False,
            )
        elif not protected:
            with self.channel.conn_or_acquire() as client:
                client.hdel(self.channel.rl_held_key, fetched.field)
        virtual.QoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        # Fetched messages stay in the held hash when the channel closes: relier hands back
        # the reserved ones (consumer restart, shutdown); running ones complete as usual.
        self._delivered.clear()


class RelierChannel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel whose consuming read is relier's atomic fetch."""

    QoS = RelierQoS
    rl_runtime: Any = None  # set on the per-runtime subclass (reliable_transport)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        runtime = self.rl_runtime
        keys = runtime.store.keys
        self.rl_fetched: dict[Any, _Fetched] = {}
        self.rl_held_key = keys.held(runtime.worker_id)
        self._rl_fixed = [keys.leases, keys.claim(runtime.worker_id), self.rl_held_key]
        self._rl_nap_key = keys.nap(runtime.worker_id)
        self._rl_prefix = f"{FETCHED_MARK}{runtime.worker_id}\n"
        self._rl_text = script_text("fetch")
        self._rl_sha = ""
        self._rl_mode = "fetch"  # or "wait" (every list was empty) or "nap" (no lease)
        self._rl_epoch = 0  # the lease epoch when the last fetch was sent
        self._rl_sent: tuple[str, str] = ("", "")  # (what was sent, field or key)
        self._rl_lease_lost = False
        self.rl_active = _same_redis(self, runtime)

    def _load_script(self) -> None:
        with self.conn_or_acquire() as client:
            self._rl_sha = _text(client.script_load(self._rl_text))

    def _keys(self, queues: list[str]) -> list[str]:
        keys = [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]
        return [self.global_keyprefix + k for k in keys] if self.global_keyprefix else keys

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self.rl_active:
            return super()._brpop_start(timeout)  # type: ignore[no-any-return]
        if timeout is None:  # kombu 5.6+ reads Channel.brpop_timeout; 5.5 has none (1 s)
            timeout = getattr(self, "brpop_timeout", 1)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        keys = self._keys(queues)
        if self._rl_mode == "fetch":
            if not self._rl_sha:
                self._load_script()
            field = f"f{next(_fields)}"
            args: list[Any] = [
                "EVALSHA",
                self._rl_sha,
                len(self._rl_fixed) + len(keys),
                *self._rl_fixed,
                *keys,
                self.rl_runtime.worker_id,
                field,
                self._rl_prefix,
            ]
            self._rl_sent = ("EVALSHA", field)
            self._rl_epoch = self.rl_runtime.lease.clock.epoch
        elif self._rl_mode == "wait":
            wait = min(timeout or 1, MULTI_QUEUE_WAIT) if len(queues) > 1 else (timeout or 1)
            args = ["BLMOVE", keys[0], keys[0], "RIGHT", "RIGHT", wait]
            self._rl_sent = ("BLMOVE", keys[0])
        else:
            args = ["BLPOP", self._rl_nap_key, LEASE_NAP]
            self._rl_sent = ("BLPOP", "")
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self.client.connection.send_command(*args)
        return None

    def _brpop_read(self, **options: Any) -> bool:
        if not self.rl_active:
            return bool(super()._brpop_read(**options))
        command, field = self._rl_sent
        try:
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except NoScriptError:
                self._rl_sha = ""  # Redis restarted or flushed its scripts: load it again
                raise Empty() from None
            except ResponseError as exc:
                # OOM, READONLY (a failover), LOADING: nothing was taken; try again shortly.
                logger.error("relier: fetch refused by Redis (%s); retrying", exc)
                self._rl_mode = "nap"
                raise Empty() from None
            if command != "EVALSHA":
                self._rl_mode = "fetch"
                raise Empty()
            status = int(reply[0])
            if status == 1:
                self._rl_mode = "fetch"
                self._deliver_fetched(field, _text(reply[1]), _text(reply[2]))
                return True
            self._rl_mode = "wait" if status == 2 else "nap"
            self._lease_state(lost=status == 0)
            raise Empty()
        finally:
            self._in_poll = None
            flush_reauth = getattr(self, "_flush_brpop_reauth", None)  # kombu 5.6+
            if flush_reauth is not None:
                flush_reauth()

    def _deliver_fetched(self, field: str, key: str, text: str) -> None:
        queue = key[len(self.global_keyprefix) :] if self.global_keyprefix else key
        queue = queue.rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        payload = kombu_redis.loads(text)  # kombu_guard's tolerant loads, when installed
        tag = None
        if kombu_guard.problem(payload) is None:
            tag = payload["properties"]["delivery_tag"]
            info = payload["properties"]["delivery_info"]
            info[FIELD], info[FETCH_QUEUE] = field, key
            info[FETCH_EPOCH] = self._rl_epoch
            self.rl_fetched[tag] = _Fetched(field, key, text)
        # An envelope kombu cannot read is quarantined by kombu_guard, which then drops this
        # held field in the same step as it writes the DLQ entry.
        with kombu_guard.fetched_slot(self.rl_runtime.worker_id, field) as slot:
            self.connection._deliver(payload, queue)
        if slot.quarantined and tag is not None:
            self.rl_fetched.pop(tag, None)

    def _lease_state(self, lost: bool) -> None:
        if lost and not self._rl_lease_lost:
            events.emit(
                events.FETCH_PAUSED,
                f"worker {self.rl_runtime.worker_id} has no live lease (expired, or a scanner "
                "is taking its tasks): it fetches nothing until the lease is renewed",
                worker=self.rl_runtime.worker_id,
            )
        elif not lost and self._rl_lease_lost:
            events.emit(
                events.FETCH_RESUMED,
                f"worker {self.rl_runtime.worker_id} holds its lease again and fetches",
                worker=self.rl_runtime.worker_id,
            )
        self._rl_lease_lost = lost


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _same_redis(channel: Any, runtime: Any) -> bool:
    """Whether relier's store is the broker's Redis (same server and database), told by a
    token written through one and read through the other, whatever the URLs' spelling."""
    if not runtime.config.reliable_fetch:
        return False
    key = runtime.store.keys.nap(runtime.worker_id) + ":probe"
    token = secrets.token_hex(8)
    runtime.store.call(lambda c: c.set(key, token, ex=30))
    with channel.conn_or_acquire() as client:
        seen = _text(client.get(key) or b"")
        client.delete(key)
    if seen == token:
        return True
    runtime.resurrector.unacked.enabled = runtime.config.unacked_sweep
    events.emit(
        events.CONFIG_WARNING,
        "relier_reliable_fetch is on, but relier_redis_url is not the broker's Redis: the "
        "fetch must move messages within one Redis. Falling back to recording what kombu "
        "delivers (kombu's BRPOP window stays open). Point relier_redis_url at the broker, "
        "or set relier_reliable_fetch = False to silence this.",
        worker=runtime.worker_id,
    )
    return False


def marked_redelivered(envelope: str) -> str:
    """The envelope with ``redelivered`` set, as kombu's Redis transport marks a message it
    puts back (a task may tell its second delivery by ``request.delivery_info``); an envelope
    of another shape goes back unchanged."""
    try:
        payload = json.loads(envelope)
        payload["headers"]["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True
    except (ValueError, KeyError, TypeError):
        return envelope
    return json.dumps(payload)
