"""One ``rl chaos worker-kill`` run: picking workers of this host from the registry, hitting
them, and looking at the registry, the queues and the DLQ to follow what they held
(cli/follow.py decides; this module reads and signals)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import click

from relier_celery.cli.follow import Followed, Tracker
from relier_celery.cli.inspect import _queue_namer
from relier_celery.core import proc
from relier_celery.core.errors import RelierError
from relier_celery.observe.snapshot import RUNNING, Snapshot, take
from relier_celery.recovery import dlq as dead_letters

__all__ = ["ALIVE", "ChaosRun"]

# Seconds between two looks at the registry while following.
POLL = 0.1
# Broker list entries searched for a followed task id (LRANGE), per queue list.
QUEUE_SCAN_LIMIT = 10_000
# Worker statuses that can be hit.
ALIVE = ("alive", "idle")


class ChaosRun:
    """One run: the kills, the follower and what they saw."""

    def __init__(self, app: Any, rel: Any, out: Callable[[str], None]) -> None:
        self.app, self.rel, self.out = app, rel, out
        self.queue_of, self.queue_names = _queue_namer(app)
        self.tracker = Tracker()
        self.kills: list[dict[str, Any]] = []
        self.hit: set[str] = set()
        self.stopped: list[tuple[float, list[int]]] = []
        self.rng = random.Random()

    def snapshot(self) -> Snapshot:
        try:
            return take(self.rel.store, self.rel.config.lease_ttl, self.queue_of)
        except RelierError as exc:
            raise click.ClickException(str(exc)) from exc

    def candidates(self, snap: Snapshot, name: str | None) -> list[str]:
        """Live workers of this host whose recorded process is still the same process."""
        out = []
        for w in snap.workers:
            if w.status not in ALIVE or w.worker in self.hit:
                continue
            if name is not None and name not in (w.worker, w.worker.split("/", 1)[0]):
                continue
            if proc.matches(snap.processes.get(w.worker, {})):
                out.append(w.worker)
        return out

    def pick(self, snap: Snapshot, workers: list[str]) -> str:
        """The worker holding the most tasks (ties broken at random)."""
        held = {w: sum(1 for t in snap.tasks if t.worker == w) for w in workers}
        best = max(held.values())
        return self.rng.choice(sorted(w for w, n in held.items() if n == best))

    def kill(self, snap: Snapshot, worker: str, mode: str) -> list[Followed]:
        record = snap.processes[worker]
        pid = int(record["pid"])
        views = [t for t in snap.tasks if t.worker == worker]
        if mode == "child":
            children = proc.children(pid)
            if not children:
                raise click.ClickException(
                    f"worker {worker} has no pool process to kill (a solo or threads pool?): "
                    "use --mode main"
                )
            targets, sig = [self.rng.choice(children)], signal.SIGKILL
            views = [t for t in views if t.state == RUNNING]
        elif mode == "stop":
            targets, sig = [pid, *proc.children(pid)], signal.SIGSTOP
        else:
            targets, sig = [pid], signal.SIGKILL if mode == "main" else signal.SIGTERM
        if not proc.matches(record):  # the worker exited since the snapshot
            return []
        at = time.time()
        for target in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, sig)
        if mode == "stop":
            self.stopped.append((time.monotonic() + 2 * self.rel.config.lease_ttl, targets))
        self.hit.add(worker)
        followed = self.tracker.add(views, worker, at)
        self.kills.append(
            {"worker": worker, "mode": mode, "pids": targets, "at": at, "tasks": len(followed)}
        )
        what = {"main": "SIGKILL", "child": "SIGKILL (pool process)", "term": "SIGTERM"}
        self.out(
            f"⚡ {worker}: {what.get(mode, 'SIGSTOP')} pid {' '.join(map(str, targets))}, "
            f"holding {len(followed)} task(s)"
        )
        return followed

    def resume_due(self, force: bool = False) -> None:
        """SIGCONT frozen workers whose time is up (all of them with ``force``)."""
        now = time.monotonic()
        for item in list(self.stopped):
            due, pids = item
            if force or now >= due:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                self.stopped.remove(item)

    def _queued(self, wanted: set[str]) -> set[str]:
        """Which of the task ids wait in a queue of the app's Redis broker."""
        names = self.queue_names | {f.queue for f in self.tracker.pending if f.queue}
        found: set[str] = set()
        conn = self.app.connection_for_read()
        try:
            channel = conn.default_channel
            keys = {channel._q_for_pri(n, p) for n in names for p in channel.priority_steps}
            pipe = channel.client.pipeline(transaction=False)
            for key in sorted(keys):
                pipe.lrange(key, 0, QUEUE_SCAN_LIMIT - 1)
            for items in pipe.execute():
                for raw in items:
                    text = raw.decode() if isinstance(raw, bytes) else str(raw)
                    found |= {t for t in wanted if t in text}
        finally:
            conn.release()
        return found

    def look(self) -> list[Followed]:
        """One look at the registry (and, for tasks no worker holds, the queues and DLQ)."""
        self.resume_due()
        snap = self.snapshot()
        absent = self.tracker.absent(snap.tasks)
        queued: set[str] = set()
        quarantined: set[str] = set()
        if absent:
            queued = self._queued(absent)
            entries = dead_letters.entries(self.rel.store)
            quarantined = {str(e.get("task_id")) for e in entries} & absent
        alive = {w.worker for w in snap.workers if w.status in (*ALIVE, "draining")}
        return self.tracker.observe(snap.tasks, alive, queued, quarantined, time.time())
