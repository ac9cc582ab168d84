"""Following the tasks a chaos kill hit, from registry snapshots (pure: no Redis, no clock).

A task held by a killed worker is followed until one of:

- **recovered**: it is held again by a live worker in a newer delivery (another worker, or a
  later generation: resurrected, handed off, retried), or it was seen waiting in its queue
  after the kill and then finished between two looks;
- **quarantined**: its record went to the dead letter queue;
- **completed in place**: its record went without a newer delivery ever being seen: its own
  process finished it (a drain completed it, an orphaned pool process outlived its parent);
- **unaffected**: at the deadline it still runs where it ran, on a live worker (a ``child``
  kill hit another pool process);
- **lost**: at the deadline it is still held by a dead worker, or nowhere.

"Absent" needs two looks in a row: a snapshot reads the held records and the queues one after
the other, and a message moving from one to the other in between is absent from both once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from relier_celery.observe.snapshot import HELD, RESERVED, RUNNING, TaskView
from relier_celery.observe.summary import percentile

__all__ = ["Followed", "Tracker"]

RECOVERED, QUARANTINED, IN_PLACE = "recovered", "quarantined", "completed in place"
UNAFFECTED, LOST = "unaffected", "lost"
# Outcomes of a task the kill really hit (counted as "affected").
AFFECTED = (RECOVERED, QUARANTINED, LOST)
_HELD_STATES = (RUNNING, RESERVED, HELD)
# Looks in a row a task must be absent from every held record and queue to count as gone.
ABSENT_LOOKS = 2


@dataclass
class Followed:
    """One task a kill hit."""

    task_id: str
    name: str
    worker: str
    killed_at: float
    resurrections: int
    retries: int
    queue: str = ""
    outcome: str | None = None
    resolved_at: float | None = None
    where: str = ""
    queued_at: float | None = None
    absent_since: float | None = None
    absent_looks: int = 0
    last_seen: str = ""

    @property
    def recovery(self) -> float | None:
        """Seconds from the kill to recovery, for a recovered task."""
        if self.outcome != RECOVERED or self.resolved_at is None:
            return None
        return max(self.resolved_at - self.killed_at, 0.0)

    def resolve(self, outcome: str, at: float, where: str = "") -> None:
        self.outcome, self.resolved_at, self.where = outcome, at, where

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "task_name": self.name,
            "worker": self.worker,
            "outcome": self.outcome,
            "recovery_seconds": self.recovery,
            "where": self.where,
        }


class Tracker:
    """Every followed task, updated from one observation at a time."""

    def __init__(self) -> None:
        self.tasks: list[Followed] = []
        """One entry per task per kill that hit it (a task can be hit twice)."""

    def add(self, views: list[TaskView], worker: str, at: float) -> list[Followed]:
        """Follow the deliveries ``worker`` held when it was hit at ``at``."""
        following = {f.task_id for f in self.pending}
        added = [
            Followed(v.task_id, v.task_name, worker, at, v.resurrections, v.retries, v.queue)
            for v in views
            if v.task_id not in following
        ]
        self.tasks.extend(added)
        return added

    @property
    def pending(self) -> list[Followed]:
        return [f for f in self.tasks if f.outcome is None]

    def absent(self, tasks: list[TaskView]) -> set[str]:
        """Followed task ids no worker holds (the caller then looks in queues and the DLQ)."""
        held = {t.task_id for t in tasks}
        return {f.task_id for f in self.pending if f.task_id not in held}

    def observe(
        self,
        tasks: list[TaskView],
        alive: set[str],
        queued: set[str],
        quarantined: set[str],
        now: float,
    ) -> list[Followed]:
        """One look: every held delivery, the live workers, the ids waiting in a queue and in
        the DLQ. Return the tasks resolved by it."""
        by_id: dict[str, list[TaskView]] = defaultdict(list)
        for t in tasks:
            by_id[t.task_id].append(t)
        resolved = []
        for f in self.pending:
            views = by_id.get(f.task_id, [])
            newer = [
                v
                for v in views
                if v.worker in alive
                and v.state in _HELD_STATES
                and (
                    v.worker != f.worker
                    or v.resurrections > f.resurrections
                    or v.retries > f.retries
                )
            ]
            if newer:
                f.resolve(RECOVERED, now, f"{newer[0].state} on {newer[0].worker}")
            elif views:
                f.absent_looks, f.absent_since = 0, None
                f.last_seen = f"{views[0].state} on {views[0].worker}"
                continue
            elif f.task_id in quarantined:
                f.resolve(QUARANTINED, now, "in the dead letter queue")
            elif f.task_id in queued:
                f.queued_at = f.queued_at or now
                f.absent_looks, f.absent_since = 0, None
                f.last_seen = "waiting in its queue"
                continue
            else:
                f.absent_looks += 1
                f.absent_since = f.absent_since or now
                if f.absent_looks < ABSENT_LOOKS:
                    continue
                if f.queued_at is not None:
                    f.resolve(RECOVERED, f.absent_since, "ran again and finished")
                else:
                    f.resolve(IN_PLACE, f.absent_since, "finished by its own process")
            resolved.append(f)
        return resolved

    def expire(self, alive: set[str], now: float) -> list[Followed]:
        """The deadline: what still runs in place on a live worker was unaffected, the rest
        is lost."""
        out = []
        for f in self.pending:
            still_here = f.last_seen.endswith(f" on {f.worker}") and f.worker in alive
            if still_here:
                f.resolve(UNAFFECTED, now, f.last_seen)
            else:
                f.resolve(LOST, now, f.last_seen or "nowhere")
            out.append(f)
        return out

    def summary(self) -> dict[str, Any]:
        outcomes = [f.outcome for f in self.tasks]
        times = [r for f in self.tasks if (r := f.recovery) is not None]
        return {
            "affected": sum(1 for o in outcomes if o in AFFECTED),
            "recovered": outcomes.count(RECOVERED),
            "quarantined": outcomes.count(QUARANTINED),
            "lost": outcomes.count(LOST),
            "completed_in_place": outcomes.count(IN_PLACE),
            "unaffected": outcomes.count(UNAFFECTED),
            "recovery_p50": percentile(times, 0.5),
            "recovery_p99": percentile(times, 0.99),
        }
