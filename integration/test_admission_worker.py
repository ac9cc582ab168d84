"""Admission control with a real ``celery worker``, on Redis and on RabbitMQ: retries of an
admitted task are never refused, ``max_queue_depth`` reads the broker's queue, and a malformed
rate stops the worker at start, naming the task."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
from admission_app import make_app
from fleet import BROKERS, Broker

from relier_celery import AdmissionRejected, install
from relier_celery.testing import WorkerProcess, wait_for

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.timeout(60)


def _worker(redis_url: str, tmp_path: Path, **env: str) -> WorkerProcess:
    return WorkerProcess(
        "admission_app",
        pool="threads",
        concurrency=1,
        cwd=str(HERE),
        log_path=str(tmp_path / "worker.log"),
        env={
            "RELIER_TEST_REDIS": redis_url,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            **env,
        },
    )


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_retries_of_an_admitted_task_are_not_refused(
    broker: Broker, redis_url: str, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(redis_url)
    app = make_app(redis_url, broker.url, broker.queue)
    install(app)
    flaky = app.tasks["adm.flaky"]
    # Given a task allowed once an hour, pushed once (its bucket is now empty)
    flaky.push(1, failures=3)
    with _worker(redis_url, tmp_path, **broker.env) as worker:
        worker.wait_ready()
        # When it fails and retries three times in the worker
        wait_for(lambda: r.sismember("test:done", 1), 30, what="the task to succeed")
    # Then every retry was published and run, and only a new dispatch is refused
    assert int(r.get("test:flaky:1") or 0) == 4
    assert "admission.rejected" not in worker.log()
    with pytest.raises(AdmissionRejected):
        flaky.push(2, failures=0)
    app.close()


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_max_queue_depth_counts_the_messages_waiting_on_the_broker(
    broker: Broker, redis_url: str, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(redis_url)
    app = make_app(redis_url, broker.url, broker.queue)
    # A publisher that never loads ``imports`` installs relier itself (push, admission). On
    # RabbitMQ each push waits for the broker's confirm: unconfirmed, the 3rd message may not
    # be in the queue's count yet when the 4th push reads it (a run saw DID NOT RAISE).
    app.conf.broker_transport_options = {"confirm_publish": True}
    install(app)
    bounded = app.tasks["adm.bounded"]
    # Given no worker and a queue bounded at 3 messages (not declared yet: empty)
    # When 4 are pushed
    for n in range(3):
        bounded.push(n)
    # Then the 4th is refused before it is published, naming the depth
    with pytest.raises(AdmissionRejected, match="holds 3 message"):
        bounded.push(3)
    # And once a worker has emptied the queue, the queue takes messages again
    with _worker(redis_url, tmp_path, **broker.env) as worker:
        worker.wait_ready()
        wait_for(lambda: len(r.smembers("test:done")) == 3, 30, what="the 3 queued tasks")
        bounded.push(3)
        wait_for(lambda: r.sismember("test:done", 3), 30, what="the 4th task")
    app.close()


def test_a_malformed_rate_stops_the_worker_naming_the_task(redis_url: str, tmp_path: Path) -> None:
    worker = _worker(redis_url, tmp_path, RELIER_TEST_BAD_ADMISSION="1").start()
    assert worker.proc is not None
    code = worker.proc.wait(30)
    log = worker.log()
    assert code != 0
    assert "task 'adm.bad': admission: malformed rate '100 per second'" in log
