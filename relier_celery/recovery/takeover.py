"""Takeover: a broker's redelivery whose holder is gone runs now, not after its lease.

RabbitMQ gives a dead consumer's unacknowledged messages back the moment its connection
closes. Relier's record still names the dead worker as the holder, and its lease still looks
alive; its presence connection (store/presence.py) is gone with the process, though, and
receipt.lua sees that: in one round trip it moves the delivery to the receiver, which runs it
at once (docs/rabbitmq.md). A holder that is present keeps it: no double run for a live one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from relier_celery.core import events
from relier_celery.core.headers import CRASHES_HEADER
from relier_celery.core.record import TaskRecord, trace_context
from relier_celery.store.client import Receipt, Store
from relier_celery.store.presence import PresenceCache

__all__ = ["Takeover"]


class Takeover:
    """The receiving side of one worker's redeliveries."""

    def __init__(self, store: Store, worker: str, lease_ttl: float) -> None:
        self.store = store
        self.worker = worker
        self.presence = PresenceCache(store)
        # How long the holder's marker waits for a renewal that fences it, if it lives.
        self.marker_ttl = 10 * lease_ttl

    def receive(self, message: Any, record: TaskRecord) -> Receipt:
        """Record a redelivery, taking it over from its holder if that one is gone."""
        # One Redis server: the script sees every presence connection, and takes over any
        # holder that has none ("*"). A cluster: only its own node's (a slot that moved
        # leaves them behind until the next heartbeat), so every primary is asked first; a
        # dead worker's burst of redeliveries pays that once (the holder guessed gone).
        cluster = self.store.cluster is not None
        guess = self.presence.recently_gone(self.worker) if cluster else None
        receipt = self._take_over(message, record, (guess or "") if cluster else "*")
        if receipt.reason == "free":  # nobody holds it: recorded as it came
            return self._record(record)
        if receipt.reason != "held":
            return receipt
        holder = receipt.detail.rsplit("|", 2)[0]
        if holder in (self.worker, guess) or not (receipt.holder_present or cluster):
            return receipt  # itself, refused (a scanner's claim, no record) or guessed
        if not self.presence.gone(holder):  # asked again for a moment: it may be dying
            return receipt
        taken = self._take_over(message, record, holder)
        return receipt if taken.reason == "free" else taken  # "free": gone meanwhile

    def _record(self, record: TaskRecord) -> Receipt:
        return self.store.record(record.delivery_id, self.worker, record.generation, record.dumps())

    def _take_over(self, message: Any, record: TaskRecord, gone: str) -> Receipt:
        """Receive it, taken over from its holder if that one is ``gone`` (see
        Store.take_over). The holder's death is a crash, counted against max_resurrections
        as the scanner counts it, from the holder's record (the broker's copy carries the
        count it was published with, not the takeovers since): guessed from the copy,
        corrected by receipt.lua when the guess was wrong."""
        crashes = record.crashes
        for _ in range(2):
            mine = replace(record, headers={**record.headers, CRASHES_HEADER: crashes + 1})
            receipt = self.store.take_over(
                record.delivery_id,
                gone,
                self.worker,
                record.generation,
                mine.dumps(),
                crashes,
                self.marker_ttl,
            )
            if receipt.reason != "crashes":
                break
            crashes = int(receipt.detail)
        if not receipt.recorded:
            # (twice "crashes": the holder's record changed under it; a duplicate)
            return Receipt(False, "held", "", False) if receipt.reason == "crashes" else receipt
        holder = receipt.detail
        record.headers[CRASHES_HEADER] = crashes + 1
        message.headers[CRASHES_HEADER] = crashes + 1  # what the task's context shows
        events.emit(
            events.TASK_TAKEN_OVER,
            f"{record.task_name}[{record.task_id}] redelivered by the broker, and its holder "
            f"{holder} is gone (its presence connection closed): it runs now, not when that "
            "worker's lease runs out",
            task_id=record.task_id,
            task_name=record.task_name,
            worker=self.worker,
            holder=holder,
            **trace_context(record.headers),
        )
        return Receipt(True, "taken", holder)
