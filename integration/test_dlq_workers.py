"""G5 and schema versioning with real workers: every route into the DLQ keeps the payload, and
a release after the fix runs the task to completion; a mixed deploy loses nothing."""

from __future__ import annotations

import base64
import json

import pytest
from fleet import BROKERS, dlq_entries, done, relier_cli, wait_all_done
from kombu import Connection, Exchange, Producer

from relier_celery.testing import wait_for

pytestmark = pytest.mark.timeout(120)


def entry_for(r, **match: str) -> dict:
    def find() -> dict | None:
        for entry in dlq_entries(r):
            if all(entry.get(k) == v for k, v in match.items()):
                return entry
        return None

    return wait_for(find, 40, what=f"a DLQ entry {match}")


def canary(publisher, r, n: int = 9000) -> None:
    """The worker still serves."""
    publisher.send_task("chaos.work", args=(n, 0.0))
    wait_for(lambda: n in done(r), 20, what="the canary task")


# On a quorum queue Celery's retries (countdown) are ETA messages held by a worker whose
# prefetch cannot grow (per-consumer QoS), and a DLQ release publishes to a quorum queue.
@pytest.mark.parametrize("broker", [*BROKERS, "rabbitmq-quorum"], indirect=True)
def test_a_task_failing_after_its_retries_lands_in_the_dlq_with_its_traceback(
    fleet, publisher, r, redis_url
):
    fleet.start(concurrency=2)
    task_id = publisher.send_task("chaos.fails_until_fixed", args=("f1",)).id
    entry = entry_for(r, task_id=task_id, reason="exception")
    assert int(r.get("test:attempts:f1")) == 3  # the first run and two retries
    assert "ValueError" in entry["error"] and "bad input f1" in entry["error"]
    assert "Traceback" in entry["error"]
    shown = relier_cli(fleet, "dlq", "show", entry["id"])
    assert shown.returncode == 0 and "bad input f1" in shown.stdout and '"f1"' in shown.stdout
    # When fixed and released: it runs with its counts reset, and completes
    r.set("test:fixed:f1", 1)
    assert relier_cli(fleet, "dlq", "release", "--all", "--task", "chaos.fails_until_fixed")
    wait_for(lambda: "f1" in r.smembers("test:done"), 30, what="the released task")
    assert int(r.get("test:attempts:f1")) == 4
    assert not dlq_entries(r)


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_an_unknown_task_is_kept_and_runs_once_a_worker_knows_it(fleet, publisher, r, redis_url):
    old = fleet.start(concurrency=1)
    task_id = publisher.send_task("chaos.late", args=("l1",)).id
    entry = entry_for(r, task_id=task_id, reason="unknown_task")
    canary(publisher, r)
    # When a deploy that knows the task is up and the entry released
    fleet.start(concurrency=1, RELIER_TEST_LATE_TASK="1")
    old.stop()
    out = relier_cli(fleet, "dlq", "release", entry["id"])
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "l1" in r.smembers("test:done"), 30, what="the released task")


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
@pytest.mark.parametrize(
    "body, content_type, encoding",
    [
        (b"\x00\xffnot json at all", "application/json", "utf-8"),
        (b'{"args": [1]}', "application/json", "utf-8"),  # JSON of the wrong shape
        (b"\x80\x04K\x01.", "application/x-python-serialize", "binary"),  # pickle: not accepted
    ],
    ids=["garbage", "wrong-shape", "pickle"],
)
def test_a_body_that_cannot_be_decoded_lands_in_the_dlq_with_its_raw_bytes(
    broker, fleet, publisher, r, redis_url, body, content_type, encoding
):
    fleet.start(concurrency=1)
    queue = broker.queue or "celery"  # on RabbitMQ the test's queue, behind its own exchange
    with Connection(broker.url) as conn:
        Producer(conn).publish(
            body,
            exchange=Exchange(queue, type="direct"),
            routing_key=queue,
            content_type=content_type,
            content_encoding=encoding,
            headers={"id": "bad-1", "task": "chaos.work", "lang": "py"},
        )
    entry = entry_for(r, task_id="bad-1")
    assert entry["reason"] in ("undecodable", "invalid_message")
    assert base64.b64decode(entry["message"]["body"]) == body
    canary(publisher, r)
    listed = relier_cli(fleet, "dlq", "list", "--json")
    assert [e["task_id"] for e in json.loads(listed.stdout)] == ["bad-1"]


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_a_message_from_a_newer_schema_waits_then_is_quarantined_then_released(
    fleet, publisher, r, redis_url
):
    # Given only workers of deploy 1, which retry a newer message twice, half a second apart
    fleet.env["RELIER_TEST_CONF"] = json.dumps(
        {"relier_schema_requeue_delay": 0.5, "relier_schema_max_requeues": 2}
    )
    old = fleet.start(concurrency=1)
    publisher.send_task("chaos.versioned", args=(1, 9.5, "USD"), headers={"relier_schema": 2})
    # Then it is never run by them, and ends in the DLQ
    entry = entry_for(r, reason="schema_too_new")
    assert old.log().count("relier task.schema_too_new") == 2
    assert not r.exists("test:versioned:1")
    # When deploy 2 is up and the entry released, deploy 2 runs it with its own shape
    fleet.start(concurrency=1, RELIER_TEST_SCHEMA="2")
    old.stop()
    assert relier_cli(fleet, "dlq", "release", entry["id"]).returncode == 0
    wait_all_done(r, {1}, 30, fleet)
    assert [json.loads(x) for x in r.lrange("test:versioned:1", 0, -1)] == [[2, 1, 9.5, "USD"]]


