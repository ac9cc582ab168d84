"""The ``relier`` click group, the helpers its commands share, and ``rl``: the short alias of
``celery -A app relier ...``.

The ``relier`` click group is registered through the ``celery.commands`` entry point, so
Celery's own CLI loads the app (``ctx.obj.app``). ``rl`` rewrites its arguments into that form
and runs Celery's CLI, so both spellings are the same code.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from relier_celery.core.errors import RelierError

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
    """The app's relier; a clear error for an app that does not enable it or a bad setting."""
    from relier_celery.wiring.install import decide, get, install

    try:
        if get(app) is None and not decide(app):
            raise click.ClickException(
                f"the app {app.main!r} does not enable relier: add 'relier_celery' to its "
                "imports (app.conf.imports = ('relier_celery',)) or call "
                "relier_celery.install(app) where it is defined"
            )
        return install(app)
    except RelierError as exc:
        raise click.ClickException(str(exc)) from exc


def _broker_reachable(app: Any) -> None:
    """Fail with one line, not kombu's retries and a traceback, when the broker is down."""
    from relier_celery.core.config import mask_url

    conn = app.connection_for_write()
    try:
        conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        raise click.ClickException(
            f"cannot reach the broker at {mask_url(conn.as_uri())}: {exc}"
        ) from None
    finally:
        conn.release()


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
    from relier_celery.recovery.resurrect import Resurrector

    app = _app(ctx)
    app.loader.import_default_modules()  # task options such as max_resurrections
    rel = _install(app)
    scanner = Resurrector(app, rel.config, rel.store, name="standalone")
    from relier_celery.observe.subscribers import start as start_observers

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
