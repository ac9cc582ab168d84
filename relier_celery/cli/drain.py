"""``relier drain`` and ``relier worker drain``: drain workers (as on SIGTERM) and report.

Both send the ``relier_drain`` remote command and follow each worker's drain record in Redis
(relier_celery/wiring/drain.py). ``drain`` prints the worker's accounting as it changes; ``worker
drain`` prints a line per running task as it ends (completed, or handed off when the window
ran out), then the accounting line. Exit 1 if a worker did not answer, failed, did not finish
in time, or lost anything.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import click

from relier_celery.cli.group import _app, _broker_reachable, _install, relier
from relier_celery.cli.render import short_id

__all__ = ["drain", "task_line", "worker_group"]

# How long after the drain window the command waits for the worker's final accounting.
FINISH_GRACE = 30.0
POLL = 0.2


@dataclass
class _Drained:
    name: str
    worker: str
    shown: str = ""
    tasks: set[str] = field(default_factory=set)


def _start(ctx: click.Context, destination: tuple[str, ...], timeout: float | None) -> Any:
    # Celery's CLI checks command names against the local registry; imported only here, so
    # `celery` processes of apps without relier never register relier's command.
    from relier_celery.wiring import control  # noqa: F401

    app = _app(ctx)
    rel = _install(app)
    _broker_reachable(app)
    replies = app.control.broadcast(
        "relier_drain",
        arguments={"timeout": timeout},
        destination=list(destination) or None,
        reply=True,
        timeout=3.0,
    )
    answered = {name: body for reply in replies or [] for name, body in reply.items()}
    if not answered:
        names = f" named {', '.join(destination)}" if destination else ""
        raise click.ClickException(
            f"no worker{names} answered: check the names (rl -A app workers, celery "
            "inspect ping) and that the workers run relier"
        )
    return rel, answered, sorted(set(destination) - set(answered))


def task_line(task_id: str, raw: str, prefix: str = "") -> str:
    """One task's outcome in ``worker drain``'s words."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = {}
    name, outcome = data.get("name", "?"), data.get("outcome", "?")
    if outcome == "completed":
        return f"✓ {prefix}{short_id(task_id)} {name} completed ({data.get('seconds', 0):.1f}s)"
    return f"⚠ {prefix}{short_id(task_id)} {name} exceeded timeout — re-queuing"


def final_line(status: dict[str, str], prefix: str = "") -> str:
    """The accounting line of a finished drain."""
    handed, lost = int(status.get("handed_off", 0)), int(status.get("lost", 0))
    tasks = "task" if handed == 1 else "tasks"
    mark, how = ("✓", "Clean exit") if lost == 0 else ("✗", "Exit")
    return f"{mark} {prefix}{how}. {handed} {tasks} handed off. {lost} lost."


def _follow(
    rel: Any, drained: list[_Drained], window: float
) -> Iterator[tuple[_Drained, str, dict[str, str]]]:
    """Yield (worker, kind, status) as drains progress: kind is ``progress``, ``finished``,
    ``failed``, or ``timeout`` when a worker did not finish in time."""
    deadline = time.monotonic() + window + FINISH_GRACE
    pending = list(drained)
    while pending and time.monotonic() < deadline:
        for d in list(pending):
            status = rel.store.drain_status(d.worker)
            state = status.get("state", "starting")
            yield d, "progress", status
            if state in ("finished", "failed"):
                yield d, state, status
                pending.remove(d)
        time.sleep(POLL)
    for d in pending:
        yield d, "timeout", {}


def _begin(
    ctx: click.Context, destination: tuple[str, ...], timeout: float | None
) -> tuple[Any, list[_Drained], float, bool]:
    rel, answered, unknown = _start(ctx, destination, timeout)
    failed = bool(unknown)
    for name in unknown:
        click.echo(f"{name}: no such worker answered", err=True)
    drained = []
    for name, body in sorted(answered.items()):
        if "error" in body:
            click.echo(f"{name}: {body['error']}", err=True)
            failed = True
        else:
            drained.append(_Drained(name, body["worker"]))
            click.echo(f"{name}: draining (running tasks get {body['timeout']} s)")
    window = max((float(b.get("timeout", 0)) for b in answered.values()), default=0.0)
    return rel, drained, window, failed


@relier.command(help="Drain workers (as on SIGTERM) and stop them; report each one.")
@click.option("--destination", "-d", multiple=True, help="Worker name (repeatable); all if unset.")
@click.option("--timeout", type=float, default=None, help="Seconds running tasks get.")
@click.pass_context
def drain(ctx: click.Context, destination: tuple[str, ...], timeout: float | None) -> None:
    rel, drained, window, failed = _begin(ctx, destination, timeout)
    for d, kind, status in _follow(rel, drained, window):
        if kind == "progress":
            line = (
                f"{d.name}: {status.get('state', 'starting')}: completed "
                f"{status.get('completed', 0)}, running {status.get('running', '?')}, handed "
                f"off {status.get('handed_off', 0)}, returned {status.get('returned', 0)}"
            )
            if d.shown != line and status.get("state") != "finished":
                click.echo(line)
            d.shown = line
        elif kind == "finished":
            click.echo(
                f"{d.name}: drained: completed {status['completed']}, handed off "
                f"{status['handed_off']}, returned {status['returned']}, lost {status['lost']}"
            )
            failed = failed or status.get("lost") != "0"
        elif kind == "failed":
            click.echo(f"{d.name}: drain failed: {status.get('error')}", err=True)
            failed = True
        else:
            click.echo(f"{d.name}: did not finish draining in time", err=True)
            failed = True
    if failed:
        ctx.exit(1)


@relier.group(name="worker", help="Operate on workers: `worker drain`.")
def worker_group() -> None:
    pass


@worker_group.command(
    name="drain",
    help="Drain workers (as on SIGTERM): a line per running task as it ends, then the "
    "accounting (handed off, lost).",
)
@click.option("--destination", "-d", multiple=True, help="Worker name (repeatable); all if unset.")
@click.option("--timeout", type=float, default=None, help="Seconds running tasks get.")
@click.pass_context
def worker_drain(ctx: click.Context, destination: tuple[str, ...], timeout: float | None) -> None:
    rel, drained, window, failed = _begin(ctx, destination, timeout)
    several = len(drained) > 1
    for d, kind, status in _follow(rel, drained, window):
        prefix = f"{d.name}: " if several else ""
        for key in sorted(k for k in status if k.startswith("task:")):
            if key not in d.tasks:
                d.tasks.add(key)
                click.echo(task_line(key.removeprefix("task:"), status[key], prefix))
        if kind == "finished":
            returned = int(status.get("returned", 0))
            if returned:
                click.echo(f"↩ {prefix}{returned} not started: back in the queue for others")
            click.echo(final_line(status, prefix))
            failed = failed or status.get("lost") != "0"
        elif kind == "failed":
            click.echo(f"✗ {prefix}drain failed: {status.get('error')}", err=True)
            failed = True
        elif kind == "timeout":
            click.echo(f"✗ {d.name}: did not finish draining in time", err=True)
            failed = True
    if failed:
        ctx.exit(1)
