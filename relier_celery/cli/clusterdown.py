"""How ``rl cluster up`` stops: SIGTERM to every worker (relier's drain), each drain
followed in Redis and reported with ``rl worker drain``'s lines (cli/drain.py), then one final
line summing the accounting. A further Ctrl-C sends each worker another SIGTERM, which hurries
its drain: what still runs is handed off at once, back to the head of its queue.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any

import click

from relier_celery.cli.clusterview import ClusterInfo, resolve
from relier_celery.cli.drain import FINISH_GRACE, task_line
from relier_celery.cli.drain import final_line as worker_final_line
from relier_celery.cli.inspect import _queue_namer
from relier_celery.cli.supervise import Child, Signals, Supervisor, describe_exit
from relier_celery.core.errors import RelierError
from relier_celery.observe.snapshot import broker_queue_depths, take

__all__ = ["drain_workers", "final_line"]

# Seconds between two looks at the workers while they drain.
POLL = 0.2


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
                resolve(sup, take(rel.store, rel.config.lease_ttl, queue_of))
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
