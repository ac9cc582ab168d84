"""What ``rl cluster up`` shows and how it stops: the live view of ``rl top`` (cli/render.py)
under a header of the supervised processes, then, on Ctrl-C, the drain of every worker with
``rl worker drain``'s lines (cli/drain.py) and one final line.

Signals are counted, not raised (:class:`Signals`), so a Ctrl-C never lands in the middle of a
Redis call: the first stops the view and starts the drains, each further one hurries them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..config import mask_url
from ..errors import RelierError
from ..inspect import Snapshot, broker_queue_depths, take
from .drain import FINISH_GRACE, task_line
from .drain import final_line as worker_final_line
from .inspect import _queue_namer
from .render import WORKER_STYLES, _dur, live_view
from .supervise import Child, CrashLoop, Supervisor, describe_exit

__all__ = ["ClusterInfo", "Signals", "drain_workers", "final_line", "watch"]

# Seconds between two looks at the workers while they drain.
POLL = 0.2
# Supervisor events kept in the header.
EVENTS_SHOWN = 3


@dataclass
class ClusterInfo:
    """What the cluster runs on, for its first lines and its header."""

    target: str
    app_broker: str | None
    redis_url: str
    embedded: bool
    otel: bool
    otel_missing: bool
    queues: tuple[str, ...]
    interval: float
    logs: Path
    started: float = field(default_factory=time.monotonic)
    events: list[str] = field(default_factory=list)

    def otel_words(self) -> str:
        if self.otel:
            return "OpenTelemetry exporter on"
        if self.otel_missing:
            return "OpenTelemetry exporter off (OTEL_* is set but OpenTelemetry is not installed)"
        return "OpenTelemetry exporter off"

    def redis_words(self) -> str:
        where = "embedded redis-server" if self.embedded else "the app's"
        return f"redis {mask_url(self.redis_url)} ({where})"

    def describe(self, sup: Supervisor, redis_pid: int | None) -> str:
        """The lines printed before the view (they stay on the terminal after it)."""
        names = ", ".join(c.name for c in sup.children)
        queues = ",".join(self.queues) or "the app's default"
        lines = [f"relier cluster: {len(sup.children)} workers ({names}), queues {queues}"]
        if self.embedded:
            lines.append(
                f"embedded redis-server at {self.redis_url} (pid {redis_pid}, stopped on exit)"
            )
            if self.redis_url != self.app_broker:
                lines.append(
                    f"other terminals: export CELERY_BROKER_URL={self.redis_url}, then "
                    f"rl -A {self.target} top"
                )
        else:
            lines.append(f"redis: {mask_url(self.redis_url)} (the app's)")
        lines.append(f"{self.otel_words()}; resurrector in this process (pid {os.getpid()})")
        lines.append(f"logs: {self.logs}")
        return "\n".join(lines)


class Signals:
    """SIGINT and SIGTERM counted instead of raised, while in use."""

    def __init__(self) -> None:
        self.count = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1

    def __enter__(self) -> Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early on a signal."""
        seen, end = self.count, time.monotonic() + seconds
        while self.count == seen and time.monotonic() < end:
            time.sleep(min(0.05, max(end - time.monotonic(), 0.0)))


def _resolve(sup: Supervisor, snap: Snapshot) -> None:
    """Each worker's lease id (``name/pid/uuid``) once it has registered."""
    for child in sup.children:
        if child.worker_id is None and child.pid is not None:
            prefix = f"{child.name}/{child.pid}/"
            child.worker_id = next(
                (w.worker for w in snap.workers if w.worker.startswith(prefix)), None
            )


def _state(child: Child, status: dict[str, str]) -> Text:
    if not child.alive():
        return Text(f"exited ({describe_exit(child.last_exit)})", style="bold red")
    if child.worker_id is None:
        return Text("starting", style="yellow")
    word = status.get(child.worker_id, "registered")
    return Text(word, style=WORKER_STYLES.get(word, ""))