@pytest.mark.timeout(150)
def test_mixed_deploy_every_task_runs_on_a_worker_that_understands_it(fleet, publisher, r):
    # Given an old worker (schema 1) and a new one (schema 2, with a migration from 1)
    fleet.env["RELIER_TEST_CONF"] = json.dumps({"relier_schema_requeue_delay": 0.2})
    fleet.start(concurrency=2, RELIER_TEST_SCHEMA="1")
    fleet.start(concurrency=2, RELIER_TEST_SCHEMA="2")
    # When tasks are published in both formats (old publishers send no header at all)
    old_format, new_format = range(0, 20), range(20, 40)
    for n in old_format:
        headers = {"relier_schema": 1} if n % 2 else {}
        publisher.send_task("chaos.versioned", args=(n, 1.0), headers=headers)
    for n in new_format:
        publisher.send_task("chaos.versioned", args=(n, 2.0, "USD"), headers={"relier_schema": 2})
    # Then every task completes once, on a worker that understands it
    wait_all_done(r, set(range(40)), 90, fleet)
    migrated = 0
    for n in range(40):
        runs = [json.loads(x) for x in r.lrange(f"test:versioned:{n}", 0, -1)]
        assert len(runs) == 1, (n, runs)
        schema, *args = runs[0]
        if n in new_format:
            assert (schema, args) == (2, [n, 2.0, "USD"])
        elif schema == 1:
            assert args == [n, 1.0]
        else:
            assert args == [n, 1.0, "EUR"]  # migrated on pickup
            migrated += 1
    assert migrated >= 1, "no old-format task reached the new worker"
    assert not dlq_entries(r)


def test_a_migration_that_raises_lands_in_the_dlq_and_the_worker_goes_on(fleet, publisher, r):
    # Given a worker of deploy 2, whose migration from schema 1 refuses negative amounts
    fleet.start(concurrency=1, RELIER_TEST_SCHEMA="2")
    # When an old-format message it cannot migrate arrives
    task_id = publisher.send_task("chaos.versioned", args=(7, -1.0)).id
    # Then it waits in the DLQ, original body and traceback kept, and nothing ran
    entry = entry_for(r, task_id=task_id, reason="migration_failed")
    assert "cannot migrate a negative amount" in entry["error"] and "Traceback" in entry["error"]
    assert json.loads(base64.b64decode(entry["message"]["body"]))[0] == [7, -1.0]
    assert not r.exists("test:versioned:7")
    canary(publisher, r)
