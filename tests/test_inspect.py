"""relier inspect / tasks / workers against a real throwaway Redis: the snapshot's states, the
counters, queue depths, and the CLI through click's runner and real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
from celery.bin.celery import celery as celery_cli
from click.testing import CliRunner

from relier_celery.cli.render import render
from relier_celery.core import events
from relier_celery.core.keys import Keys
from relier_celery.core.record import TaskRecord
from relier_celery.observe.activity import RunningMarker
from relier_celery.observe.counters import Counters
from relier_celery.observe.snapshot import Filters, broker_queue_depths, take
from relier_celery.observe.summary import to_json
from relier_celery.store.client import Store

BIN = Path(sys.executable).parent


def hold(
    store: Store,
    worker: str,
    task_id: str,
    name: str = "jobs.x",
    routing_key: str = "celery",
    resurrections: int = 0,
) -> None:
    """Record a delivery of ``task_id`` under ``worker``, as a worker's receipt does."""
    rec = TaskRecord(
        task_id=task_id,
        task_name=name,
        body=b"[[1], {}, {}]",
        content_type="application/json",
        content_encoding="utf-8",
        headers={"id": task_id, "task": name, "rl_resurrections": resurrections},
        properties={},
        exchange="",
        routing_key=routing_key,
        worker=worker,
    )
    assert store.record(task_id, worker, rec.generation, rec.dumps()).recorded


def fleet_state(store: Store) -> None:
    """Worker 'live' runs t1 and has t2 reserved; worker 'gone' died holding t3 and t4; worker
    'idle' holds nothing; worker 'old' holds t5 and publishes no running set."""
    for w in ("live", "idle", "old"):
        store.renew_lease(w, ttl=60)
    store.renew_lease("gone", ttl=0.01)
    hold(store, "live", "t1", name="jobs.slow")
    hold(store, "live", "t2", routing_key="bulk")
    hold(store, "gone", "t3", resurrections=1)
    hold(store, "gone", "t4")
    hold(store, "old", "t5")
    RunningMarker(store, "live", 60, lambda: {"t1": time.time() - 5}).publish()
    RunningMarker(store, "idle", 60, dict).publish()
    time.sleep(0.05)


def test_the_snapshot_tells_running_reserved_and_awaiting_resurrection(store: Store) -> None:
    # Given live, idle, dead and marker-less workers
    fleet_state(store)
    # When a snapshot is taken
    snap = take(store, lease_ttl=60)
    # Then every held task has the state its worker's lease and running set say
    states = {t.task_id: t.state for t in snap.tasks}
    assert states == {
        "t1": "running",
        "t2": "reserved",
        "t3": "awaiting resurrection",
        "t4": "awaiting resurrection",
        "t5": "held",
    }
    t1 = next(t for t in snap.tasks if t.task_id == "t1")
    assert t1.task_name == "jobs.slow" and t1.worker == "live" and t1.queue == "celery"
    assert 4 <= t1.age < 30
    assert next(t for t in snap.tasks if t.task_id == "t3").resurrections == 1
    workers = {w.worker: w for w in snap.workers}
    assert workers["live"].status == "alive" and workers["live"].running == 1
    assert workers["idle"].status == "idle" and workers["idle"].held == 0
    assert workers["gone"].status == "dead" and workers["gone"].held == 2
    assert workers["old"].running is None
    assert workers["live"].lease_age < 5
    text = render(snap)
    assert "dead" in text and "2 awaiting resurrection" in text
    assert "1 running, 2 reserved, 2 awaiting resurrection" in text
    assert "lost = 0" in text


def test_a_claimed_dead_worker_shows_as_resurrecting_and_a_bad_record_as_lost(
    store: Store, client: redis.Redis
) -> None:
    fleet_state(store)
    client.set(Keys("rl").claim("gone"), "scanner-x")
    client.hset(Keys("rl").held("live"), "bad|0|0", "not json")
    snap = take(store, lease_ttl=60)
    assert {t.state for t in snap.tasks if t.worker == "gone"} == {"resurrecting"}
    assert next(w for w in snap.workers if w.worker == "gone").claimed_by == "scanner-x"
    assert snap.unreadable == 1 and "lost = 1" in render(snap)


