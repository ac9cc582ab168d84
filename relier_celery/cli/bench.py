"""``rl bench all [--quick] [--json]``: the benchmark table on the user's machine, relier against
vanilla Celery in the same run (relier_celery/bench/).

It brings its own app (relier_celery/bench/worker_app/bench_app.py) and Redis (an embedded
redis-server on a free port, removed afterwards, unless ``--redis``), so it needs no ``-A``: an
app given with ``-A`` is not used. A progress bar on stderr while it runs (on a terminal; a line
per step otherwise), the table on stdout at the end, or with ``--json`` one JSON document
instead.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import redis
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from relier_celery.bench.harness import Harness
from relier_celery.bench.report import COLUMNS, footer, rows
from relier_celery.bench.suite import FULL, QUICK, Step, run_all
from relier_celery.cli.group import relier
from relier_celery.core.config import mask_url
from relier_celery.core.errors import RelierError
from relier_celery.testing import RedisServer

__all__ = ["bench_all", "bench_group", "check_redis", "table"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@relier.group(name="bench", help="Benchmarks: relier against vanilla Celery, same run.")
def bench_group() -> None:
    pass


def check_redis(url: str) -> str:
    """The Redis server's version, or one line saying why the bench cannot use ``url``: not a
    Redis URL, unreachable, or a database that holds keys (the bench empties it between
    phases, so it only takes an empty one)."""
    if not url.startswith(REDIS_SCHEMES):
        raise click.BadParameter(
            f"{mask_url(url)} is not a Redis URL (redis://, rediss:// or unix://)",
            param_hint="'--redis'",
        )
    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        r.ping()
        keys = int(r.dbsize())
        server_version = str(r.info("server").get("redis_version", "?"))
    except (redis.RedisError, ValueError, OSError) as exc:
        raise click.ClickException(f"cannot reach Redis at {mask_url(url)}: {exc}") from None
    if keys:
        raise click.ClickException(
            f"the Redis database at {mask_url(url)} holds {keys} key(s): the bench empties its "
            "database between phases, so give it an empty one (e.g. another /db number), or "
            "leave out --redis for an embedded redis-server"
        )
    return server_version


@contextmanager
def _redis(url: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    if url is not None:
        server_version = check_redis(url)
        yield url, {"version": server_version, "where": f"given: {mask_url(url)}"}
        return
    server = RedisServer()
    try:
        embedded = server.start()
    except (RuntimeError, OSError, TimeoutError) as exc:
        server.stop()
        raise click.ClickException(f"cannot start an embedded redis-server: {exc}") from None
    try:
        info = redis.Redis.from_url(embedded).info("server")
        yield (
            embedded,
            {
                "version": str(info.get("redis_version", "?")),
                "where": f"embedded redis-server on port {server.port}, removed afterwards",
            },
        )
    finally:
        server.stop()


def table(doc: dict[str, Any]) -> Table:
    """The rich table of a ``bench all`` document."""
    t = Table(title="relier vs vanilla Celery", title_justify="left", expand=False)
    for name in COLUMNS:
        t.add_column(name, overflow="fold")
    for row in rows(doc):
        t.add_row(*row)
    return t


@bench_group.command(name="all")
@click.option("--quick", is_flag=True, help="Smaller runs: under 3 minutes on 2 cores.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document, no table.")
@click.option(
    "--redis",
    "redis_url",
    default=None,
    metavar="URL",
    help="An empty Redis database to run on (emptied between phases). "
    "Default: an embedded redis-server on a free port, removed afterwards.",
)
@click.option(
    "--vanilla-python",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Run the vanilla workers with this interpreter (a virtualenv where relier is not "
    "installed, with the same celery, kombu and redis).",
)
# For tests that need every figure sooner: every count of the profile times this factor.
@click.option("--scale", type=click.FloatRange(0.05, 10), default=1.0, hidden=True)
def bench_all(
    quick: bool,
    as_json: bool,
    redis_url: str | None,
    vanilla_python: str | None,
    scale: float,
) -> None:
    """Every benchmark, relier against vanilla Celery in the same run: delivery under SIGKILL
    chaos, recovery time, duplicate side effects of an idempotent task, the admission
    decision, drain on SIGTERM, throughput and added latency. The vanilla side is proven to
    have run without relier (no relier log line, bootstep or key), or the run stops."""
    profile = QUICK if quick else FULL
    if scale != 1.0:
        profile = profile.scaled(scale)
    if vanilla_python is not None:
        _check_vanilla_python(vanilla_python)
    err = Console(stderr=True, highlight=False)
    try:
        with (
            _redis(redis_url) as (url, info),
            tempfile.TemporaryDirectory(prefix="relier-bench-") as logs,
        ):
            harness = Harness(url, Path(logs), vanilla_python=vanilla_python)
            with _progress(err) as on_step:
                doc = run_all(harness, profile, quick=quick, redis_info=info, on_step=on_step)
    except RelierError as exc:
        raise click.ClickException(str(exc)) from None
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis failed during the bench: {exc}") from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted: no figures (every worker was stopped)") from None
    if not doc["vanilla_proof"]["ok"]:
        raise click.ClickException("no vanilla phase was checked: the figures prove nothing")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    out = Console(highlight=False)
    out.print(table(doc))
    for line in footer(doc):
        out.print(line, markup=False, soft_wrap=True)


def _check_vanilla_python(python: str) -> None:
    import subprocess

    probe = subprocess.run(
        [
            python,
            "-c",
            "import celery, kombu, redis, importlib.util as u; "
            "print(u.find_spec('relier_celery') is None)",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise click.BadParameter(
            f"{python} cannot import celery, kombu and redis", param_hint="'--vanilla-python'"
        )
    if probe.stdout.strip() != "True":
        raise click.BadParameter(
            f"relier_celery is installed for {python}: not a vanilla interpreter",
            param_hint="'--vanilla-python'",
        )


@contextmanager
def _progress(err: Console) -> Iterator[Any]:
    """A rich progress bar on a terminal, a line per step elsewhere; yields ``on_step``."""
    if not err.is_terminal:

        def line(todo: list[Step], i: int) -> None:
            print(f"bench [{i + 1}/{len(todo)}] {todo[i].label}", file=sys.stderr, flush=True)

        yield line
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[step]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    with progress:
        bar = progress.add_task("starting", total=None, step="")

        def advance(todo: list[Step], i: int) -> None:
            # The bar moves by each step's expected seconds, so it reads as time left.
            progress.update(
                bar,
                total=sum(s.seconds for s in todo),
                completed=sum(s.seconds for s in todo[:i]),
                description=todo[i].label,
                step=f"{i + 1}/{len(todo)}",
            )

        yield advance
