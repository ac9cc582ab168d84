"""What ``rl cluster up`` shows: the live view of ``rl top`` (cli/render.py) under a header of
the supervised processes (name, pid, uptime, restarts, state in relier's registry) and the
last restarts. On a terminal it redraws one screen in place; elsewhere each refresh is printed
after the last, as plain text, with a line per restart.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from relier_celery.cli.inspect import _queue_namer
from relier_celery.cli.render import WORKER_STYLES, _dur, live_view
from relier_celery.cli.supervise import Child, CrashLoop, Signals, Supervisor, describe_exit
from relier_celery.core.config import mask_url
from relier_celery.core.errors import RelierError
from relier_celery.observe.snapshot import Snapshot, broker_queue_depths, take

__all__ = ["ClusterInfo", "header", "resolve", "watch"]

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
    otel_off: str  # why the exporter is off although OTEL_* is set
    queues: tuple[str, ...]
    interval: float
    logs: Path
    started: float = field(default_factory=time.monotonic)
    events: list[str] = field(default_factory=list)

    def otel_words(self) -> str:
        if self.otel:
            return "OpenTelemetry exporter on"
        if self.otel_off:
            return f"OpenTelemetry exporter off (OTEL_* is set but {self.otel_off})"
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


def resolve(sup: Supervisor, snap: Snapshot) -> None:
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
            resolve(sup, snap)
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
