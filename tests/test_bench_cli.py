"""`rl bench all` without workers: the table and its footer drawn from a result document, the
fields the table shows, the vanilla proof's checks against a real Redis, profile scaling, and
each bad input as one line on stderr with a non-zero exit."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from rich.console import Console

from relier_celery.bench.harness import Harness
from relier_celery.bench.report import COLUMNS, ROWS, TABLE_FIELDS, footer, lookup, rows
from relier_celery.bench.suite import FULL, QUICK
from relier_celery.cli import relier
from relier_celery.cli.bench import table
from relier_celery.core.errors import BenchError
from relier_celery.testing import WorkerProcess, free_port

RL = str(Path(sys.executable).parent / "rl")

DOC: dict[str, Any] = {
    "quick": True,
    "redis": {"version": "7.2.4", "where": "embedded redis-server on port 6390"},
    "machine": {"cpus": 2, "python": "3.11.7", "celery": "5.5.0", "relier_celery": "0.1.0"},
    "delivery": {
        "tasks": 3000,
        "relier": {"kills": 4, "delivered": 3000, "lost": 0, "ran_twice": 1, "quarantined": 0},
        "vanilla": {
            "kills": 4,
            "delivered": 2979,
            "lost": 21,
            "ran_twice": 0,
            "quarantined": 0,
            "in_kombu_unacked": 17,
        },
    },
    "recovery": {
        "relier": {"tasks": 6, "recovered": 6, "within_s": 10.0, "p50": 3.7, "p99": 3.77},
        "vanilla": {
            "tasks": 3,
            "recovered": 0,
            "within_s": 10.0,
            "p50": None,
            "p99": None,
            "visibility_timeout_s": 3600,
        },
    },
    "idempotency": {
        "orders": 16,
        "relier": {"kills": 2, "duplicate_effects": 0, "orders_never_charged": 0},
        "vanilla": {"kills": 2, "duplicate_effects": 6, "orders_never_charged": 10},
    },
    "admission": {
        "calls": 2000,
        "decision_p99_ms": 0.3661,
        "ping_p99_ms": 0.3051,
        "ratio_to_ping_p99": 1.2,
    },
    "drain": {
        "tasks": 10,
        "drain_timeout_s": 1.0,
        "relier": {"lost": 0, "completed_twice": 0, "started_again": 2, "exit_s": 2.89},
        "vanilla": {"lost": 0, "completed_twice": 0, "started_again": 0, "exit_s": 3.94},
    },
    "overhead": {
        "tasks": 1000,
        "rounds": 1,
        "throughput": {"relier_per_s": 857.0, "vanilla_per_s": 555.0, "ratio": 1.544},
        "latency": {
            "samples": 100,
            "relier_p50_ms": 1.143,
            "vanilla_p50_ms": 1.414,
            "added_p50_ms": -0.271,
        },
    },
    "vanilla_proof": {"ok": True, "summary": "vanilla side checked after each of its 6 phases"},
    "elapsed_s": 148.4,
}


def test_every_row_is_filled_in_from_the_document() -> None:
    # Given a result document, when the table's rows are drawn
    out = rows(DOC)
    # Then there is one row per measurement, each cell without a placeholder left
    assert [r[0] for r in out] == [r[0] for r in ROWS]
    assert all(len(r) == len(COLUMNS) for r in out)
    assert not any("{" in cell for r in out for cell in r)
    by_name = {r[0]: r[1:] for r in out}
    assert by_name["delivery under SIGKILL chaos"] == (
        "0 lost, 1 ran twice",
        "21 lost, 0 ran twice",
    )
    assert by_name["recovery: SIGKILL -> running again"] == (
        "p50 3.70 s, p99 3.77 s",
        "0 of 3 within 10 s",
    )
    assert by_name["idempotent task: duplicate side effects"] == ("0", "6")
    assert by_name["admission decision p99"] == ("0.366 ms (1.20x PING)", "-")
    assert by_name["throughput (no-op tasks)"] == ("857/s (1.54x)", "555/s")
    assert by_name["latency per task p50"] == ("1.14 ms (-0.27 ms)", "1.41 ms")


def test_a_missing_figure_prints_as_a_dash_and_a_missing_field_names_its_path() -> None:
    doc = copy.deepcopy(DOC)
    doc["recovery"]["relier"]["p99"] = None
    assert rows(doc)[1][1] == "p50 3.70 s, p99 - s"
    del doc["drain"]["relier"]["lost"]
    with pytest.raises(KeyError, match=r"drain\.relier\.lost"):
        rows(doc)


def test_the_table_fields_are_read_off_the_rows() -> None:
    # Every figure of the table is a path of the document, so --json holds each one
    assert "delivery.relier.lost" in TABLE_FIELDS
    assert "recovery.vanilla.visibility_timeout_s" in TABLE_FIELDS
    assert "overhead.latency.added_p50_ms" in TABLE_FIELDS
    assert len(TABLE_FIELDS) == len(set(TABLE_FIELDS))
    for path in TABLE_FIELDS:
        lookup(DOC, path)


def test_the_rich_table_and_the_footer() -> None:
    console = Console(record=True, width=200, color_system=None)
    console.print(table(DOC))
    for line in footer(DOC):
        console.print(line, soft_wrap=True)
    text = console.export_text()
    assert "relier vs vanilla Celery" in text
    assert "21 lost, 0 ran twice" in text
    assert "17 messages of killed vanilla workers wait in kombu's unacked hash" in text
    assert "recovery: SIGKILL -> running again: tasks running on the killed worker" in text
    assert "vanilla proof: vanilla side checked after each of its 6 phases" in text
    assert "quick run in 148 s on 2 CPUs, Redis 7.2.4" in text


def test_scaling_a_profile_keeps_every_measurement() -> None:
    small = QUICK.scaled(0.1)
    assert small.chaos_kills >= 2 and small.idempotency_orders >= 4
    assert small.chaos_tasks < QUICK.chaos_tasks
    assert small.still == QUICK.still and small.recovery_wait == QUICK.recovery_wait
    assert FULL.chaos_tasks > QUICK.chaos_tasks


def _worker_with_log(tmp_path: Path, name: str, text: str) -> WorkerProcess:
    log = tmp_path / f"{name}.log"
    log.write_text(text)
    return WorkerProcess("bench_app", hostname=f"{name}@vm", log_path=str(log))


def _report(client: redis.Redis, host: str, steps: list[str]) -> None:
    client.set(f"bench:bootsteps:{host}", json.dumps({"steps": steps, "imported": True}))


def test_the_vanilla_proof_passes_on_a_clean_phase(tmp_path, redis_url, client) -> None:
    h = Harness(redis_url, tmp_path)
    w = _worker_with_log(tmp_path, "v1", "[WARNING/MainProcess] celery@vm ready.\n")
    _report(client, "v1@vm", ["celery.worker.components:Pool"])
    proof = h.check_vanilla("throughput", [w])
    assert proof["relier_keys"] == 0 and proof["workers_reported"] == 1
    assert h.proof()["ok"] and h.proof()["phases_checked"] == 1
    assert "no relier log line, no relier bootstep, no rl: key" in h.proof()["summary"]


@pytest.mark.parametrize("flaw", ["log line", "bootstep", "key", "no report"])
def test_the_vanilla_proof_fails_on_any_trace_of_relier(tmp_path, redis_url, client, flaw) -> None:
    h = Harness(redis_url, tmp_path)
    text = "relier config.warning: Redis runs without AOF\n" if flaw == "log line" else "ok\n"
    w = _worker_with_log(tmp_path, "v1", text)
    if flaw != "no report":
        steps = ["relier_celery.bootsteps.RelierWorker"] if flaw == "bootstep" else []
        _report(client, "v1@vm", steps)
    if flaw == "key":
        client.set("rl:{rl}:leases", 1)
    with pytest.raises(BenchError, match="vanilla"):
        h.check_vanilla("delivery", [w])
    assert not h.proof()["ok"]


def test_an_unreachable_redis_is_one_line_and_exit_1() -> None:
    # Given a port where nothing listens, when the real `rl` is run against it
    url = f"redis://127.0.0.1:{free_port()}/0"
    out = subprocess.run(
        [RL, "bench", "all", "--quick", "--json", "--redis", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then one line on stderr, nothing on stdout, exit 1, no traceback
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith(f"Error: cannot reach Redis at {url}")
    assert "Traceback" not in out.stderr


def test_a_database_with_keys_is_refused(redis_url, client) -> None:
    client.set("precious", 1)
    result = CliRunner().invoke(relier, ["bench", "all", "--quick", "--redis", redis_url])
    assert result.exit_code == 1
    assert "holds 1 key(s)" in result.output
    assert client.get("precious") == "1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--redis", "http://example.com"], "is not a Redis URL"),
        (["--vanilla-python", "/no/such/python"], "does not exist"),
        (["--vanilla-python", sys.executable], "relier_celery is installed"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(relier, ["bench", "all", "--quick", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_restarts_counts_each_killed_run_once_from_its_kill(client: redis.Redis) -> None:
    from relier_celery.bench.delivery import restarts

    # Task 0 ran on a, killed at 10.2, and started again on b at 10.5
    client.rpush("bench:starts:0", "10.0|a", "10.5|b")
    # Task 1 had ended on a before the kill: its second start is not a recovery
    client.rpush("bench:starts:1", "9.0|a", "10.9|b")
    client.rpush("bench:ends:1", "9.0|a")
    # Task 2 ran on c, which was not killed
    client.rpush("bench:starts:2", "11.0|c", "11.1|b")
    assert restarts(client, 3, {"a": 10.2}) == [[pytest.approx(0.3)]]


LOAD_BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_rabbitmq_load.py"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "1"], "--workers must be at least 2"),
        (["--tasks", "0"], "--tasks and --runs must be at least 1"),
        (["--kills", "-1"], "--kills and --seconds not negative"),
    ],
)
def test_the_rabbitmq_load_benchmark_refuses_a_run_it_cannot_measure(
    args: list[str], message: str
) -> None:
    # Refused before any worker, Redis or broker connection is started
    done = subprocess.run(
        [sys.executable, str(LOAD_BENCH), *args], capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 2
    assert message in done.stderr
