"""``relier inspect``, ``tasks [inflight]``, ``workers`` and ``top``: views of one registry
snapshot (relier_celery/observe/snapshot.py). Redis only, no broadcast: dead workers' tasks show
too.

``--watch`` (and ``top``, which is ``tasks inflight --watch``) redraws a rich live view in
place, full screen on a terminal; elsewhere each refresh is printed after the last, as plain
text. ``--json`` prints one JSON document per refresh, whatever the view.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.live import Live

from relier_celery.cli.group import _app, _install, relier
from relier_celery.cli.render import live_view, render
from relier_celery.core.errors import RelierError
from relier_celery.observe.snapshot import Filters, Snapshot, broker_queue_depths, take
from relier_celery.observe.summary import to_json

__all__ = ["inspect", "tasks", "top", "workers"]

# --watch never refreshes faster than this (each refresh is a few Redis round trips).
MIN_INTERVAL = 0.2
_GLOB = "*?["


def _queue_namer(app: Any) -> tuple[Callable[[str, str], str], set[str]]:
    """Map a record's (exchange, routing key) to the app's queue of that routing key."""
    by_key: dict[str, str] = {}
    try:
        queues = dict(app.amqp.queues)
    except Exception:
        queues = {}
    for name, queue in queues.items():
        by_key.setdefault(str(queue.routing_key or name), str(name))

    def queue_of(exchange: str, routing_key: str) -> str:
        return by_key.get(routing_key, routing_key)

    return queue_of, set(queues)


def _snapshot(ctx: click.Context, filters: Filters, with_queues: bool) -> Snapshot:
    app = _app(ctx)
    rel = _install(app)
    queue_of, known = _queue_namer(app)
    try:
        snap = take(rel.store, rel.config.lease_ttl, queue_of, filters)
    except RelierError as exc:
        raise click.ClickException(str(exc)) from exc
    if not with_queues:
        return snap
    names = known | {t.queue for t in snap.tasks if t.queue}
    if filters.queue is not None:
        if not any(c in filters.queue for c in _GLOB):
            names.add(filters.queue)
        names = {n for n in names if Filters(queue=filters.queue).queue_ok(n)}
    return Snapshot(**{**snap.__dict__, "queues": broker_queue_depths(app, names)})


def _options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--json", "as_json", is_flag=True, help="Print JSON (one per refresh)."),
            click.option("--queue", default=None, help="Only this queue (shell pattern)."),
            click.option("--worker", default=None, help="Only this worker (id or hostname)."),
            click.option("--task", default=None, help="Only this task name (pattern) or id."),
            click.option("--watch", is_flag=True, help="A live view, refreshed until Ctrl-C."),
            click.option(
                "--interval",
                type=click.FloatRange(min=MIN_INTERVAL),
                default=2.0,
                show_default=True,
                help="Seconds between refreshes with --watch.",
            ),
            click.option(
                "--count",
                type=click.IntRange(min=1),
                default=None,
                help="With --watch: stop after this many refreshes.",
            ),
        ]
    ):
        fn = option(fn)
    return click.pass_context(fn)


def _check_worker(filters: Filters, snap: Snapshot) -> None:
    """A worker named exactly (no pattern) that the registry does not know is a mistake."""
    name = filters.worker
    if name is not None and not any(c in name for c in _GLOB) and not snap.workers:
        raise click.ClickException(
            f"no worker {name!r} in relier's registry: `rl -A app workers` lists the workers "
            "(an id, or its hostname such as w1@host)"
        )


def _run(
    ctx: click.Context,
    view: str,
    opts: dict[str, Any],
    live: str | None = None,
    label: str | None = None,
) -> None:
    """Print ``view`` (inspect, tasks, workers) once, or refresh it with --watch as the
    ``live`` view (default: the same), titled ``relier <label>``."""
    filters = Filters(queue=opts["queue"], worker=opts["worker"], task=opts["task"])
    live = live or view
    with_queues = view == "inspect" or (opts["watch"] and live == "inspect")
    if not opts["watch"]:
        snap = _snapshot(ctx, filters, with_queues)
        _check_worker(filters, snap)
        text = json.dumps(to_json(snap, view), separators=(",", ":")) if opts["as_json"] else None
        click.echo(text if text is not None else render(snap, view))
        return
    rel = _install(_app(ctx))
    rounds = opts["count"] or sys.maxsize
    console = Console(highlight=False)

    def frames() -> Any:
        for i in range(rounds):
            if i:
                time.sleep(opts["interval"])
            snap = _snapshot(ctx, filters, with_queues)
            stamp = time.strftime("%H:%M:%S", time.localtime(snap.at))
            title = (
                f"relier {label or view} at {stamp} (every {opts['interval']} s, Ctrl-C to stop)"
            )
            yield snap, title

    def frame(snap: Snapshot, title: str) -> Any:
        return live_view(
            snap,
            live,
            title=title,
            scan_interval=rel.config.scan_interval,
            height=console.size.height if console.is_terminal else None,
        )

    try:
        if opts["as_json"]:
            for snap, _ in frames():
                click.echo(json.dumps(to_json(snap, view), separators=(",", ":")))
        elif console.is_terminal:
            with Live(console=console, screen=True, auto_refresh=False) as screen:
                for snap, title in frames():
                    screen.update(frame(snap, title), refresh=True)
        else:
            for snap, title in frames():
                console.print(frame(snap, title))
                console.print()
    except KeyboardInterrupt:
        pass


@relier.command(help="Every in-flight task, every worker, queue depths and counters.")
@_options
def inspect(ctx: click.Context, **opts: Any) -> None:
    _run(ctx, "inspect", opts)


@relier.command(
    help="Every in-flight task (relier's registry, dead workers' included). `tasks inflight "
    "--watch` is the live view of the whole fleet (also `top`)."
)
@click.argument("what", required=False, type=click.Choice(["inflight"]))
@_options
def tasks(ctx: click.Context, what: str | None, **opts: Any) -> None:
    live = "inspect" if what == "inflight" else "tasks"
    _run(ctx, "tasks", opts, live=live, label="tasks inflight" if what else "tasks")


@relier.command(help="The live view of the fleet: `tasks inflight --watch` (Ctrl-C to stop).")
@_options
def top(ctx: click.Context, **opts: Any) -> None:
    _run(ctx, "tasks", {**opts, "watch": True}, live="inspect", label="top")


@relier.command(help="Every worker holding a lease: alive, idle, draining or dead.")
@_options
def workers(ctx: click.Context, **opts: Any) -> None:
    _run(ctx, "workers", opts)
