"""The reliable fetch (fetch.py, fetch.lua, requeue.lua) against a throwaway redis-server: a
real kombu connection with relier's channel, no worker."""

from __future__ import annotations

import contextlib
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Consumer, Queue

from relier_celery import install
from relier_celery.core.headers import FETCH_EPOCH, PROTECTED
from relier_celery.core.record import FETCHED_MARK, TaskRecord
from relier_celery.recovery.lease import LeaseClock
from relier_celery.recovery.resurrect import Resurrector
from relier_celery.store.client import Store
from relier_celery.wiring.fetch_transport import reliable_transport

WORKER = "w1@test/1/abcd"


def _runtime(app: Celery, worker: str = WORKER) -> Any:
    relier = install(app)
    resurrector = Resurrector(app, relier.config, relier.store)
    return SimpleNamespace(
        config=relier.config,
        store=relier.store,
        worker_id=worker,
        resurrector=resurrector,
        lease=SimpleNamespace(clock=LeaseClock(30.0)),
    )


def _lease(store: Store, worker: str = WORKER, ttl: float = 30.0) -> None:
    store.renew_lease(worker, ttl)


def _queued(client: redis.Redis, queue: str = "celery") -> list[dict[str, Any]]:
    """The queue's messages, the next one to be consumed first."""
    return [json.loads(m) for m in reversed(client.lrange(queue, 0, -1))]


def _held(client: redis.Redis, worker: str = WORKER) -> dict[str, str]:
    return client.hgetall(f"rl:{{rl}}:held:{worker}")


class _Take:
    """Consume one message at a time through relier's channel."""

    def __init__(self, redis_url: str, runtime: Any, queues: tuple[str, ...] = ("celery",)):
        self.conn = Connection(redis_url, transport=reliable_transport(runtime))
        self.got: list[Any] = []
        self.consumer = Consumer(
            self.conn.default_channel,
            [Queue(q, routing_key=q) for q in queues],
            callbacks=[lambda body, message: self.got.append(message)],
            accept=["json"],
        )
        self.consumer.qos(prefetch_count=10)
        self.consumer.consume()

    def one(self, timeout: float = 3.0) -> Any:
        deadline = time.monotonic() + timeout
        while not self.got and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                self.conn.drain_events(timeout=0.2)
        return self.got.pop(0) if self.got else None

    def close(self) -> None:
        self.conn.release()


@pytest.fixture
def app(redis_url: str) -> Celery:
    app = Celery("fetch_test", broker=redis_url)
    app.conf.task_default_queue = "celery"
    return app


def test_a_fetched_message_is_held_until_acked_and_nothing_goes_to_unacked(
    app: Celery, redis_url: str, client: redis.Redis
) -> None:
    runtime = _runtime(app)
    _lease(runtime.store)
    task_id = app.send_task("jobs.a", args=(1,)).id
    take = _Take(redis_url, runtime)
    try:
        message = take.one()
        assert message is not None and message.headers["id"] == task_id
        # In Redis the message is in exactly one place: this worker's held hash
        assert client.llen("celery") == 0 and client.hlen("unacked") == 0
        (raw,) = _held(client).values()
        assert raw.startswith(FETCHED_MARK)
        record = TaskRecord.loads(raw, "f1")
        assert record.task_id == task_id and record.queue_key == "celery"
        # Stamped with the lease epoch of its fetch (receipt.py gives back a stale one)
        assert message.delivery_info[FETCH_EPOCH] == runtime.lease.clock.epoch
        # A message relier did not take over loses its record at the ack, as with kombu
        message.ack()
        assert _held(client) == {}
    finally:
        take.close()


def test_a_protected_message_keeps_its_record_through_celerys_ack(
    app: Celery, redis_url: str, client: redis.Redis
) -> None:
    runtime = _runtime(app)
    _lease(runtime.store)
    app.send_task("jobs.a", args=(1,))
    take = _Take(redis_url, runtime)
    try:
        message = take.one()
        message.delivery_info[PROTECTED] = True  # what consumer_hooks does for a task it runs
        message.ack()  # Celery's early ack, as the task starts
        assert len(_held(client)) == 1  # relier removes it when the task ends
    finally:
        take.close()


def test_no_lease_no_fetch(app: Celery, redis_url: str, client: redis.Redis) -> None:
    runtime = _runtime(app)
    app.send_task("jobs.a", args=(1,))
    take = _Take(redis_url, runtime)
    try:
        # Without a lease (or with an expired or claimed one) nothing leaves the queue
        assert take.one(timeout=1.5) is None
        assert client.llen("celery") == 1 and _held(client) == {}
        # With a live lease it is taken
        _lease(runtime.store)
        assert take.one() is not None
        assert client.llen("celery") == 0
    finally:
        take.close()


