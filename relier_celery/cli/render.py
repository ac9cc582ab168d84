"""Rendering of registry snapshots (relier_celery/observe/snapshot.py), pure: no Redis, no clock.

Two forms: plain aligned text for the one-shot commands (``relier inspect``, ``tasks``,
``workers``: grep-able, unchanged across releases), and a rich renderable for the live view
(``--watch``, ``rl top``) that rich redraws in place, in colour on a terminal and as plain
text elsewhere.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from relier_celery.observe.snapshot import AWAITING, HELD, RESERVED, RESURRECTING, RUNNING, Snapshot
from relier_celery.observe.summary import completed, recovery_percentiles, summary

__all__ = [
    "figures",
    "live_view",
    "render",
    "render_queues",
    "render_summary",
    "render_tasks",
    "render_workers",
    "short_id",
]

# Colour of each task state and worker status in the live view.
TASK_STYLES = {
    RUNNING: "green",
    RESERVED: "cyan",
    HELD: "cyan",
    AWAITING: "bold red",
    RESURRECTING: "magenta",
}
WORKER_STYLES = {
    "alive": "green",
    "idle": "cyan",
    "draining": "yellow",
    "drained": "dim",
    "dead": "bold red",
    "resurrecting": "magenta",
}
# Lines of the screen the live view keeps for everything but the task rows.
RESERVED_LINES = 14
# Characters of a task id the live view shows (ids are uuid4s: 8 are unique enough to read).
SHORT_ID = 8


def short_id(task_id: str) -> str:
    return task_id[:SHORT_ID]


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [header, *rows]
    ]


def render_tasks(snap: Snapshot) -> list[str]:
    if not snap.tasks:
        return ["no task in flight"]
    rows = [
        [t.worker, t.task_name, t.task_id, t.state, _dur(t.age), t.queue, str(t.resurrections)]
        for t in snap.tasks
    ]
    return _table(["WORKER", "TASK", "ID", "STATE", "TIME", "QUEUE", "RES"], rows)


def render_workers(snap: Snapshot) -> list[str]:
    if not snap.workers:
        return ["no worker holds a lease"]
    rows = []
    for w in snap.workers:
        if w.status in ("dead", "resurrecting"):
            status = f"{w.status} {_dur(w.expired_for)} ago"
            if w.held:
                status += f", {w.held} awaiting resurrection"
            if w.claimed_by:
                status += f" (claimed by {w.claimed_by})"
        else:
            status = w.status
        running = "-" if w.running is None else str(w.running)
        rows.append([w.worker, status, _dur(w.lease_age), str(w.held), running])
    return _table(["WORKER", "STATUS", "LEASE AGE", "HELD", "RUNNING"], rows)


def render_queues(snap: Snapshot) -> list[str]:
    q = snap.queues
    if q is None:
        return []
    if q.error:
        return [f"queues: {q.error}"]
    if not q.depths:
        return ["queues: none known"]
    rows = []
    for name, depth in sorted(q.depths.items()):
        parts = [f"{k!r}={n}" for k, n in q.lists[name].items() if n and k != name]
        rows.append([name, str(depth), " ".join(parts)])
    return _table(["QUEUE", "WAITING", "PRIORITY LISTS"], rows)


def render_summary(snap: Snapshot) -> list[str]:
    s = summary(snap)
    scan = "never" if s["last_scan_age"] is None else f"{_dur(s['last_scan_age'])} ago"
    line = (
        f"{s['running']} running, {s['reserved'] + s['held']} reserved, "
        f"{s['awaiting_resurrection']} awaiting resurrection; {s['workers_alive']} worker(s) "
        f"alive ({s['workers_idle']} idle), {s['workers_dead']} dead; lost = {s['lost']}; "
        f"last resurrection scan {scan}"
    )
    counters = ", ".join(f"{k} {v}" for k, v in snap.counters.items())
    return [line, f"counters: {counters}"]


def render(snap: Snapshot, view: str = "inspect") -> str:
    """The text of ``relier inspect`` (``view``: inspect, tasks or workers)."""
    if view == "tasks":
        return "\n".join(render_tasks(snap))
    if view == "workers":
        return "\n".join(render_workers(snap))
    parts = [render_tasks(snap), render_workers(snap), render_queues(snap), render_summary(snap)]
    return "\n\n".join("\n".join(p) for p in parts if p)


# -- the live view (rich) -------------------------------------------------------------------
def _tasks_table(snap: Snapshot, max_rows: int | None) -> Table:
    table = Table(title="tasks in flight", title_justify="left", expand=True, box=None)
    for name, kw in (
        ("WORKER", {"ratio": 3, "overflow": "ellipsis", "no_wrap": True}),
        ("TASK", {"ratio": 3, "overflow": "ellipsis", "no_wrap": True}),
        ("ID", {"no_wrap": True}),
        ("TIME", {"justify": "right", "no_wrap": True}),
        ("STATE", {"no_wrap": True}),
        ("QUEUE", {"ratio": 1, "min_width": 8, "overflow": "ellipsis", "no_wrap": True}),
    ):
        table.add_column(name, **kw)
    shown = snap.tasks if max_rows is None else snap.tasks[: max(max_rows, 1)]
    for t in shown:
        table.add_row(
            t.worker,
            t.task_name,
            short_id(t.task_id),
            _dur(t.age),
            Text(t.state, style=TASK_STYLES.get(t.state, "")),
            t.queue,
        )
    if len(shown) < len(snap.tasks):
        table.add_row("", Text(f"... {len(snap.tasks) - len(shown)} more", style="dim"))
    if not snap.tasks:
        table.add_row(Text("no task in flight", style="dim"))
    return table


def _workers_table(snap: Snapshot) -> Table:
    table = Table(title="workers", title_justify="left", expand=True, box=None)
    table.add_column("WORKER", ratio=3, overflow="ellipsis", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("LEASE AGE", justify="right", no_wrap=True)
    table.add_column("HELD", justify="right", no_wrap=True)
    table.add_column("RUNNING", justify="right", no_wrap=True)
    table.add_column("COMPLETED", justify="right", no_wrap=True)
    for w in snap.workers:
        status = Text(w.status, style=WORKER_STYLES.get(w.status, ""))
        if w.status in ("dead", "resurrecting"):
            status.append(f" {_dur(w.expired_for)} ago", style="dim")
        done = snap.processes.get(w.worker, {}).get("completed", "-")
        running = "-" if w.running is None else str(w.running)
        table.add_row(w.worker, status, _dur(w.lease_age), str(w.held), running, done)
    if not snap.workers:
        table.add_row(Text("no worker holds a lease", style="dim"))
    return table


def _queues_table(snap: Snapshot) -> RenderableType | None:
    q = snap.queues
    if q is None:
        return None
    if q.error:
        return Text(f"queues: {q.error}", style="yellow")
    table = Table(title="queues", title_justify="left", box=None)
    table.add_column("QUEUE", no_wrap=True)
    table.add_column("WAITING", justify="right", no_wrap=True)
    for name, depth in sorted(q.depths.items()):
        table.add_row(name, str(depth))
    return table


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def figures(snap: Snapshot, scan_interval: float | None = None) -> list[Text]:
    """The footer: what runs, who is idle, what was lost, and the fleet's counters."""
    s = summary(snap)
    c = snap.counters
    rec = recovery_percentiles(snap)
    scan = "never" if s["last_scan_age"] is None else f"{_dur(s['last_scan_age'])} ago"
    every = "" if scan_interval is None else f" (every {scan_interval:g}s)"
    lost = Text(f"{s['lost']} lost", style="bold red" if s["lost"] else "green")
    tasks = Text.assemble(
        (f"{s['running']} running", "green"),
        f" · {s['reserved'] + s['held']} reserved · ",
        (
            f"{s['awaiting_resurrection']} awaiting resurrection",
            "red" if s["awaiting_resurrection"] else "",
        ),
        " · ",
        lost,
    )
    workers = Text.assemble(
        f"workers: {s['workers_alive']} alive, {s['workers_idle']} idle, ",
        (f"{s['workers_dead']} dead", "red" if s["workers_dead"] else ""),
        f" · last scan {scan}{every}",
    )
    fleet = Text(
        f"completed {completed(snap)} · resurrected {c.get('resurrections', 0)} · handed off "
        f"{c.get('hand_offs', 0)} · quarantined {c.get('quarantines', 0)} · lost {s['lost']}"
    )
    recovery = Text(
        f"recovery p50 {_secs(rec['p50'])} p95 {_secs(rec['p95'])} (last hour, "
        f"{rec['count']} sample{'' if rec['count'] == 1 else 's'})"
    )
    return [tasks, workers, fleet, recovery]


def live_view(
    snap: Snapshot,
    view: str = "inspect",
    *,
    title: str = "",
    scan_interval: float | None = None,
    height: int | None = None,
) -> RenderableType:
    """One frame of the live view. ``view``: inspect (everything), tasks or workers; ``height``
    (the screen's lines) bounds the task rows so the footer stays on screen."""
    parts: list[RenderableType] = []
    if title:
        parts.append(Text(title, style="bold"))
    if view in ("inspect", "tasks"):
        rows = None
        if height is not None:
            others = RESERVED_LINES + (len(snap.workers) if view == "inspect" else 0)
            if snap.queues is not None:
                others += len(snap.queues.depths)
            rows = max(height - others, 3)
        parts.append(_tasks_table(snap, rows))
    if view in ("inspect", "workers"):
        parts.append(_workers_table(snap))
    if view == "inspect":
        queues = _queues_table(snap)
        if queues is not None:
            parts.append(queues)
    parts.extend(figures(snap, scan_interval))
    return Group(*parts)
