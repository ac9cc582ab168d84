"""Inflight visibility: a snapshot of relier's registry in Redis (its summary and JSON form are
in summary.py; the CLI renders it: relier_celery/cli/render.py).

``celery inspect active`` asks live workers over the broker; this reads relier's own registry,
so it also sees the tasks of workers that died and await resurrection, and needs no worker to
answer. A snapshot is two pipelined Redis round trips (leases, scan time and counters; then
every worker's records, running set, drain progress and scanner claim) plus one to the broker
for queue depths, whatever the number of tasks in flight.

Task states:

- ``running``: its worker's pool runs it, as of the worker's last heartbeat (activity.py);
- ``reserved``: held by a live worker that has not started it (prefetched, waiting, ETA);
- ``held``: held by a live worker that publishes no running set (an older relier);
- ``awaiting resurrection``: held by a worker whose lease ran out;
- ``resurrecting``: a scanner has claimed that dead worker's records and republishes them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from relier_celery.core.headers import CRASHES_HEADER, RESURRECTIONS_HEADER
from relier_celery.core.record import TaskRecord, as_int
from relier_celery.observe.counters import COUNTED
from relier_celery.store.client import Store, list_lengths

__all__ = [
    "Filters",
    "QueueDepths",
    "Snapshot",
    "TaskView",
    "WorkerView",
    "broker_queue_depths",
    "take",
]

RUNNING, RESERVED, HELD = "running", "reserved", "held"
AWAITING, RESURRECTING = "awaiting resurrection", "resurrecting"
_ORDER = {RUNNING: 0, RESERVED: 1, HELD: 2, RESURRECTING: 3, AWAITING: 4}


@dataclass(frozen=True)
class TaskView:
    """One held delivery."""

    task_id: str
    task_name: str
    worker: str
    state: str
    queue: str
    received_at: float
    started_at: float | None
    age: float
    """Seconds running (if running), else seconds since it was received."""
    retries: int
    resurrections: int
    crashes: int


@dataclass(frozen=True)
class WorkerView:
    """One worker known to the lease registry."""

    worker: str
    status: str
    """``alive``, ``idle``, ``draining``, ``drained``, ``dead`` or ``resurrecting``."""
    lease_age: float
    """Seconds since its last lease renewal."""
    expired_for: float
    """Seconds since its lease ran out (0 while alive)."""
    held: int
    running: int | None
    """Tasks its pool runs, or None if it publishes no running set."""
    claimed_by: str | None = None


@dataclass(frozen=True)
class QueueDepths:
    """Messages waiting in the broker, per queue (priority sub-queues added up)."""

    depths: dict[str, int] = field(default_factory=dict)
    lists: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per queue, each broker list (the queue and its priority levels) with its length."""
    error: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """What relier's registry held at one moment (``at``, Redis server time)."""

    at: float
    tasks: list[TaskView]
    workers: list[WorkerView]
    counters: dict[str, int]
    last_scan: float | None
    unreadable: int
    queues: QueueDepths | None = None
    processes: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per worker, its process record (pid, host, start, completed; activity.py), if any."""
    recovery: list[tuple[float, float]] = field(default_factory=list)
    """Recovery samples (republished at, delay from the last heartbeat), seconds, newest
    first (resurrect.py)."""


@dataclass(frozen=True)
class Filters:
    """Shell-style patterns (``fnmatch``); None matches everything."""

    queue: str | None = None
    worker: str | None = None
    """Matches the worker id or its hostname (the id up to the first ``/``)."""
    task: str | None = None
    """Matches the task name or the task id."""

    def worker_ok(self, worker: str) -> bool:
        if self.worker is None:
            return True
        host = worker.split("/", 1)[0]
        return fnmatch.fnmatchcase(worker, self.worker) or fnmatch.fnmatchcase(host, self.worker)

    def queue_ok(self, queue: str) -> bool:
        return self.queue is None or fnmatch.fnmatchcase(queue, self.queue)

    def task_ok(self, t: TaskView) -> bool:
        if not self.queue_ok(t.queue):
            return False
        if self.task is not None and not (
            fnmatch.fnmatchcase(t.task_name, self.task) or t.task_id == self.task
        ):
            return False
        return self.worker_ok(t.worker)


def take(
    store: Store,
    lease_ttl: float,
    queue_of: Callable[[str, str], str] | None = None,
    filters: Filters = Filters(),
) -> Snapshot:
    """Read the registry (two pipelined round trips) into a snapshot.

    ``lease_ttl`` turns lease deadlines into "last renewed" ages; ``queue_of(exchange,
    routing_key)`` names a record's queue (default: its routing key)."""
    overview = store.overview()
    now: float = overview["now"]
    leases: dict[str, float] = overview["leases"]
    workers = sorted(w for w in leases if filters.worker_ok(w))
    detail = store.workers_detail(workers)
    tasks: list[TaskView] = []
    views: list[WorkerView] = []
    processes: dict[str, dict[str, str]] = {}
    unreadable = 0
    for w in workers:
        deadline = leases[w] / 1000.0
        d = detail[w]
        if d["process"]:
            processes[w] = d["process"]
        running: dict[str, float] = d["running"]
        known = "@" in running
        dead = deadline <= now
        claim = d["claim"]
        count_running = 0
        for held_field, raw in d["held"].items():
            try:
                rec = TaskRecord.loads(raw, held_field)  # a receipt's record or a fetched envelope
                headers = rec.headers if isinstance(rec.headers, dict) else {}
                task_id = str(rec.task_id)
                received = float(rec.received_at or now)
            except (ValueError, KeyError, TypeError, AttributeError):
                unreadable += 1
                continue
            started = running.get(task_id) if known else None
            if dead:
                state = RESURRECTING if claim else AWAITING
            elif started is not None:
                state = RUNNING
                count_running += 1
            else:
                state = RESERVED if known else HELD
            since = started if started else received
            queue = str(rec.routing_key or "")
            if queue_of is not None:
                queue = queue_of(str(rec.exchange or ""), queue)
            tasks.append(
                TaskView(
                    task_id=task_id,
                    task_name=str(rec.task_name),
                    worker=w,
                    state=state,
                    queue=queue,
                    received_at=received,
                    started_at=started or None,
                    age=max(now - since, 0.0),
                    retries=as_int(headers.get("retries")),
                    resurrections=as_int(headers.get(RESURRECTIONS_HEADER)),
                    crashes=as_int(headers.get(CRASHES_HEADER)),
                )
            )
        drain = d["drain"].get("state")
        if dead:
            status = "resurrecting" if claim else "dead"
        elif drain in ("draining", "starting"):
            status = "draining"
        elif drain == "finished":
            status = "drained"
        elif known and count_running == 0:
            status = "idle"
        else:
            status = "alive"
        views.append(
            WorkerView(
                worker=w,
                status=status,
                lease_age=max(now - (deadline - lease_ttl), 0.0),
                expired_for=max(now - deadline, 0.0),
                held=len(d["held"]),
                running=count_running if known and not dead else None,
                claimed_by=claim,
            )
        )
    tasks = [t for t in tasks if filters.task_ok(t)]
    tasks.sort(key=lambda t: (t.worker, _ORDER.get(t.state, 9), -t.age, t.task_id))
    return Snapshot(
        at=now,
        tasks=tasks,
        workers=views,
        counters={name: overview["counters"].get(name, 0) for name in COUNTED.values()},
        last_scan=overview["last_scan"],
        unreadable=unreadable,
        processes=processes,
        recovery=overview["recovery"],
    )