def header(sup: Supervisor, info: ClusterInfo, snap: Snapshot | None) -> list[RenderableType]:
    """The supervised processes: name, pid, uptime, restarts, state; the last restarts."""
    status = {w.worker: w.status for w in snap.workers} if snap is not None else {}
    table = Table(title="cluster", title_justify="left", expand=True, box=None)
    table.add_column("PROCESS", ratio=3, overflow="ellipsis", no_wrap=True)
    table.add_column("PID", justify="right", no_wrap=True)
    table.add_column("UP", justify="right", no_wrap=True)
    table.add_column("RESTARTS", justify="right", no_wrap=True)
    table.add_column("STATE", ratio=2, no_wrap=True)
    for child in sup.children:
        table.add_row(
            child.name,
            str(child.pid or "-"),
            _dur(sup.uptime(child)),
            str(child.restarts),
            _state(child, status),
        )
    up = _dur(time.monotonic() - info.started)
    table.add_row("resurrector", f"{os.getpid()}", up, "-", Text("scanning (this process)"))
    parts: list[RenderableType] = [
        Text(f"{info.redis_words()} · {info.otel_words()} · restarted {sup.restarts}"),
        table,
    ]
    parts += [Text(line, style="dim") for line in info.events[-EVENTS_SHOWN:]]
    return parts


def _header_lines(sup: Supervisor, info: ClusterInfo) -> int:
    return 5 + len(sup.children) + min(len(info.events), EVENTS_SHOWN)


def watch(
    app: Any, rel: Any, sup: Supervisor, info: ClusterInfo, scanner: Any, signals: Signals
) -> str | None:
    """Supervise and show the live view until a stop signal; a reason if the cluster failed."""
    console = Console(highlight=False)
    queue_of, known = _queue_namer(app)
    fresh: list[str] = []

    def frame() -> RenderableType:
        lines = sup.check()
        info.events += lines
        fresh.extend(lines)
        snap: Snapshot | None = None
        error: RenderableType | None = None
        try:
            snap = take(rel.store, rel.config.lease_ttl, queue_of)
            names = known | set(info.queues) | {t.queue for t in snap.tasks if t.queue}
            snap = dataclasses.replace(snap, queues=broker_queue_depths(app, names))
            _resolve(sup, snap)
        except RelierError as exc:
            error = Text(f"registry: {exc}", style="bold red")
        stamp = time.strftime("%H:%M:%S")
        title = f"relier cluster at {stamp} (every {info.interval} s, Ctrl-C drains and stops)"
        parts: list[RenderableType] = [Text(title, style="bold"), *header(sup, info, snap)]
        if snap is not None:
            height = console.size.height - _header_lines(sup, info) if console.is_terminal else None
            parts.append(
                live_view(snap, "inspect", scan_interval=rel.config.scan_interval, height=height)
            )
        if error is not None:
            parts.append(error)
        return Group(*parts)

    try:
        if console.is_terminal:
            with Live(console=console, screen=True, auto_refresh=False) as screen:
                while not signals.count:
                    screen.update(frame(), refresh=True)
                    signals.sleep(info.interval)
            for line in info.events:  # into the scrollback, which the full screen hid
                click.echo(line)
        else:
            while not signals.count:
                shown = frame()
                for line in fresh:
                    click.echo(line)
                fresh.clear()
                console.print(shown)
                console.print()
                signals.sleep(info.interval)
    except CrashLoop as exc:
        return str(exc)
    return None


def final_line(
    workers: int, drained: int, completed: int, handed: int, returned: int, lost: int, restarts: int
) -> str:
    """The last line of ``cluster up``: the drains' accounting summed over the workers."""

    def n(count: int, word: str) -> str:
        return f"{count} {word}{'' if count == 1 else 's'}"

    ok = drained == workers and lost == 0
    who = n(workers, "worker") if drained == workers else f"{drained} of {n(workers, 'worker')}"
    return (
        f"{'✓' if ok else '✗'} cluster down: {who} drained, {n(completed, 'task')} completed, "
        f"{handed} handed off, {returned} returned, {lost} lost ({n(restarts, 'restart')})"
    )


