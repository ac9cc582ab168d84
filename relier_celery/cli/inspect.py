"""``relier inspect``, ``relier tasks`` and ``relier workers``: views of one registry snapshot
(relier_celery/inspect.py). Redis only, no broadcast: dead workers' tasks show too."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from ..errors import RelierError
from ..inspect import Filters, Snapshot, broker_queue_depths, render, take, to_json
from . import _app, _install, relier

__all__ = ["inspect", "tasks", "workers"]

# --watch never refreshes faster than this (each refresh is a few Redis round trips).
MIN_INTERVAL = 0.2
_CLEAR = "\x1b[H\x1b[2J"


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
        if not any(c in filters.queue for c in "*?["):
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
            click.option("--watch", is_flag=True, help="Refresh until Ctrl-C."),
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


def _run(ctx: click.Context, view: str, opts: dict[str, Any]) -> None:
    filters = Filters(queue=opts["queue"], worker=opts["worker"], task=opts["task"])
    rounds = (opts["count"] or sys.maxsize) if opts["watch"] else 1
    tty = sys.stdout.isatty()
    try:
        for i in range(rounds):
            if i:
                time.sleep(opts["interval"])
            snap = _snapshot(ctx, filters, with_queues=view == "inspect")
            if opts["as_json"]:
                click.echo(json.dumps(to_json(snap, view), separators=(",", ":")))
                continue
            text = render(snap, view)
            if opts["watch"]:
                stamp = time.strftime("%H:%M:%S", time.localtime(snap.at))
                head = f"relier {view} at {stamp} (every {opts['interval']} s, Ctrl-C to stop)"
                click.echo((_CLEAR if tty else "") + head + "\n" + text + ("" if tty else "\n"))
            else:
                click.echo(text)
    except KeyboardInterrupt:
        pass


@relier.command(help="Every in-flight task, every worker, queue depths and counters.")
@_options
def inspect(ctx: click.Context, **opts: Any) -> None:
    _run(ctx, "inspect", opts)


@relier.command(help="Every in-flight task (relier's registry, dead workers' included).")
@_options
def tasks(ctx: click.Context, **opts: Any) -> None:
    _run(ctx, "tasks", opts)


@relier.command(help="Every worker holding a lease: alive, idle, draining or dead.")
@_options
def workers(ctx: click.Context, **opts: Any) -> None:
    _run(ctx, "workers", opts)
