"""``rl chaos worker-kill``: prove the guarantees on your own fleet.

Picks live workers from relier's registry (the process each one recorded with its running
set: pid, host, start time), on this host only, and signals a pid only while its start time
still matches (never by name: a reused pid is never hit). Then follows every task the worker
held at the kill (cli/follow.py) until it is held again by a live worker, lands in the DLQ, or
is lost at the deadline, and prints the recovery time of each.

Modes: ``main`` SIGKILLs the worker's main process; ``child`` SIGKILLs one of its pool
processes; ``term`` sends SIGTERM (a drain); ``stop`` freezes the worker and its pool
(SIGSTOP) for twice the lease, then lets it go on (SIGCONT).
"""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from relier_celery.cli.follow import IN_PLACE, QUARANTINED, RECOVERED, UNAFFECTED, Followed
from relier_celery.cli.group import _app, _install, relier
from relier_celery.cli.kill import ALIVE, POLL, ChaosRun
from relier_celery.cli.render import short_id
from relier_celery.store.client import parse_sentinel_url

__all__ = ["chaos_group", "is_loopback", "worker_kill"]

MODES = ("main", "child", "term", "stop")


def is_loopback(url: str) -> bool:
    """Whether a Redis URL (or kombu's ``;``-separated Sentinel URLs) names this machine."""
    if url.startswith("unix://") or url.startswith("redis+socket://"):
        return True
    if url.startswith("sentinel://"):
        try:
            nodes, _ = parse_sentinel_url(url)
        except ValueError:
            return False
        return bool(nodes) and all(is_loopback(f"redis://{h}:{p}") for h, p in nodes)
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_target(app: Any, rel: Any, allow_remote: bool) -> None:
    conn = app.connection_for_read()
    try:
        driver = getattr(conn.transport, "driver_type", "?")
        broker = conn.as_uri()
    finally:
        conn.release()
    if driver != "redis":
        raise click.ClickException(
            f"rl chaos follows tasks through their queues, which needs a Redis broker; this "
            f"app's broker is {driver} ({broker})"
        )
    if allow_remote:
        return
    for what, url in (("relier's Redis", rel.config.redis_url), ("the broker", broker)):
        if not is_loopback(url):
            from relier_celery.core.config import mask_url

            raise click.ClickException(
                f"{what} ({mask_url(url)}) is not on this machine's loopback: chaos refuses "
                "to run against what may be a shared fleet. Pass --allow-remote if you mean it"
            )


def describe(f: Followed) -> str:
    """One followed task's line."""
    head = f"{short_id(f.task_id)} {f.name}"
    if f.outcome == RECOVERED:
        return f"✓ {head} recovered in {f.recovery or 0:.1f}s ({f.where})"
    if f.outcome == IN_PLACE:
        return f"✓ {head} completed where it ran (not hit)"
    if f.outcome == UNAFFECTED:
        return f"· {head} not hit: still {f.where}"
    if f.outcome == QUARANTINED:
        return f"☠ {head} quarantined (in the DLQ)"
    return f"✗ {head} LOST: {f.where} at the deadline"


def final_line(killed: int, s: dict[str, Any]) -> str:
    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    return (
        f"killed {killed}, tasks affected {s['affected']}, recovered {s['recovered']}, "
        f"quarantined {s['quarantined']}, lost {s['lost']}, recovery p50 "
        f"{secs(s['recovery_p50'])} s p99 {secs(s['recovery_p99'])} s"
    )


@relier.group(name="chaos", help="Prove the guarantees yourself: kill workers, follow tasks.")
def chaos_group() -> None:
    pass


@chaos_group.command(name="worker-kill")
@click.option("--mode", type=click.Choice(MODES), default="main", show_default=True)
@click.option(
    "--every",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds between two kills.",
)
@click.option(
    "--count", type=click.IntRange(min=1), default=1, show_default=True, help="Workers to hit."
)
@click.option("--worker", "-d", default=None, help="Only this worker (id or hostname).")
@click.option(
    "--deadline",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds after the last kill a task has to recover before it counts as lost.",
)
@click.option("--watch", is_flag=True, help="Show progress (rich) while following.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document at the end.")
@click.option("--allow-remote", is_flag=True, help="Run against a Redis not on loopback.")
@click.pass_context
def worker_kill(
    ctx: click.Context,
    mode: str,
    every: float,
    count: int,
    worker: str | None,
    deadline: float,
    watch: bool,
    as_json: bool,
    allow_remote: bool,
) -> None:
    """Kill live workers of this host (main, child, term or stop) and follow every task they
    held until it runs again, lands in the DLQ, or is lost. Exit 1 if anything was lost."""
    app = _app(ctx)
    rel = _install(app)
    _check_target(app, rel, allow_remote)
    console = Console(highlight=False, stderr=as_json)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=console,
        disable=not watch or as_json,
        transient=True,
    )
    run = ChaosRun(
        app,
        rel,
        lambda line: None if as_json else console.print(line, markup=False, soft_wrap=True),
    )
    first = run.snapshot()
    if worker is not None and not any(
        worker in (w.worker, w.worker.split("/", 1)[0]) for w in first.workers
    ):
        raise click.ClickException(
            f"no worker {worker!r} in relier's registry: `rl -A app workers` lists them"
        )
    live = run.candidates(first, worker)
    if not live:
        raise click.ClickException(
            "no live relier worker of this host to hit (chaos signals only processes of this "
            "machine whose pid and start time match the registry): start some workers first"
        )
    if not any(t.worker in live for t in first.tasks):
        line = "nothing to prove: the live workers hold no task (send some work, then run this)"
        click.echo(json.dumps({"killed": 0, "nothing_to_prove": True}) if as_json else line)
        return
    try:
        with progress:
            bar = progress.add_task("following", total=0)
            for n in range(count):
                snap = run.snapshot() if n else first
                targets = run.candidates(snap, worker)
                if not targets:
                    run.out(f"no live worker left to hit after {n} kill(s)")
                    break
                run.kill(snap, run.pick(snap, targets), mode)
                until = time.monotonic() + (every if n + 1 < count else 0)
                while True:
                    for f in run.look():
                        run.out(describe(f))
                    _advance(progress, bar, run)
                    if time.monotonic() >= until:
                        break
                    time.sleep(POLL)
            end = time.monotonic() + deadline
            while run.tracker.pending and time.monotonic() < end:
                time.sleep(POLL)
                for f in run.look():
                    run.out(describe(f))
                _advance(progress, bar, run)
            alive = {w.worker for w in run.snapshot().workers if w.status in ALIVE}
            for f in run.tracker.expire(alive, time.time()):
                run.out(describe(f))
    finally:
        run.resume_due(force=True)
    summary = run.tracker.summary()
    line = final_line(len(run.kills), summary)
    if as_json:
        doc = {
            "killed": len(run.kills),
            **summary,
            "kills": run.kills,
            "tasks": [f.to_json() for f in run.tracker.tasks],
        }
        click.echo(json.dumps(doc))
    else:
        console.print(line, markup=False, soft_wrap=True)
    if summary["lost"]:
        ctx.exit(1)


def _advance(progress: Progress, bar: Any, run: ChaosRun) -> None:
    tasks = run.tracker.tasks
    done = sum(1 for f in tasks if f.outcome is not None)
    s = run.tracker.summary()
    progress.update(
        bar,
        total=len(run.tracker.tasks),
        completed=done,
        description=f"killed {len(run.kills)} · recovered {s['recovered']} · lost {s['lost']}",
    )
