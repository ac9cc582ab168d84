"""Takeover: a broker's redelivery whose holder is gone runs now, not after its lease.

RabbitMQ gives a dead consumer's unacknowledged messages back the moment its connection
closes. Relier's record still names the dead worker as the holder, and its lease still looks
alive; its presence connection (store/presence.py) is gone with the process, though, and
receipt.lua sees that: in one round trip it moves the delivery to the receiver, which runs it
at once (docs/rabbitmq.md). A holder that is present keeps it: no double run for a live one.

Each receipt is written as an :data:`Ask`: a generator that yields the receipt.lua calls it
needs, one after another, and returns its :class:`Receipt`. :func:`answer` runs the asks of
messages delivered together, their calls of each step in one round trip.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import replace
from typing import Any

from relier_celery.core import events
from relier_celery.core.errors import StoreUnavailable
from relier_celery.core.headers import CRASHES_HEADER
from relier_celery.core.record import TaskRecord, trace_context
from relier_celery.store.client import Receipt, ReceiptCall, Store
from relier_celery.store.presence import PresenceCache

__all__ = ["Ask", "Takeover", "answer", "plain", "record_call"]

# One message's receipt: yields receipt.lua calls, is sent their answers, returns the receipt.
Ask = Generator[ReceiptCall, Receipt, Receipt]


def plain(call: ReceiptCall) -> Ask:
    """A receipt of one call (a message the broker delivers for the first time)."""
    return (yield call)


def answer(store: Store, asks: Sequence[Ask]) -> list[Receipt | Exception]:
    """Run ``asks`` to their receipts; the calls they are at go to Redis together, one round
    trip a step (one by one on a Redis Cluster, where a takeover asks every primary first).
    An ask's error (StoreUnavailable when Redis could not be reached) in its place."""
    if store.cluster is not None and len(asks) > 1:
        return [r for ask in asks for r in answer(store, [ask])]
    out: list[Receipt | Exception] = [StoreUnavailable("no answer") for _ in asks]
    calls: dict[int, ReceiptCall] = {}
    for i, ask in enumerate(asks):
        _advance(ask, None, i, calls, out)
    while calls:
        which = list(calls)
        try:
            if len(which) == 1:
                answers: list[Receipt | Exception] = [store.receipt(calls[which[0]])]
            else:
                answers = store.receipts([calls[i] for i in which])
        except StoreUnavailable as exc:  # any of them may have been written
            answers = [exc for _ in which]
        calls = {}
        for i, got in zip(which, answers, strict=True):
            if isinstance(got, Exception):
                out[i] = got
            else:
                _advance(asks[i], got, i, calls, out)
    return out


def _advance(
    ask: Ask,
    got: Receipt | None,
    i: int,
    calls: dict[int, ReceiptCall],
    out: list[Receipt | Exception],
) -> None:
    """Send ``got`` to ``ask`` (None: start it): its next call, or its receipt, lands."""
    try:
        calls[i] = ask.send(got) if got is not None else next(ask)
    except StopIteration as done:
        out[i] = done.value
    except Exception as exc:
        out[i] = exc


class Takeover:
    """The receiving side of one worker's redeliveries."""

    def __init__(self, store: Store, worker: str, lease_ttl: float) -> None:
        self.store = store
        self.worker = worker
        self.presence = PresenceCache(store)
        # How long the holder's marker waits for a renewal that fences it, if it lives.
        self.marker_ttl = 10 * lease_ttl

    def ask(self, message: Any, record: TaskRecord) -> Ask:
        """The receipt of a redelivery, taking it over from its holder if that one is gone,
        as an :data:`Ask` (receipt.py runs it with :func:`answer`)."""
        # One Redis server: the script sees every presence connection, and takes over any
        # holder that has none ("*"). A cluster: only its own node's (a slot that moved
        # leaves them behind until the next heartbeat), so every primary is asked first; a
        # dead worker's burst of redeliveries pays that once (the holder guessed gone).
        cluster = self.store.cluster is not None
        guess = self.presence.recently_gone(self.worker) if cluster else None
        receipt = yield from self._take_over(message, record, (guess or "") if cluster else "*")
        if receipt.reason == "free":  # nobody holds it: recorded as it came
            return (yield record_call(self.store, record, self.worker))
        if receipt.reason != "held":
            return receipt
        holder = receipt.detail.rsplit("|", 2)[0]
        if holder in (self.worker, guess) or not (receipt.holder_present or cluster):
            return receipt  # itself, refused (a scanner's claim, no record) or guessed
        if not self.presence.gone(holder):  # asked again for a moment: it may be dying
            return receipt
        taken = yield from self._take_over(message, record, holder)
        return receipt if taken.reason == "free" else taken  # "free": gone meanwhile

    def _call(self, record: TaskRecord, gone: str, crashes: int) -> ReceiptCall:
        mine = replace(record, headers={**record.headers, CRASHES_HEADER: crashes + 1})
        args = _record_args(mine, self.worker)
        return self.store.receipt_call(*args, takeover=(gone, crashes, self.marker_ttl))

    def _take_over(self, message: Any, record: TaskRecord, gone: str) -> Ask:
        """Receive it, taken over from its holder if that one is ``gone`` (see
        Store.take_over). The holder's death is a crash, counted against max_resurrections
        as the scanner counts it, from the holder's record (the broker's copy carries the
        count it was published with, not the takeovers since): guessed from the copy,
        corrected by receipt.lua when the guess was wrong."""
        crashes = record.crashes
        receipt = yield self._call(record, gone, crashes)
        if receipt.reason == "crashes":
            crashes = int(receipt.detail)
            receipt = yield self._call(record, gone, crashes)
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


def record_call(store: Store, record: TaskRecord, worker: str) -> ReceiptCall:
    """The receipt.lua call recording ``record`` under ``worker`` as it came."""
    return store.receipt_call(*_record_args(record, worker))


def _record_args(record: TaskRecord, worker: str) -> tuple[str, str, Any, str]:
    return record.delivery_id, worker, record.generation, record.dumps()
