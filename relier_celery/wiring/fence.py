"""What a worker does when a renewal finds its lease was lost: it owns nothing any more.

A worker frozen past its lease (SIGSTOP, a long GC pause, a swap storm, a VM migration) or cut
off from Redis was taken for dead: scanners may have moved its records back to their queues
and other workers may be running them. When it wakes, before anything starts again
(lease.py's clock lets nothing start until this is done):

1. every delivery it holds is given up, and the lease epoch rises in the same step, so a
   request already on its way to a pool process stops itself there (lease.gate);
2. its running tasks are stopped (prefork: their pool processes are SIGKILLed), before
   anything is given back, so a task is never running here and queued again at once;
3. what is still recorded under this worker goes back to the head of its queue (a fetched
   record moves in one atomic step, so it cannot also be moved by a scanner); what a scanner
   took already is left to it.

The price: a running task that no scanner took is stopped and runs again from the start. A
worker cannot know whether a task it holds is running elsewhere, and stopping it is the only
way never to run it twice at the same time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from relier_celery.core import events

if TYPE_CHECKING:
    from relier_celery.wiring.bootsteps import WorkerRuntime

__all__ = ["give_up", "kill_pool_tasks"]

logger = logging.getLogger("relier_celery")

# Longest wait for a SIGKILLed pool process to be gone before its task is given back.
KILL_WAIT = 1.0


def kill_pool_tasks(ids: set[str]) -> list[int]:
    """SIGKILL the prefork pool processes running the tasks ``ids``; return their pids, once
    each is dead (bounded by KILL_WAIT): it cannot run one more line of the task."""
    from celery.worker import state as worker_state

    pids = []
    for request in list(worker_state.active_requests):
        if request.id in ids and request.worker_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(request.worker_pid, signal.SIGKILL)
                pids.append(int(request.worker_pid))
    deadline = time.monotonic() + KILL_WAIT
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    return pids


def _alive(pid: int) -> bool:
    """Whether a process still runs code (a zombie, killed and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def give_up(runtime: WorkerRuntime) -> None:
    """Called by the heartbeat when a renewal found the lease lost (see the module doc)."""
    inflight = runtime.inflight
    records = inflight.give_up()
    if not records:
        events.emit(
            events.LEASE_GIVEN_UP,
            "this worker held nothing when it found its lease lost",
            worker=runtime.worker_id,
            count=0,
        )
        return
    stopped: list[int] = []
    if runtime.prefork:
        stopped = kill_pool_tasks({r.task_id for r in records})
    back = taken = 0
    try:
        held = runtime.store.held(runtime.worker_id)
    except Exception as exc:
        # The scanners take them (the lease will run out again if Redis stays away).
        logger.error("relier: could not read the records of a worker that lost its lease: %r", exc)
        held = {}
    for record in records:
        field = record.held_field()
        if field not in held:
            taken += 1  # a scanner moved it already
            continue
        try:
            outcome = runtime.resurrector.resurrect(
                record, runtime.worker_id, field, "its worker lost its lease and gave it up"
            )
        except Exception:
            logger.exception("relier: could not give back %s[%s]", record.task_name, record.task_id)
            continue
        if outcome == "gone":
            taken += 1
        else:
            back += 1
    events.emit(
        events.LEASE_GIVEN_UP,
        f"gave up {len(records)} task(s) after losing the lease: {len(stopped)} running "
        f"stopped, {back} given back to their queues, {taken} already taken by a scanner",
        worker=runtime.worker_id,
        count=len(records),
        stopped=len(stopped),
        given_back=back,
        taken=taken,
    )