def _drain_status(rel: Any, child: Child) -> dict[str, str]:
    if child.worker_id is None:
        return {}
    try:
        return dict(rel.store.drain_status(child.worker_id))
    except RelierError:
        return {}


def _task_lines(child: Child, status: dict[str, str], shown: set[str]) -> None:
    for key in sorted(k for k in status if k.startswith("task:")):
        if key not in shown:
            shown.add(key)
            click.echo(task_line(key.removeprefix("task:"), status[key], f"{child.name}: "))


def drain_workers(
    app: Any, rel: Any, sup: Supervisor, info: ClusterInfo, signals: Signals, failure: str | None
) -> int:
    """SIGTERM every worker, follow each drain, print the accounting; the exit status."""
    if failure:
        click.echo(f"✗ {failure}", err=True)
    queue_of, known = _queue_namer(app)
    sup.stopping = True
    click.echo(
        f"draining {len(sup.alive())} worker(s): SIGTERM each (Ctrl-C again hurries the drain: "
        "running tasks are handed off at once)"
    )
    presses = signals.count
    sup.signal_all(signal.SIGTERM)
    window = float(rel.config.drain_timeout) + FINISH_GRACE
    deadline = time.monotonic() + window
    shown: dict[str, set[str]] = {c.name: set() for c in sup.children}
    while sup.alive() and time.monotonic() < deadline:
        if signals.count > presses:
            presses = signals.count
            click.echo("hurrying: running tasks are handed off now, to run again from their queue")
            sup.signal_all(signal.SIGTERM)
        if any(c.worker_id is None for c in sup.alive()):  # registered since the last look
            with contextlib.suppress(RelierError):
                _resolve(sup, take(rel.store, rel.config.lease_ttl, queue_of))
        for child in sup.children:
            _task_lines(child, _drain_status(rel, child), shown[child.name])
        sup.check()
        time.sleep(POLL)
    killed = sup.kill_left()
    totals = {"completed": 0, "handed_off": 0, "returned": 0, "lost": 0}
    drained = 0
    for child in sup.children:
        prefix = f"{child.name}: "
        status = _drain_status(rel, child)
        _task_lines(child, status, shown[child.name])
        if child in killed:
            click.echo(
                f"✗ {prefix}did not exit within {window:g} s: SIGKILLed (what it held is "
                "resurrected from its lease by the next scan)",
                err=True,
            )
        elif status.get("state") == "finished":
            drained += 1
            for key in totals:
                totals[key] += int(status.get(key, 0))
            returned = int(status.get("returned", 0))
            if returned:
                click.echo(f"↩ {prefix}{returned} not started: back in the queue for others")
            click.echo(worker_final_line(status, prefix))
        elif child.worker_id is None:
            drained += 1
            click.echo(f"· {prefix}stopped before it registered: it held nothing")
        else:
            why = status.get("error") or f"exited ({describe_exit(child.last_exit)})"
            click.echo(f"✗ {prefix}did not finish its drain: {why}", err=True)
    if info.embedded:
        try:
            names = known | set(info.queues)
            waiting = sum(broker_queue_depths(app, names).depths.values())
        except Exception:
            waiting = 0
        if waiting:
            click.echo(
                f"⚠ {waiting} task(s) still waiting in the queues go with the embedded Redis "
                "(run on your own Redis to keep them)"
            )
    line = final_line(
        len(sup.children),
        drained,
        totals["completed"],
        totals["handed_off"],
        totals["returned"],
        totals["lost"],
        sup.restarts,
    )
    click.echo(line)
    return 0 if line.startswith("✓") and failure is None else 1
