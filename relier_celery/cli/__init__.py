"""``celery -A app relier ...`` and its short alias ``rl -A app ...``.

The ``relier`` click group is registered through the ``celery.commands`` entry point, so
Celery's own CLI loads the app (``ctx.obj.app``). ``rl`` rewrites its arguments into that form
and runs Celery's CLI, so both spellings are the same code.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..errors import RelierError

__all__ = ["main", "relier"]

# Celery's global options that take a value; everything before the first other word is
# Celery's, the rest is relier's.
_VALUE_OPTIONS = {
    "-A",
    "--app",
    "-b",
    "--broker",
    "--result-backend",
    "--loader",
    "--config",
    "--workdir",
}


def _app(ctx: click.Context) -> Any:
    obj = ctx.find_object(object) if ctx.obj is None else ctx.obj
    app = getattr(obj, "app", None)
    if app is None:
        raise click.UsageError("no Celery app: pass -A/--app")
    return app


def _install(app: Any) -> Any:
    from ..plugin import install

    try:
        return install(app)
    except RelierError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(name="relier", help="Relier: inspect and operate the reliability layer.")
def relier() -> None:
    pass


@relier.command(help="Print the effective relier settings (passwords masked).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def config(ctx: click.Context, as_json: bool) -> None:
    settings = _install(_app(ctx)).config.describe()
    if as_json:
        click.echo(json.dumps(settings, indent=2))
        return
    width = max(len(k) for k in settings)
    for key, value in settings.items():
        click.echo(f"{key:<{width}}  {value!r}")


@relier.command(help="Run a standalone resurrection scanner until interrupted.")
@click.option("--once", is_flag=True, help="Scan once and exit.")
@click.pass_context
def resurrector(ctx: click.Context, once: bool) -> None:
    from ..resurrect import Resurrector

    app = _app(ctx)
    app.loader.import_default_modules()  # task options such as max_resurrections
    rel = _install(app)
    scanner = Resurrector(app, rel.config, rel.store, name="standalone")
    from ..observe import start as start_observers

    observers = start_observers(rel)  # counters in Redis, OpenTelemetry if enabled
    try:
        if once:
            click.echo(f"resurrected or quarantined {scanner.scan_once()} task(s)")
            return
        click.echo(
            f"relier resurrector scanning every {rel.config.scan_interval} s (Ctrl-C to stop)"
        )
        scanner.run_forever()
    except RelierError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        pass
    finally:
        observers.close()


def main(argv: list[str] | None = None) -> None:
    """``rl``: the same commands as ``celery -A app relier``."""
    from celery.bin.celery import main as celery_main

    args = list(sys.argv[1:] if argv is None else argv)
    head: list[str] = []
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("--help", "-h"):
        opt = args[i]
        head.append(opt)
        if opt in _VALUE_OPTIONS:
            head.append(args[i + 1] if i + 1 < len(args) else "")
            i += 1
        i += 1
    sys.argv = ["celery", *head, "relier", *args[i:]]
    celery_main()


@relier.command(help="Drain workers (as on SIGTERM) and stop them; report each one.")
@click.option("--destination", "-d", multiple=True, help="Worker name (repeatable); all if unset.")
@click.option("--timeout", type=float, default=None, help="Seconds running tasks get.")
@click.pass_context
def drain(ctx: click.Context, destination: tuple[str, ...], timeout: float | None) -> None:
    import time

    from .. import control  # noqa: F401  (the command must be known locally)

    app = _app(ctx)
    rel = _install(app)
    replies = app.control.broadcast(
        "relier_drain",
        arguments={"timeout": timeout},
        destination=list(destination) or None,
        reply=True,
        timeout=3.0,
    )
    answered = {name: body for reply in replies or [] for name, body in reply.items()}
    unknown = sorted(set(destination) - set(answered))
    if not answered:
        names = f" named {', '.join(destination)}" if destination else ""
        raise click.ClickException(
            f"no worker{names} answered: check the names (celery "
            "inspect ping) and that the workers run relier"
        )
    failed = bool(unknown)
    for name in unknown:
        click.echo(f"{name}: no such worker answered", err=True)
    workers = {}
    for name, body in sorted(answered.items()):
        if "error" in body:
            click.echo(f"{name}: {body['error']}", err=True)
            failed = True
        else:
            workers[name] = body["worker"]
            click.echo(f"{name}: draining (running tasks get {body['timeout']} s)")
    window = max((float(b.get("timeout", 0)) for b in answered.values()), default=0.0)
    deadline = time.monotonic() + window + 30
    shown: dict[str, str] = {}
    pending = dict(workers)
    while pending and time.monotonic() < deadline:
        for name, worker_id in list(pending.items()):
            status = rel.store.drain_status(worker_id)
            state = status.get("state", "starting")
            line = (
                f"{name}: {state}: completed {status.get('completed', 0)}, running "
                f"{status.get('running', '?')}, handed off {status.get('handed_off', 0)}, "
                f"returned {status.get('returned', 0)}"
            )
            if shown.get(name) != line:
                shown[name] = line
                if state != "finished":
                    click.echo(line)
            if state == "finished":
                click.echo(
                    f"{name}: drained: completed {status['completed']}, handed off "
                    f"{status['handed_off']}, returned {status['returned']}, "
                    f"lost {status['lost']}"
                )
                failed = failed or status.get("lost") != "0"
                del pending[name]
            elif state == "failed":
                click.echo(f"{name}: drain failed: {status.get('error')}", err=True)
                failed = True
                del pending[name]
        time.sleep(0.2)
    for name in pending:
        click.echo(f"{name}: did not finish draining in time", err=True)
        failed = True
    if failed:
        ctx.exit(1)


from . import dlq as _dlq  # noqa: E402, F401  (registers `relier dlq`)

# relier inspect / tasks / workers register themselves on the group.
from . import inspect as _inspect  # noqa: E402, F401
