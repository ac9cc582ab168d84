"""``celery -A app relier dlq list|show|release|purge``: the operator's tools for the DLQ.

Exit codes: 0 done; 1 nothing matched, an unknown id, or a declined confirmation; 2 bad usage
(click's own).
"""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import UTC, datetime
from typing import Any

import click

from relier_celery.cli.group import _app, _install, relier
from relier_celery.core.rates import UNITS
from relier_celery.recovery import dlq as dead_letters
from relier_celery.recovery.envelope import decode_body

__all__ = ["dlq_group"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
# Admission's units (core/rates.py), plus weeks and bare seconds for retention ages.
_UNITS = {**UNITS, "": 1.0, "w": 7 * UNITS["d"]}


def parse_duration(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"`` or plain seconds."""
    match = _DURATION.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration such as 7d, 12h, 30m or 45s")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _when(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        return "?"


def _summary(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry without its message body (for list --json)."""
    return {k: v for k, v in entry.items() if k != "message"}


def _payload(entry: dict[str, Any]) -> dict[str, Any]:
    """The message's arguments, decoded when the body is JSON; raw bytes (base64) otherwise."""
    message = entry.get("message") or {}
    raw = base64.b64decode(message.get("body") or "")
    try:
        args, kwargs, _ = decode_body(
            raw,
            message.get("content_type"),
            message.get("content_encoding"),
            {"application/json"},
        )
        return {"args": args, "kwargs": kwargs}
    except Exception:
        return {
            "raw_body_base64": message.get("body"),
            "raw_body_preview": raw[:200].decode("utf-8", "replace"),
        }


def _select(
    store: Any,
    entry_id: str | None,
    all_: bool,
    task: str | None,
    reason: str | None,
    older_than: float | None = None,
) -> list[dict[str, Any]]:
    if bool(entry_id) == all_:
        raise click.UsageError("give one entry ID, or --all (with --task / --reason filters)")
    if entry_id:
        try:
            return [dead_letters.find(store, entry_id)]
        except KeyError as exc:
            raise click.ClickException(str(exc.args[0])) from None
    chosen = dead_letters.entries(store, task=task, reason=reason)
    if older_than is not None:
        cutoff = time.time() - older_than
        chosen = [e for e in chosen if float(e.get("quarantined_at", 0)) < cutoff]
    return chosen


@relier.group(name="dlq", help="List, show, release and purge dead-lettered tasks.")
def dlq_group() -> None:
    pass


@dlq_group.command(name="list", help="List DLQ entries, oldest first.")
@click.option("--task", default=None, help="Only this task name.")
@click.option("--reason", default=None, help="Only this reason (e.g. exception, undecodable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (without message bodies).")
@click.pass_context
def list_entries(ctx: click.Context, task: str | None, reason: str | None, as_json: bool) -> None:
    store = _install(_app(ctx)).store
    found = dead_letters.entries(store, task=task, reason=reason)
    if as_json:
        click.echo(json.dumps([_summary(e) for e in found], indent=2, default=str))
        return
    if not found:
        click.echo("the DLQ is empty" if not (task or reason) else "no entry matches")
        return
    click.echo(f"{'ID':<32}  {'QUARANTINED (UTC)':<19}  {'REASON':<23}  TASK  [TASK ID]")
    for e in found:
        click.echo(
            f"{e['id']:<32}  {_when(e.get('quarantined_at')):<19}  {e.get('reason', '?'):<23}  "
            f"{e.get('task_name')}  [{e.get('task_id')}]"
        )
    click.echo(f"{len(found)} entr{'y' if len(found) == 1 else 'ies'}")


@dlq_group.command(help="Show one entry: reason, error or traceback, arguments, headers.")
@click.argument("entry_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole entry as JSON.")
@click.pass_context
def show(ctx: click.Context, entry_id: str, as_json: bool) -> None:
    store = _install(_app(ctx)).store
    try:
        entry = dead_letters.find(store, entry_id)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from None
    if as_json:
        click.echo(json.dumps({**entry, "payload": _payload(entry)}, indent=2, default=str))
        return
    message = entry.get("message") or {}
    for label, value in (
        ("id", entry["id"]),
        ("task", f"{entry.get('task_name')} [{entry.get('task_id')}]"),
        ("reason", entry.get("reason")),
        ("quarantined", f"{_when(entry.get('quarantined_at'))} UTC by {entry.get('worker')}"),
        (
            "counts",
            f"retries {entry.get('retries')}, resurrections {entry.get('resurrections')}, "
            f"crashes {entry.get('crashes')}",
        ),
        (
            "queue",
            f"exchange {message.get('exchange')!r}, routing key {message.get('routing_key')!r}",
        ),
        ("content", f"{message.get('content_type')} / {message.get('content_encoding')}"),
    ):
        click.echo(f"{label + ':':<13}{value}")
    click.echo("payload:     " + json.dumps(_payload(entry), default=str))
    click.echo("headers:     " + json.dumps(message.get("headers"), default=str))
    click.echo("error:\n" + str(entry.get("error", "")).rstrip())


@dlq_group.command(help="Republish entries' original messages (counts reset) and remove them.")
@click.argument("entry_id", required=False)
@click.option("--all", "all_", is_flag=True, help="Every entry (narrow with --task/--reason).")
@click.option("--task", default=None, help="With --all: only this task name.")
@click.option("--reason", default=None, help="With --all: only this reason.")
@click.pass_context
def release(
    ctx: click.Context, entry_id: str | None, all_: bool, task: str | None, reason: str | None
) -> None:
    app = _app(ctx)
    store = _install(app).store
    chosen = _select(store, entry_id, all_, task, reason)
    if not chosen:
        click.echo("no entry matches", err=True)
        ctx.exit(1)
    for entry in chosen:
        record = dead_letters.release(app, store, entry)
        click.echo(f"released {entry['id']}: {record.task_name}[{record.task_id}]")
    click.echo(f"{len(chosen)} released")


@dlq_group.command(help="Delete entries for good (asks first unless --yes).")
@click.argument("entry_id", required=False)
@click.option("--all", "all_", is_flag=True, help="Every entry (narrow with the filters).")
@click.option("--task", default=None, help="With --all: only this task name.")
@click.option("--reason", default=None, help="With --all: only this reason.")
@click.option("--older-than", default=None, help="With --all: only entries older than (7d, 12h).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge(
    ctx: click.Context,
    entry_id: str | None,
    all_: bool,
    task: str | None,
    reason: str | None,
    older_than: str | None,
    yes: bool,
) -> None:
    store = _install(_app(ctx)).store
    age = parse_duration(older_than) if older_than is not None else None
    chosen = _select(store, entry_id, all_, task, reason, age)
    if not chosen:
        click.echo("no entry matches", err=True)
        ctx.exit(1)
    what = f"{len(chosen)} DLQ entr{'y' if len(chosen) == 1 else 'ies'}"
    if not yes and not click.confirm(f"Purge {what} for good?", default=False):
        click.echo("nothing purged", err=True)
        ctx.exit(1)
    click.echo(f"purged {dead_letters.purge(store, chosen)} of {what}")