def test_filters_match_queue_worker_and_task_patterns(store: Store) -> None:
    fleet_state(store)
    assert [t.task_id for t in take(store, 60, filters=Filters(queue="bulk")).tasks] == ["t2"]
    assert {t.task_id for t in take(store, 60, filters=Filters(worker="gon*")).tasks} == {
        "t3",
        "t4",
    }
    assert [t.task_id for t in take(store, 60, filters=Filters(task="jobs.s*")).tasks] == ["t1"]
    assert [t.task_id for t in take(store, 60, filters=Filters(task="t4")).tasks] == ["t4"]
    assert [w.worker for w in take(store, 60, filters=Filters(worker="idle")).workers] == ["idle"]


def test_counted_events_reach_redis_in_one_batch_and_the_snapshot(store: Store) -> None:
    # Given the counter subscriber
    counters = Counters(store, interval=60)
    events.subscribe(counters)
    try:
        # When rare events happen, and an ordinary one
        for _ in range(3):
            events.emit("task.resurrected", "x", task_id="a")
        events.emit("task.quarantined", "x", dlq_reason="max_resurrections")
        events.emit("admission.rejected", "x")
        events.emit("worker.started", "x")
        assert store.counters() == {}  # batched, not written per event
        counters.flush()
    finally:
        events.unsubscribe(counters)
        counters.close()
    # Then one flush wrote them, and a snapshot shows them
    assert store.counters() == {"resurrections": 3, "quarantines": 1, "admission_rejects": 1}
    snap = take(store, 60)
    assert snap.counters["resurrections"] == 3 and snap.counters["drains"] == 0
    assert "resurrections 3" in render(snap)


def test_queue_depths_add_up_the_priority_lists(redis_url: str, client: redis.Redis) -> None:
    from celery import Celery

    app = Celery("q", broker=redis_url)
    client.rpush("celery", "a", "b")
    client.rpush("celery\x06\x163", "c")
    client.rpush("celery\x06\x169", "d")
    q = broker_queue_depths(app, ["celery", "empty"])
    assert q.error is None
    assert q.depths == {"celery": 4, "empty": 0}
    assert q.lists["celery"]["celery\x06\x163"] == 1


def test_a_broker_that_is_not_redis_is_named_not_fatal() -> None:
    from celery import Celery

    q = broker_queue_depths(Celery("m", broker="memory://"), ["celery"])
    assert q.depths == {} and q.error is not None and "memory" in q.error


# -- the CLI --------------------------------------------------------------------------------
def _write_app(tmp_path: Path, redis_url: str, broker: str | None = None) -> None:
    (tmp_path / "inspapp.py").write_text(
        textwrap.dedent(f"""
        from celery import Celery
        app = Celery("inspapp", broker="{broker or redis_url}")
        app.conf.imports = ("relier_celery",)
        app.conf.relier_redis_url = "{redis_url}"
        app.conf.relier_lease_ttl = 60
    """)
    )


