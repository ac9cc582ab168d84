"""Completion recorded where the task ran: right after a fetched task's body succeeds, in its
pool process, its record is dropped (one HDEL).

The pool process reports a success to the worker's main process over a pipe, and only then
did the main process drop the record: a main process killed in between left the record, and
the task ran again although its body had finished. Now that window closes in the process that
ran the body, just after Celery stored the result. The main process still forgets the
delivery when it hears of the success, and drops the field again with the next heartbeat, in
one batch for all of them (a no-op unless the pool process could not reach Redis): no extra
round trip per task.

A pool process that finishes a body after its worker lost the lease (it was frozen, and woke)
does not drop anything: it waits for the worker to renew the lease, which first stops the
tasks it gave up, this one included (fence.py).
"""

from __future__ import annotations

import logging
from typing import Any

from relier_celery import runtime
from relier_celery.core.headers import EPOCH_KEY, HELD_KEY
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
    worker, field = held
    try:
        relier.store.ack(str(worker), str(field))
    except Exception as exc:
        # The worker's main process drops it with its next heartbeat.
        logger.warning("relier: could not record the completion of %s here: %r", task.name, exc)
