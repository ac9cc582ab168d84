"""The rows of ``bench all``'s table, drawn from its JSON document and nothing else.

Each cell is a format string over dotted paths of the document (``{delivery.relier.lost}``),
so :data:`TABLE_FIELDS`, every path the table shows, is read off the strings themselves: a
test that finds each of them in ``--json`` has checked every figure of the table.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["COLUMNS", "ROWS", "TABLE_FIELDS", "footer", "lookup", "rows"]

COLUMNS = ("measurement", "relier", "vanilla Celery")

# (measurement, relier, vanilla, how it was measured): "-" where a side has no figure. The
# last part is printed under the table, a line per measurement.
ROWS: tuple[tuple[str, str, str, str], ...] = (
    (
        "delivery under SIGKILL chaos",
        "{delivery.relier.lost} lost, {delivery.relier.ran_twice} ran twice",
        "{delivery.vanilla.lost} lost, {delivery.vanilla.ran_twice} ran twice",
        "{delivery.tasks} tasks of 0-5 ms on 2 workers, one SIGKILLed every second and "
        "replaced ({delivery.relier.kills} / {delivery.vanilla.kills} kills); delivered "
        "{delivery.relier.delivered} / {delivery.vanilla.delivered}, relier quarantined "
        "{delivery.relier.quarantined}; {delivery.vanilla.in_kombu_unacked} messages of killed "
        "vanilla workers wait in kombu's unacked hash, redelivered after visibility_timeout "
        "whether they ran or not",
    ),
    (
        "recovery: SIGKILL -> running again",
        "p50 {recovery.relier.p50:.2f} s, p99 {recovery.relier.p99:.2f} s",
        "{recovery.vanilla.recovered} of {recovery.vanilla.tasks} within "
        "{recovery.vanilla.within_s:g} s",
        "tasks running on the killed worker, an idle survivor up; relier "
        "{recovery.relier.recovered} of {recovery.relier.tasks} within "
        "{recovery.relier.within_s:g} s at default settings; vanilla with acks_late, "
        "redelivered after visibility_timeout ({recovery.vanilla.visibility_timeout_s:g} s)",
    ),
    (
        "idempotent task: duplicate side effects",
        "{idempotency.relier.duplicate_effects}",
        "{idempotency.vanilla.duplicate_effects}",
        "{idempotency.orders} orders, each dispatched twice, workers SIGKILLed mid-charge "
        "({idempotency.relier.kills} / {idempotency.vanilla.kills} kills); never charged: "
        "{idempotency.relier.orders_never_charged} / {idempotency.vanilla.orders_never_charged}",
    ),
    (
        "admission decision p99",
        "{admission.decision_p99_ms:.3f} ms ({admission.ratio_to_ping_p99:.2f}x PING)",
        "-",
        "one EVALSHA of admit.lua, interleaved with as many PINGs ({admission.calls} each); "
        "PING p99 {admission.ping_p99_ms:.3f} ms",
    ),
    (
        "drain on SIGTERM",
        "{drain.relier.lost} lost, {drain.relier.completed_twice} completed twice",
        "{drain.vanilla.lost} lost, {drain.vanilla.completed_twice} completed twice",
        "{drain.tasks} jobs of 2-4 s on 2 workers, one sent SIGTERM while running two; relier "
        "drain timeout {drain.drain_timeout_s:g} s, {drain.relier.started_again} handed off; "
        "exit after {drain.relier.exit_s:.1f} s / {drain.vanilla.exit_s:.1f} s",
    ),
    (
        "throughput (no-op tasks)",
        "{overhead.throughput.relier_per_s:.0f}/s ({overhead.throughput.ratio:.2f}x)",
        "{overhead.throughput.vanilla_per_s:.0f}/s",
        "{overhead.tasks} queued tasks, prefork 2, median of {overhead.rounds} round(s)",
    ),
    (
        "latency per task p50",
        "{overhead.latency.relier_p50_ms:.2f} ms ({overhead.latency.added_p50_ms:+.2f} ms)",
        "{overhead.latency.vanilla_p50_ms:.2f} ms",
        "publish -> task body, {overhead.latency.samples} tasks one at a time, solo pool",
    ),
)


def lookup(doc: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted ``path``; KeyError naming the path if it is missing."""
    value: Any = doc
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            raise KeyError(path)
        value = value[key]
    return value


class _Formatter(string.Formatter):
    """Fields are dotted paths into the document; None (no figure) prints as "-"."""

    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        return lookup(kwargs, field_name), field_name

    def format_field(self, value: Any, format_spec: str) -> str:
        return "-" if value is None else super().format_field(value, format_spec)


_FORMATTER = _Formatter()

TABLE_FIELDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        name
        for row in ROWS
        for cell in row
        for _, name, _, _ in string.Formatter().parse(cell)
        if name
    )
)


def _fill(cell: str, doc: Mapping[str, Any]) -> str:
    return _FORMATTER.vformat(cell, (), doc)


def rows(doc: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The table's rows (measurement, relier, vanilla), each cell filled in from ``doc``."""
    return [(name, _fill(rel, doc), _fill(van, doc)) for name, rel, van, _ in ROWS]


def footer(doc: Mapping[str, Any]) -> list[str]:
    """The lines under the table: how each figure was measured, how the vanilla side is known
    to be vanilla, and the run."""
    m = doc["machine"]
    return [
        *(f"{name}: {_fill(how, doc)}" for name, _, _, how in ROWS),
        f"vanilla proof: {doc['vanilla_proof']['summary']}",
        f"{'quick' if doc['quick'] else 'full'} run in {doc['elapsed_s']:.0f} s on "
        f"{m['cpus']} CPUs, Redis {doc['redis']['version']} ({doc['redis']['where']}), "
        f"Python {m['python']}, Celery {m['celery']}, relier_celery {m['relier_celery']}",
    ]