def broker_queue_depths(app: Any, names: Iterable[str]) -> QueueDepths:
    """LLEN of each queue's broker lists (kombu's Redis transport: the queue, plus one list per
    priority level). Any other broker: an explanation instead of numbers."""
    wanted = sorted(set(names))
    conn = app.connection_for_read()
    try:
        driver = getattr(conn.transport, "driver_type", "?")
        if driver != "redis":
            return QueueDepths(
                error=f"the broker is {driver} ({conn.transport_cls}), not Redis: queue depths "
                "are read from Redis brokers only (use the broker's own tools)"
            )
        conn.ensure_connection(max_retries=1)
        channel = conn.default_channel
        lists = {
            name: list(dict.fromkeys(channel._q_for_pri(name, p) for p in channel.priority_steps))
            for name in wanted
        }
        flat = [key for keys in lists.values() for key in keys]
        lengths = dict(zip(flat, list_lengths(channel.client, flat), strict=True))
    except Exception as exc:  # the registry is still worth showing without the broker
        return QueueDepths(error=f"could not read queue depths from the broker: {exc!r}")
    finally:
        conn.release()
    per = {name: {k: lengths[k] for k in keys} for name, keys in lists.items()}
    return QueueDepths(depths={n: sum(v.values()) for n, v in per.items()}, lists=per)