def test_a_claimed_worker_fetches_nothing(app: Celery, redis_url: str, client: redis.Redis) -> None:
    runtime = _runtime(app)
    _lease(runtime.store)
    client.set(f"rl:{{rl}}:claim:{WORKER}", "scanner", px=5000)
    app.send_task("jobs.a", args=(1,))
    take = _Take(redis_url, runtime)
    try:
        assert take.one(timeout=1.5) is None
        assert client.llen("celery") == 1
    finally:
        take.close()


def test_an_idle_channel_wakes_up_for_a_new_message(
    app: Celery, redis_url: str, client: redis.Redis
) -> None:
    runtime = _runtime(app)
    _lease(runtime.store)
    take = _Take(redis_url, runtime)
    try:
        assert take.one(timeout=0.5) is None  # empty: the channel now blocks on BLMOVE
        task_id = app.send_task("jobs.a").id
        message = take.one()
        assert message is not None and message.headers["id"] == task_id
    finally:
        take.close()


def test_reject_with_requeue_moves_the_record_back_to_the_tail(
    app: Celery, redis_url: str, client: redis.Redis
) -> None:
    runtime = _runtime(app)
    _lease(runtime.store)
    first = app.send_task("jobs.a", args=(1,)).id
    second = app.send_task("jobs.a", args=(2,)).id
    take = _Take(redis_url, runtime)
    try:
        message = take.one()
        assert message.headers["id"] == first
        take.consumer.qos(prefetch_count=1)
        message.reject(requeue=True)  # kombu puts a rejected message behind the others
        assert _held(client) == {}
        assert [m["headers"]["id"] for m in _queued(client)] == [second, first]
    finally:
        take.close()


def test_keys_are_tried_in_kombus_order_across_queues_and_priorities(
    app: Celery, redis_url: str, client: redis.Redis
) -> None:
    runtime = _runtime(app)
    _lease(runtime.store)
    app.send_task("jobs.a", queue="b")
    app.send_task("jobs.a", queue="a")
    take = _Take(redis_url, runtime, queues=("a", "b"))
    try:
        got = {take.one().delivery_info["routing_key"], take.one().delivery_info["routing_key"]}
        assert got == {"a", "b"}
        assert len(_held(client)) == 2
    finally:
        take.close()


def test_a_dead_workers_fetched_tasks_go_back_to_the_head_of_their_queue(
    app: Celery, redis_url: str, client: redis.Redis
) -> None:
    # Given a worker that fetched a task, then died (its lease ran out)
    runtime = _runtime(app)
    _lease(runtime.store, ttl=0.3)
    victim = app.send_task("jobs.a", args=(1,)).id
    take = _Take(redis_url, runtime)
    try:
        assert take.one() is not None
    finally:
        take.conn.release()
    later = [app.send_task("jobs.a", args=(n,)).id for n in range(3)]
    time.sleep(0.5)
    # When a scanner runs
    assert runtime.resurrector.scan_once() == 1
    # Then its task is next in its queue, ahead of what was queued after it, with the same
    # body and one more crash on its counters, and nothing is left held
    queued = _queued(client)
    assert [m["headers"]["id"] for m in queued] == [victim, *later]
    assert queued[0]["headers"]["rl_crashes"] == 1
    assert queued[0]["headers"]["rl_resurrections"] == 1
    assert _held(client) == {}
    # And plain kombu reads it back as the same message
    with Connection(redis_url) as conn:
        message = conn.SimpleQueue("celery").get(timeout=2)
        assert message.headers["id"] == victim
        assert message.decode()[0] == [1]


def test_requeue_moves_only_what_is_still_held(store: Store, client: redis.Redis) -> None:
    held = store.keys.held(WORKER)
    client.hset(held, "f1", "x")
    assert store.requeue(WORKER, "f1", "q", "m1", head=True)
    assert not store.requeue(WORKER, "f1", "q", "m1", head=True)  # gone: nothing pushed twice
    client.hset(held, "f2", "y")
    assert store.requeue(WORKER, "f2", "q", "m2", head=False)
    assert client.lrange("q", 0, -1) == ["m2", "m1"]  # m1 at the consuming end (the head)