@pytest.fixture
def cli_app(tmp_path: Path, redis_url: str, store: Store, monkeypatch: pytest.MonkeyPatch) -> Path:
    _write_app(tmp_path, redis_url)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "inspapp", raising=False)  # this test's app, not a cached one
    fleet_state(store)
    return tmp_path


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(celery_cli, ["-A", "inspapp", "relier", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_inspect_prints_tasks_workers_queues_and_summary(cli_app: Path, client) -> None:
    client.rpush("celery", "queued")
    out = _invoke("inspect")
    assert "jobs.slow" in out and "awaiting resurrection" in out
    assert "WORKER" in out and "QUEUE" in out and "WAITING" in out
    assert "1 running" in out and "last resurrection scan never" in out


def test_inspect_json_and_the_focused_views(cli_app: Path) -> None:
    data = json.loads(_invoke("inspect", "--json"))
    assert {t["task_id"] for t in data["tasks"]} == {"t1", "t2", "t3", "t4", "t5"}
    assert data["summary"]["awaiting_resurrection"] == 2
    assert data["queues"]["depths"]["celery"] == 0 and data["counters"]["resurrections"] == 0
    tasks = json.loads(_invoke("tasks", "--json", "--worker", "gone"))
    assert set(tasks) == {"at", "tasks"} and {t["task_id"] for t in tasks["tasks"]} == {"t3", "t4"}
    workers = json.loads(_invoke("workers", "--json"))
    assert {w["worker"]: w["status"] for w in workers["workers"]}["gone"] == "dead"
    assert "t2" in _invoke("tasks", "--queue", "bulk") and "t1" not in _invoke(
        "tasks", "--queue", "bulk"
    )
    assert "idle" in _invoke("workers", "--worker", "idle")


def test_watch_refreshes_count_times(cli_app: Path) -> None:
    out = _invoke("tasks", "--watch", "--count", "2", "--interval", "0.2", "--json")
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["tasks"] for line in lines)
    text = _invoke("inspect", "--watch", "--count", "2", "--interval", "0.2")
    assert text.count("relier inspect at") == 2


def test_an_interval_below_the_floor_is_refused(cli_app: Path) -> None:
    result = CliRunner().invoke(
        celery_cli, ["-A", "inspapp", "relier", "inspect", "--watch", "--interval", "0.01"]
    )
    assert result.exit_code != 0 and "0.01" in result.output


def test_inspect_json_through_real_celery_and_rl_subprocesses(
    tmp_path: Path, redis_url: str, store: Store
) -> None:
    _write_app(tmp_path, redis_url)
    fleet_state(store)
    for cmd in (
        [str(BIN / "celery"), "-A", "inspapp", "relier", "inspect", "--json"],
        [str(BIN / "rl"), "-A", "inspapp", "inspect", "--json"],
    ):
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["summary"]["running"] == 1 and data["summary"]["workers_dead"] == 1


def test_inspect_with_a_broker_that_is_not_redis(tmp_path: Path, redis_url: str, store) -> None:
    _write_app(tmp_path, redis_url, broker="memory://")
    fleet_state(store)
    out = subprocess.run(
        [str(BIN / "rl"), "-A", "inspapp", "inspect"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "not Redis" in out.stdout and "jobs.slow" in out.stdout


def test_to_json_is_plain_json(store: Store) -> None:
    fleet_state(store)
    json.dumps(to_json(take(store, 60)))


def test_an_unreachable_redis_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    from relier_celery.testing import free_port

    _write_app(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "inspapp", raising=False)  # not an earlier test's app
    result = CliRunner().invoke(celery_cli, ["-A", "inspapp", "relier", "inspect"])
    assert result.exit_code == 1 and "relier cannot reach Redis" in result.output


def test_a_forked_pool_process_counts_its_own_events_not_its_parents(store: Store) -> None:
    import os

    # Given a parent process with an uncounted event pending
    counters = Counters(store, interval=60)
    events.subscribe(counters)
    try:
        events.emit("task.resurrected", "in the parent")
        # When a forked child (as billiard forks pool processes) counts and flushes its own
        pid = os.fork()
        if pid == 0:
            try:
                events.emit("idempotency.hit", "in the child")
                counters.flush()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        # Then the child wrote only its own event, and the parent's is still its own to write
        assert store.counters() == {"idempotent_hits": 1}
        counters.flush()
        assert store.counters() == {"idempotent_hits": 1, "resurrections": 1}
    finally:
        events.unsubscribe(counters)
        counters.close()


def test_the_running_marker_writes_only_when_the_set_changes(
    store: Store, client: redis.Redis
) -> None:
    running = {"t1": 100.0}
    marker = RunningMarker(store, "w", lease_ttl=60, running=lambda: dict(running))
    key = Keys("rl").running("w")
    marker.publish()
    assert client.hget(key, "t1") == "100.0" and client.pttl(key) > 60_000
    client.hset(key, "sentinel", "1")
    marker.publish()  # same set: no write
    assert client.hget(key, "sentinel") == "1"
    running["t2"] = 101.0
    marker.publish()  # changed: rewritten whole
    assert set(client.hkeys(key)) == {"@", "t1", "t2"}


def test_watch_exits_cleanly_on_ctrl_c(tmp_path: Path, redis_url: str, store: Store) -> None:
    import signal

    _write_app(tmp_path, redis_url)
    fleet_state(store)
    proc = subprocess.Popen(
        [str(BIN / "rl"), "-A", "inspapp", "inspect", "--watch", "--interval", "0.2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while "relier inspect at" not in proc.stdout.readline():
            assert time.monotonic() < deadline and proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
