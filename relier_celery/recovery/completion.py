"""Completion recorded where the task ran: right after a task's body succeeds, in its pool
process, its record is dropped: one HDEL for a fetched delivery, complete.lua for one kept
apart from the broker (RabbitMQ, kombu's fetch), which also leaves the done marker that makes
a later redelivery a duplicate.

The pool process reports a success to the worker's main process over a pipe, and only then
did the main process drop the record: a main process killed in between left the record, and
the task ran again although its body had finished (on RabbitMQ: the broker redelivered it and
another worker took it over). Now that window closes in the process that ran the body, just
after Celery stored the result. The main process still forgets the delivery when it hears of
the success, and checks again with the next heartbeat, in one batch for all of them (a no-op
unless the pool process could not reach Redis): no round trip per task on its event loop.

A pool process that finishes a body after its worker lost the lease (it was frozen, and woke)
does not drop anything: it waits for the worker to renew the lease, which first stops the
tasks it gave up, this one included (fence.py).
"""

from __future__ import annotations

import logging
from typing import Any

from relier_celery import runtime
from relier_celery.core.headers import EPOCH_KEY, HELD_KEY
from relier_celery.core.record import Generation
from relier_celery.recovery.lease import clock_of

__all__ = ["record_success"]

logger = logging.getLogger("relier_celery")


def record_success(task: Any) -> None:
    """On task_success, in the process that ran ``task``: drop its held record."""
    held = getattr(task.request, HELD_KEY, None)
    relier = runtime.of(task.app)
    if not held or relier is None:
        return
    clock = clock_of(task.app)
    if clock is not None:
        if not clock.live():
            clock.wait_live()
        if getattr(task.request, EPOCH_KEY, None) != clock.epoch:
            return  # given up with a lost lease: it is not this worker's to drop
    worker, field, *delivery = held
    try:
        if delivery:  # kept apart from the broker: its owner entry goes, a done marker stays
            did, retries, resurrections = delivery
            gen = Generation(int(retries), int(resurrections))
            relier.store.complete(str(did), str(worker), gen, relier.config.completed_ttl)
        else:
            relier.store.ack(str(worker), str(field))
    except Exception as exc:
        # The worker's main process drops it with its next heartbeat.
        logger.warning("relier: could not record the completion of %s here: %r", task.name, exc)
