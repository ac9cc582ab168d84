"""The resurrector against a real Redis used as both relier store and Celery broker: racing
scanners, the standalone command and the beat task."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from relier_celery.core.config import RelierConfig
from relier_celery.core.keys import Keys
from relier_celery.core.record import Generation, TaskRecord, delivery_id
from relier_celery.recovery.resurrect import CLAIM_BATCH, Resurrector
from relier_celery.store.client import Store
from relier_celery.wiring.install import install


def _dead_worker_with(
    store: Store, n: int, resurrections: int = 0, crashes: int = 0, worker: str = "dead"
) -> list[str]:
    """Records of ``n`` messages held by ``worker``, whose lease has run out."""
    store.renew_lease(worker, ttl=0.01)
    ids = []
    prefix = "t" if worker == "dead" else f"{worker}-t"
    for i in range(n):
        rec = TaskRecord(
            task_id=f"{prefix}{i}",
            task_name="jobs.x",
            body=json.dumps([[i], {}, {}]).encode(),
            content_type="application/json",
            content_encoding="utf-8",
            headers={
                "id": f"{prefix}{i}",
                "task": "jobs.x",
                "rl_resurrections": resurrections,
                "rl_crashes": crashes,
                "traceparent": "00-trace-span-01",
            },
            properties={"correlation_id": f"{prefix}{i}"},
            exchange="",
            routing_key="celery",
            worker=worker,
        )
        assert store.record(rec.task_id, worker, rec.generation, rec.dumps()).recorded
        ids.append(rec.task_id)
    time.sleep(0.05)
    return ids


def _queued(client: redis.Redis) -> list[dict]:
    return [json.loads(m) for m in client.lrange("celery", 0, -1)]


def test_racing_scanners_resurrect_each_task_exactly_once(redis_url: str) -> None:
    # Given a dead worker holding 40 tasks
    app = Celery("race", broker=redis_url)
    relier = install(app)
    ids = _dead_worker_with(relier.store, 40)
    # When four scanners, each with its own connections, scan at the same moment
    barrier = threading.Barrier(4)
    counts: list[int] = []

    def scan(n: int) -> None:
        scanner = Resurrector(app, relier.config, Store(redis_url, Keys("rl")), name=f"s{n}")
        barrier.wait()
        counts.append(scanner.scan_once())

    threads = [threading.Thread(target=scan, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then each task was republished once, with its exact message and a raised count
    client = redis.Redis.from_url(redis_url)
    queued = _queued(client)
    assert sum(counts) == 40
    assert sorted(m["headers"]["id"] for m in queued) == sorted(ids)
    first = next(m for m in queued if m["headers"]["id"] == "t0")
    assert first["headers"]["rl_resurrections"] == 1
    assert first["headers"]["traceparent"] == "00-trace-span-01"
    assert first["properties"]["correlation_id"] == "t0"
    assert client.hlen(Keys("rl").held("dead")) == 0
    assert client.zscore(Keys("rl").leases, "dead") is None


def test_a_scan_takes_many_dead_workers_in_a_few_round_trips(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 20 dead workers holding 2 tasks each (more than one claim batch)
    app = Celery("mass", broker=redis_url)
    relier = install(app)
    ids = [t for n in range(20) for t in _dead_worker_with(relier.store, 2, worker=f"d{n}")]
    calls: list[str] = []
    run = relier.store._run
    monkeypatch.setattr(relier.store, "_run", lambda name, *a: calls.append(name) or run(name, *a))
    # When one scan runs
    assert Resurrector(app, relier.config, relier.store).scan_once() == 40
    # Then every task is queued once, claimed and released a batch of workers at a time
    client = redis.Redis.from_url(redis_url)
    assert sorted(m["headers"]["id"] for m in _queued(client)) == sorted(ids)
    batches = -(-20 // CLAIM_BATCH)
    assert calls.count("claim") == batches and calls.count("claim_finish") == batches
    assert client.zcard(Keys("rl").leases) == 0 and not client.keys("rl:{rl}:held:*")
    assert len(relier.store.overview()["recovery"]) == 40


def test_a_publish_failing_midway_leaves_the_rest_held_and_loses_nothing(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 3 dead workers holding 2 tasks each, and a broker that fails the 4th publish
    app = Celery("midway", broker=redis_url)
    relier = install(app)
    ids = [t for n in range(3) for t in _dead_worker_with(relier.store, 2, worker=f"d{n}")]
    publish, published = TaskRecord.publish, []

    def flaky(record: TaskRecord, producer: object) -> None:
        if len(published) == 3:
            raise ConnectionError("broker down")
        publish(record, producer)
        published.append(record.task_id)

    monkeypatch.setattr(TaskRecord, "publish", flaky)
    # When a scan runs, Then it fails loudly
    with pytest.raises(ConnectionError):
        Resurrector(app, relier.config, relier.store).scan_once()
    # And what was published is no longer held, what was not still is, unclaimed
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = Keys("rl")
    held = {f.split("|")[0] for n in range(3) for f in client.hkeys(keys.held(f"d{n}"))}
    assert held == set(ids) - set(published) and len(held) == 3
    assert not client.keys(keys.claim("*"))
    # When the broker is back and the next scan runs, Then each task is queued exactly once
    monkeypatch.setattr(TaskRecord, "publish", publish)
    assert Resurrector(app, relier.config, relier.store).scan_once() == 3
    assert sorted(m["headers"]["id"] for m in _queued(client)) == sorted(ids)


def test_past_max_resurrections_a_task_goes_to_the_dlq_not_the_queue(redis_url: str) -> None:
    app = Celery("dlq", broker=redis_url)
    app.conf.relier_max_resurrections = 2
    relier = install(app)
    _dead_worker_with(relier.store, 1, resurrections=2, crashes=2)
    Resurrector(app, relier.config, relier.store).scan_once()
    client = redis.Redis.from_url(redis_url)
    assert _queued(client) == []
    (entry,) = [json.loads(v) for v in client.hvals(Keys("rl").dlq)]
    assert entry["reason"] == "max_resurrections" and entry["worker"] == "dead"
    assert entry["message"]["headers"]["id"] == "t0"
    assert entry["crashes"] == 2
    assert client.hget(Keys("rl").owners, "t0") is None  # nothing left behind


def test_hand_offs_do_not_count_against_max_resurrections(redis_url: str) -> None:
    # Given a task republished 5 times by hand-offs (deploys), but crashed only once
    app = Celery("handoff", broker=redis_url)
    app.conf.relier_max_resurrections = 2
    relier = install(app)
    _dead_worker_with(relier.store, 1, resurrections=5, crashes=1)
    # When its worker dies, Then it is resurrected, not quarantined
    Resurrector(app, relier.config, relier.store).scan_once()
    (msg,) = _queued(redis.Redis.from_url(redis_url))
    assert msg["headers"]["rl_resurrections"] == 6 and msg["headers"]["rl_crashes"] == 2


def test_the_beat_task_scans_too(redis_url: str) -> None:
    app = Celery("beat", broker=redis_url)
    relier = install(app)
    _dead_worker_with(relier.store, 3)
    assert app.tasks["relier.resurrect"].apply().get() == 3


def test_the_standalone_resurrector_command(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "standalone_app.py").write_text(
        textwrap.dedent(f"""
        from celery import Celery
        app = Celery("standalone_app", broker="{redis_url}")
        app.conf.imports = ("relier_celery",)
    """)
    )
    _dead_worker_with(Store(redis_url, Keys("rl")), 2)
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "celery"),
            "-A",
            "standalone_app",
            "relier",
            "resurrector",
            "--once",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "resurrected or quarantined 2 task(s)" in out.stdout
    assert len(_queued(redis.Redis.from_url(redis_url))) == 2


def test_install_is_idempotent_and_validates(redis_url: str) -> None:
    app = Celery("idem", broker=redis_url)
    assert install(app) is install(app)
    assert isinstance(install(app).config, RelierConfig)


def _orphan(app: Celery, redis_url: str, task: str, age: float = 60.0) -> str:
    """A message delivered (moved to kombu's unacked hash) to a consumer that then vanished."""
    task_id = app.send_task(task, args=(1,)).id
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        message = channel.basic_get("celery", no_ack=False)
        assert message is not None and message.headers["id"] == task_id
        channel.qos._delivered.clear()  # die without restoring or acking
        client = redis.Redis.from_url(redis_url)
        client.zadd("unacked_index", {message.delivery_tag: time.time() - age})
    return task_id


def _delivery_of(redis_url: str, task_id: str) -> str:
    """The delivery id of a message in kombu's unacked hash."""
    for raw in redis.Redis.from_url(redis_url).hvals("unacked"):
        headers = json.loads(raw)[0]["headers"]
        if headers["id"] == task_id:
            return delivery_id(headers, task_id)
    raise KeyError(task_id)


def test_an_orphaned_delivery_goes_back_to_its_queue(redis_url: str) -> None:
    # Given a delivery taken by a worker that died before recording it
    app = Celery("orphans", broker=redis_url)
    app.conf.relier_reliable_fetch = False  # the sweep is for workers on kombu's own fetch
    relier = install(app)

    @app.task(name="jobs.orphan", shared=False)
    def orphan(n: int) -> None: ...

    task_id = _orphan(app, redis_url, "jobs.orphan")
    client = redis.Redis.from_url(redis_url)
    assert client.llen("celery") == 0 and client.hlen("unacked") == 1
    # When a scanner runs, Then the message is back in its queue, unchanged
    assert Resurrector(app, relier.config, relier.store).scan_once() == 1
    (msg,) = _queued(client)
    assert msg["headers"]["id"] == task_id and "rl_resurrections" not in msg["headers"]
    assert client.hlen("unacked") == 0


def test_a_recorded_young_or_foreign_delivery_is_left_alone(redis_url: str) -> None:
    app = Celery("orphans2", broker=redis_url)
    app.conf.relier_reliable_fetch = False
    relier = install(app)

    @app.task(name="jobs.held", shared=False)
    def held(n: int) -> None: ...

    # held by a live worker / too young to judge / a task this app does not know
    held_id = _orphan(app, redis_url, "jobs.held")
    # (held under its delivery id: the task id and the publication id stamped at publish)
    relier.store.record(_delivery_of(redis_url, held_id), "live", Generation(0, 0), "rec")
    _orphan(app, redis_url, "jobs.held", age=0)
    _orphan(app, redis_url, "someone.elses")
    assert Resurrector(app, relier.config, relier.store).scan_once() == 0
    assert redis.Redis.from_url(redis_url).hlen("unacked") == 3
