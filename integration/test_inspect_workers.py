"""relier inspect against real workers: a SIGKILLed worker's task shows as awaiting resurrection,
then as running on another worker, read from Redis by a real ``celery ... relier inspect``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fleet import BROKERS, HERE, done, relier_cli

from relier_celery.testing import wait_for

pytestmark = pytest.mark.integration


def inspect_json(redis_url: str, *args: str) -> dict[str, Any]:
    """Run the real CLI, as an operator would, and parse its JSON."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "celery"), "-A", "chaos_app", "relier", *args],
        cwd=HERE,
        env={
            **os.environ,
            "RELIER_TEST_REDIS": redis_url,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if "--json" in args else {"text": out.stdout}


def task_state(redis_url: str, task_id: str) -> tuple[str, str] | None:
    data = inspect_json(redis_url, "inspect", "--json", "--task", task_id)
    tasks = data["tasks"]
    return (tasks[0]["state"], tasks[0]["worker"]) if tasks else None


@pytest.mark.timeout(150)
@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_inspect_follows_a_task_from_a_killed_worker_to_a_live_one(
    fleet, publisher, r, redis_url
) -> None:
    # Given two workers without scanners (the test runs the resurrection itself, so the
    # "awaiting resurrection" state lasts until it does), the first running a task that runs
    # until the test releases it: each CLI call below takes 2-6 s on a loaded machine, and a
    # task of a fixed length (8 s once) ended before the kill, or before the last look.
    # Without acks_late, Celery acked the message when the task started: on RabbitMQ as on
    # Redis, nothing but relier's record brings it back.
    fleet.env.update({"RELIER_TEST_NO_SCANNER": "1"})
    victim = fleet.start(concurrency=1)
    task_id = publisher.send_task("chaos.held_open", args=(1,)).id
    wait_for(lambda: r.get("test:started:1"), 20, what="the task to start")
    wait_for(
        lambda: task_state(redis_url, task_id) == ("running", victim_id(redis_url, "w1@")),
        30,
        interval=0.2,
        what="inspect to show the task running on the first worker",
    )
    survivor = fleet.start(concurrency=1)
    # When the first worker is SIGKILLed
    victim.kill(signal.SIGKILL)
    # Then inspect shows its task awaiting resurrection, and the worker dead
    wait_for(
        lambda: (task_state(redis_url, task_id) or ("", ""))[0] == "awaiting resurrection",
        30,
        interval=0.2,
        what="inspect to show the task awaiting resurrection",
    )
    workers = inspect_json(redis_url, "workers", "--json")["workers"]
    dead = [w for w in workers if w["worker"].startswith("w1@")]
    assert dead and dead[0]["status"] == "dead" and dead[0]["held"] == 1
    text = inspect_json(redis_url, "inspect")["text"]
    assert "awaiting resurrection" in text and "1 dead" in text
    # When a scanner resurrects it
    out = relier_cli(fleet, "resurrector", "--once")  # it publishes on the fleet's broker
    assert "resurrected or quarantined 1 task(s)" in out.stdout, out.stdout + out.stderr
    # Then inspect shows it running on the other worker, and counts the resurrection
    wait_for(
        lambda: (
            (task_state(redis_url, task_id) or ("", "")) == ("running", victim_id(redis_url, "w2@"))
        ),
        30,
        interval=0.2,
        what="inspect to show the task running on the second worker",
    )
    data = inspect_json(redis_url, "inspect", "--json")
    assert data["counters"]["resurrections"] >= 1
    assert data["summary"]["running"] == 1 and data["summary"]["awaiting_resurrection"] == 0
    assert not [w for w in data["workers"] if w["worker"].startswith("w1@")]
    r.set("test:release:1", 1)
    wait_for(lambda: 1 in done(r), 30, what="the task to complete")
    assert int(r.get("test:started:1")) == 2, survivor.log()  # once per worker, no more


def victim_id(redis_url: str, host_prefix: str) -> str:
    """The lease id of the worker whose hostname starts with ``host_prefix``."""
    workers = inspect_json(redis_url, "workers", "--json")["workers"]
    ids = [w["worker"] for w in workers if w["worker"].startswith(host_prefix)]
    return ids[0] if ids else "?"


@pytest.mark.timeout(120)
def test_a_worker_with_otel_enabled_exports_its_events_and_counts_them(fleet, publisher, r):
    from relier_celery.testing import OtlpReceiver

    receiver = OtlpReceiver()
    try:
        # Given a worker with relier_otel_enabled, configured by OTEL_* variables only
        worker = fleet.start(
            concurrency=1,
            RELIER_TEST_CONF=json.dumps({"relier_otel_enabled": True}),
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_SERVICE_NAME="relier-worker-test",
            OTEL_BSP_SCHEDULE_DELAY="200",
            OTEL_METRIC_EXPORT_INTERVAL="500",
        )
        # When an idempotent task runs twice (the second is a hit, in the pool process)
        for _ in range(2):
            publisher.send_task("chaos.charge", args=(5, 0.05))
            wait_for(lambda: r.llen("test:results") >= 1, 30, what="a result")
        wait_for(lambda: r.llen("test:results") == 2, 30, what="two results")
        # Then the hit is counted in Redis by the pool process
        wait_for(
            lambda: r.hget("rl:{rl}:counters", "idempotent_hits") == "1",
            10,
            what="the hit to be counted",
        )
        wait_for(
            lambda: "rl.idempotency.hit" in {s.name for s in receiver.spans()},
            10,
            what=f"the pool process's span\n{worker.log()[-3000:]}",
        )
        # And when the worker is stopped (SIGTERM: a drain), its spans and metrics arrive
        assert worker.stop(timeout=40) == 0
        names = {s.name for s in receiver.spans()}
        assert {"rl.worker.started", "rl.drain.started", "rl.drain.finished"} <= names, names
        assert "rl.worker.stopped" in names
        finished = next(s for s in receiver.spans() if s.name == "rl.drain.finished")
        attrs = {a.key: a.value for a in finished.attributes}
        assert attrs["rl.worker"].string_value.startswith("w1@")
        assert attrs["rl.lost"].int_value == 0
        assert {"rl.idempotent_hits", "rl.drains"} <= receiver.metric_names()
        assert r.hget("rl:{rl}:counters", "drains") == "1"
    finally:
        receiver.close()
