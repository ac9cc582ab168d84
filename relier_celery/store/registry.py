"""Redis commands of the in-flight registry (inflight.py, resurrect.py): record a delivery on
receipt, drop it on completion, hand it back to its queue, and claim a dead worker's records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.exceptions import NoScriptError

from relier_celery.core.headers import CRASHES_HEADER
from relier_celery.core.record import Generation
from relier_celery.store.connection import Connection, ms

__all__ = ["Receipt", "ReceiptCall", "RegistryCommands"]

# The keys and arguments of one receipt.lua call.
ReceiptCall = tuple[list[str], list[Any]]


@dataclass(frozen=True)
class Receipt:
    """What the receipt script decided for one delivery."""

    recorded: bool
    reason: str = ""
    detail: str = ""
    # For "held" in takeover mode: whether the holder's presence connection is open on the
    # node the script ran on (its process lives).
    holder_present: bool = True
    # For "held" by the receiver itself: its held hash has this very delivery's record.
    own: bool = False


class RegistryCommands(Connection):
    """The deliveries each worker holds, and the claims on a dead worker's."""

    def record(self, delivery: str, worker: str, gen: Generation, record: str) -> Receipt:
        """Record a received delivery under ``worker``, unless it is a duplicate. ``delivery``
        is its delivery id (:func:`~relier_celery.core.record.delivery_id`): the task id and its
        publication id, so a new publication under the same task id is never a duplicate."""
        return _receipt(self._run("receipt", *self.receipt_call(delivery, worker, gen, record)))

    def take_over(
        self,
        delivery: str,
        gone: str,
        worker: str,
        gen: Generation,
        record: str,
        crashes: int,
        ttl: float,
    ) -> Receipt:
        """Receive a broker's redelivery of ``delivery`` (receipt.lua, takeover mode), taking
        it over from its holder when that worker is gone: ``gone`` is "*" for any holder whose
        presence channel has no subscriber (one Redis server), else the holder the caller saw
        gone ("" none: only report). ``record``: the receiver's, counting ``crashes`` + 1,
        ``crashes`` being the count expected in the holder's record. ``ttl``: how long the
        holder's marker waits for a renewal that fences it (a few leases). The reason is
        "taken" (the holder in ``detail``); "crashes" (the holder's count in ``detail``) or
        "free" (nobody holds it) when nothing changed; "done" or "held" for a duplicate."""
        call = self.receipt_call(delivery, worker, gen, record, (gone, crashes, ttl))
        return _receipt(self._run("receipt", *call))

    def receipt_call(
        self,
        delivery: str,
        worker: str,
        gen: Generation,
        record: str,
        takeover: tuple[str, int, float] | None = None,
    ) -> ReceiptCall:
        """The keys and arguments of one receipt.lua call: :meth:`record`, or with
        ``takeover`` = (gone, crashes, ttl) :meth:`take_over`."""
        k = self.keys
        args: list[Any] = [delivery, worker, gen.retries, gen.resurrections, record]
        if takeover is not None:
            gone, crashes, ttl = takeover
            args += [k.base, k.presence_channels, gone, crashes, CRASHES_HEADER, ms(ttl)]
        return [k.owners, k.done(delivery), k.held(worker)], args

    def receipt(self, call: ReceiptCall) -> Receipt:
        """One receipt.lua call built by :meth:`receipt_call`."""
        return _receipt(self._run("receipt", *call))

    def receipts(self, calls: Sequence[ReceiptCall]) -> list[Receipt | Exception]:
        """Many receipt.lua calls in one round trip (pipelined: each call atomic on its own),
        for messages the broker delivered together. A call Redis refused gives its error in
        its place (StoreUnavailable for a full, read-only or loading Redis); a lost connection
        raises StoreUnavailable for all of them (any of them may have been written)."""

        def send(c: redis.Redis, which: Sequence[int]) -> list[Any]:
            script = self._scripts["receipt"]
            pipe = c.pipeline(transaction=False)
            for i in which:
                keys, args = calls[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return list(pipe.execute(raise_on_error=False))

        def run(c: redis.Redis) -> list[Any]:
            out = send(c, range(len(calls)))
            # A Redis restarted (or flushed of scripts) runs none of them: load, send again.
            missing = [i for i, o in enumerate(out) if isinstance(o, NoScriptError)]
            if missing:
                c.script_load(self._scripts["receipt"].script)
                for i, again in zip(missing, send(c, missing), strict=True):
                    out[i] = again
            return out

        return [
            self.mapped_error(o) if isinstance(o, Exception) else _receipt(o)
            for o in self.call(run)
        ]

    def present(self, worker: str) -> bool:
        """Whether ``worker``'s presence connection is open (presence.py; one round trip).
        On a Redis Cluster every primary is asked: after relier's slot moved, a presence
        connection follows it only at its worker's next heartbeat."""
        channel = self.keys.presence_channels + worker
        where = {} if self.cluster is None else {"target_nodes": "primaries"}
        counts = self.call(lambda c: c.pubsub_numsub(channel, **where))
        return any(int(n) > 0 for _, n in counts)

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
                ms(done_ttl),
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

    def still_held(self, worker: str, fields: list[str]) -> list[bool]:
        """Whether each of ``fields`` is still in ``worker``'s held hash (one round trip)."""
        if not fields:
            return []
        found = self.call(lambda c: c.hmget(self.keys.held(worker), fields))
        return [value is not None for value in found]

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

    def claim(self, deads: Sequence[str], scanner: str, ttl: float) -> dict[str, dict[str, str]]:
        """Claim dead workers' records for one scanner, in one round trip: each worker claimed
        with its records; a worker alive, already claimed, or holding nothing is left out."""
        k = self.keys
        keys = [k.leases]
        for dead in deads:
            keys += [k.held(dead), k.claim(dead)]
        lists = self._run("claim", keys, [scanner, ms(ttl), *deads]) if deads else []
        return {
            dead: dict(zip(flat[::2], flat[1::2], strict=True))
            for dead, flat in zip(deads, lists, strict=True)
            if flat
        }

    def take(self, fields: Mapping[str, Sequence[str]]) -> None:
        """Remove records after they were republished (worker -> fields), in one round
        trip."""

        def drop(c: redis.Redis) -> None:
            pipe = c.pipeline(transaction=False)
            for worker, names in fields.items():
                if names:
                    pipe.hdel(self.keys.held(worker), *names)
            pipe.execute()

        if any(fields.values()):
            self.call(drop)

    def claim_finish(self, deads: Sequence[str], scanner: str) -> dict[str, int]:
        """End claims; return how many records each worker has left."""
        k = self.keys
        keys = [k.leases]
        for dead in deads:
            keys += [k.held(dead), k.claim(dead)]
        left = self._run("claim_finish", keys, [scanner, *deads]) if deads else []
        return dict(zip(deads, (int(n) for n in left), strict=True))

    def forget_done(self, delivery: str) -> None:
        """Drop a delivery id's done record, so a released copy is not taken for a
        duplicate."""
        self.call(lambda c: c.delete(self.keys.done(delivery)))


def _receipt(out: list[Any]) -> Receipt:
    """receipt.lua's reply (its header comment lists the shapes)."""
    return Receipt(
        int(out[0]) == 1,
        str(out[1]) if len(out) > 1 else "",
        str(out[2]) if len(out) > 2 else "",
        len(out) < 4 or int(out[3]) > 0,
        len(out) > 4 and int(out[4]) == 1,
    )