def test_a_record_survives_the_envelope_round_trip(app: Celery) -> None:
    record = TaskRecord(
        task_id="t1",
        task_name="jobs.a",
        body=b'[[1], {}, {"callbacks": null}]',
        content_type="application/json",
        content_encoding="utf-8",
        headers={"id": "t1", "task": "jobs.a", "retries": 2, "timelimit": [None, None]},
        properties={"priority": 3, "correlation_id": "t1", "delivery_mode": 2},
        exchange="",
        routing_key="celery",
        worker=WORKER,
        delivery_tag="tag-1",
    )
    again = TaskRecord.from_envelope(json.loads(record.envelope()), WORKER, "celery")
    assert again.body == record.body and again.headers == record.headers
    assert again.properties == record.properties and again.delivery_tag == "tag-1"
    assert (again.exchange, again.routing_key) == ("", "celery")


def test_an_unreadable_fetched_record_goes_to_the_dlq_raw(
    app: Celery, redis_url: str, client: redis.Redis
) -> None:
    runtime = _runtime(app, worker="dead/1/x")
    _lease(runtime.store, "dead/1/x", ttl=0.05)
    client.hset("rl:{rl}:held:dead/1/x", "f1", f"{FETCHED_MARK}dead/1/x\ncelery\n1\nnot json")
    time.sleep(0.1)
    runtime.resurrector.scan_once()
    assert _held(client, "dead/1/x") == {}
    (entry,) = [json.loads(v) for v in client.hvals("rl:{rl}:dlq")]
    assert entry["reason"] == "invalid_envelope" and client.llen("celery") == 0


def test_a_dead_workers_tasks_go_back_first_delivered_first_taken(
    app: Celery, client: redis.Redis
) -> None:
    # Given a dead worker that fetched three tasks, one after the other
    runtime = _runtime(app, worker="dead/2/y")
    _lease(runtime.store, "dead/2/y", ttl=0.05)
    for n, at_ms in enumerate([1000, 2000, 3000]):
        headers = {"id": f"t{n}", "task": "jobs.a"}
        envelope = json.dumps(
            {
                "body": "W1tdLCB7fSwge31d",
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": headers,
                "properties": {
                    "delivery_tag": f"tag{n}",
                    "body_encoding": "base64",
                    "delivery_info": {"exchange": "", "routing_key": "celery"},
                },
            }
        )
        raw = f"{FETCHED_MARK}dead/2/y\ncelery\n{at_ms}\n{envelope}"
        client.hset("rl:{rl}:held:dead/2/y", f"f{n}", raw)
    client.lpush("celery", json.dumps({"headers": {"id": "later"}}))
    time.sleep(0.1)
    # When a scanner puts them back
    assert runtime.resurrector.scan_once() == 3
    # Then the first delivered is the first taken again, all ahead of what was queued after
    assert [m["headers"]["id"] for m in _queued(client)] == ["t0", "t1", "t2", "later"]


def test_a_resurrected_request_waits_first_for_a_pool_slot() -> None:
    from kombu.asynchronous.semaphore import LaxBoundedSemaphore

    from relier_celery.wiring.consumer_hooks import _ahead_of_reserved

    class Req:  # a request and its message (given back: the broker redelivered it)
        def __init__(self, name: str) -> None:
            self.name = name
            info = {"redelivered": name.startswith("given-back")}
            self.message = SimpleNamespace(headers={}, delivery_info=info)

    class Worker:
        def __init__(self) -> None:
            self.semaphore = LaxBoundedSemaphore(1)
            self.ran: list[str] = []

        def _process_task(self, req: Req) -> None:
            self.ran.append(req.name)

        def _process_task_sem(self, req: Req) -> bool:
            return bool(self.semaphore.acquire(self._process_task, req))

    w = Worker()
    c = SimpleNamespace(controller=w)
    w._process_task_sem(Req("running"))  # takes the one slot
    w._process_task_sem(Req("reserved-1"))
    w._process_task_sem(Req("reserved-2"))
    # Requests given back go first among the waiting ones, in the order they came
    assert _ahead_of_reserved(c, w._process_task_sem, Req("given-back-1"))
    assert _ahead_of_reserved(c, w._process_task_sem, Req("given-back-2"))
    for _ in range(5):  # four hand the slot on to a waiter, the fifth frees it
        w.semaphore.release()
    assert w.ran == ["running", "given-back-1", "given-back-2", "reserved-1", "reserved-2"]
    # With a free slot, or another pool, it takes the usual path
    assert not _ahead_of_reserved(c, w._process_task_sem, Req("x"))  # a slot is free now
    assert not _ahead_of_reserved(c, lambda req: None, Req("x"))
    # A kombu whose semaphore keeps no deque of waiters: its own order, no error
    w.semaphore = SimpleNamespace(value=0)  # type: ignore[assignment]
    assert not _ahead_of_reserved(c, w._process_task_sem, Req("given-back-3"))
